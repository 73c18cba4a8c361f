"""The GPU check's report (`bench/gpu_check.py`) as Markdown with its targets, and the performance page's table.

    python bench/gpu_report.py                # write the newest bench/results/*.json into docs/performance.md
    python bench/gpu_report.py --check        # exit 1 if the page is out of date (a test runs this)
    python bench/gpu_report.py REPORT.json    # print one report as Markdown

Standard library only, so it runs anywhere; the targets are the project's own (docs/performance.md), for H100/H200 at the real shape.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Each page is updated only if it holds the markers: the full report in the docs, its targets in the README.
PAGES = {ROOT / "docs" / "performance.md": "full", ROOT / "README.md": "targets"}
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
NOT_MEASURED = (
    "Not measured on a GPU yet: `bench/results/` holds no run. `make gpu-check OUT=DIR` on a CUDA machine "
    "produces one (see `bench/results/README.md`)."
)
GB = 1e9
PARTS = {
    "1_cuda_tests": "CUDA tests of the suite",
    "2_ttft": "time to first token, real shape",
    "3_decode": "decode tokens/s against Llama",
    "4_bf16_vs_fp32": "bf16 against fp32",
    "5_fp16_autocast": "fp16 autocast over bf16 weights",
    "6_quantized": "bitsandbytes 4-bit and 8-bit",
    "7_lora_step": "LoRA training step",
    "8_device_map": 'device_map="auto", CPU/GPU split',
}


def read(report, *keys):
    """report[k0][k1]... or None when any level is missing (a part that failed, was skipped or has no row)."""
    value = report.get("parts", {})
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def decode_row(report, cache, batch=1):
    rows = read(report, "3_decode", "rows") or []
    return next((row for row in rows if row["cache"] == cache and row["batch"] == batch and "ours" in row), None)


def decode_value(cache, key):
    return lambda report: (decode_row(report, cache) or {}).get(key)


def in_gb(*keys):
    def value(report):
        number = read(report, *keys)
        return None if number is None else number / GB

    return value


# (target, value read from a report, comparison, limit, unit): the project's targets, H100/H200, bf16, random weights.
TARGETS = [
    ("Time to first token, 3840×1600 at hd_num 55, pre-processing included", lambda r: read(r, "2_ttft", "ttft_s"),
     "<=", 0.5, "s"),
    ("Decode at batch 1, ours ÷ Llama, dynamic cache", decode_value("dynamic", "ratio"), ">=", 1.0, "×"),
    ("Decode at batch 1, ours ÷ Llama, static cache", decode_value("static", "ratio"), ">=", 1.0, "×"),
    ("Decode at batch 1, ours ÷ Llama, static cache + compile", decode_value("compiled", "ratio"), ">=", 1.0, "×"),
    ("Decode at batch 1, static cache + compile, share of the bandwidth bound",
     decode_value("compiled", "share_of_bound"), ">=", 0.75, ""),
    ("Peak memory for that request, bf16", in_gb("2_ttft", "peak_bytes"), "<=", 24, "GB"),
    ("Peak memory for that request, 4-bit NF4", in_gb("6_quantized", "4bit", "request_peak_bytes"), "<=", 10, "GB"),
    ("LoRA step at hd_num 16, 4k tokens, peak memory", in_gb("7_lora_step", "peak_bytes"), "<", 40, "GB"),
]  # fmt: skip
COMPARE = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}


def evaluate_targets(report):
    """One dict per target: name, value, limit, unit and passed (None when not measured, or in a dry run)."""
    results = []
    for name, value_of, comparison, limit, unit in TARGETS:
        value = value_of(report)
        passed = None if value is None or report.get("dry_run") else COMPARE[comparison](value, limit)
        results.append({"target": name, "value": value, "comparison": comparison, "limit": limit, "unit": unit,
                        "passed": passed})  # fmt: skip
    return results


def number(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def gigabytes(value):
    return "-" if value is None else f"{value / GB:.1f} GB"


def part_summary(name, part):
    """A few key numbers of one part, for the overview table."""
    if part.get("status") != "ok":
        return part.get("reason") or part.get("error") or ""
    if name == "1_cuda_tests":
        return f"{part['passed']} passed, {part['failed']} failed, {part['skipped']} skipped of {part['selected']}"
    if name == "2_ttft":
        return (f"{part['tokens']} tokens: pre-processing {number(part['preprocess_s'])} s, vision "
                f"{number(part['vision_s'])} s, prefill {number(part['prefill_s'])} s; peak "
                f"{gigabytes(part['peak_bytes'])}")  # fmt: skip
    if name == "3_decode":
        return f"copy bandwidth {part['copy_bandwidth_bytes_per_s'] / GB:.0f} GB/s; rows below"
    if name in ("4_bf16_vs_fp32", "5_fp16_autocast"):
        return (f"logits max abs diff {number(part['logits_max_abs_diff'])}, top-1 agreement "
                f"{number(part['top1_agreement'])} over {part['steps']} greedy tokens")  # fmt: skip
    if name == "6_quantized":
        return "; ".join(
            f"{bits}: " + (f"peak {gigabytes(q['request_peak_bytes'])}, top-1 agreement with bf16 "
                           f"{number(q['top1_agreement'])}" if "error" not in q else q["error"])
            for bits, q in part.items() if bits in ("4bit", "8bit")
        )  # fmt: skip
    if name == "7_lora_step":
        return f"{part['tokens']} tokens, step {number(part['step_s'])} s, peak {gigabytes(part['peak_bytes'])}"
    if name == "8_device_map":
        return (f"placement {part['placement']}, logits max abs diff {number(part['logits_max_abs_diff'])}, "
                f"same greedy ids: {number(part['same_greedy_ids'])}")  # fmt: skip
    return ""


def render(report, parts=True):
    """The report as Markdown: header and targets, then (with `parts`) each part's numbers and the decode rows."""
    kind = "dry run on CPU at tiny shapes (numbers mean nothing)" if report.get("dry_run") else "real shape"
    lines = [
        f"GPU check of {report['date']} on {report['device']}: {kind}. torch {report['torch']}, transformers "
        f"{report['transformers']}, CUDA {report.get('cuda') or '-'}, bitsandbytes {report.get('bitsandbytes') or '-'}; "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| target | measured | limit | result |",
        "|---|---|---|---|",
    ]
    for target in evaluate_targets(report):
        result = {True: "pass", False: "**fail**", None: "not measured"}[target["passed"]]
        if target["passed"] is None and target["value"] is not None:
            result = "dry run"
        lines.append(f"| {target['target']} | {number(target['value'])} {target['unit']} | "
                     f"{target['comparison']} {target['limit']} {target['unit']} | {result} |")  # fmt: skip
    if not parts:
        return "\n".join(lines) + "\n"
    lines += ["", "| part | status | seconds | numbers |", "|---|---|---|---|"]
    for name, title in PARTS.items():
        part = report["parts"].get(name, {"status": "not run"})
        seconds = number(part.get("seconds"), 2)
        lines.append(f"| {name[0]}. {title} | {part['status']} | {seconds} | {part_summary(name, part)} |")
    decode = read(report, "3_decode")
    if decode and decode.get("rows"):
        bound = decode["bound_tokens_per_s"]
        lines += [
            "",
            f"Decode tokens/s per sequence after a {decode['prompt_tokens']}-token prompt; bandwidth bound "
            f"{bound['ours']:.0f} (ours) / {bound['llama']:.0f} (Llama) tokens/s.",
            "",
            "| batch | cache | ours | Llama | ours ÷ Llama | ours ÷ bound | compiled |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in decode["rows"]:
            if "ours" not in row:
                why = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['error'][:200]}"
                lines.append(f"| {row['batch']} | {row['cache']} | {why} | | | | |")
                continue
            lines.append(f"| {row['batch']} | {row['cache']} | {row['ours']:.1f} | {row['llama']:.1f} | "
                         f"{row['ratio']:.2f} | {row['share_of_bound']:.0%} | {number(row['compiled'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def newest_result():
    """The newest real GPU run (by its `date`) kept in bench/results, or None; dry runs measure nothing."""
    reports = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    reports = [report for report in reports if not report.get("dry_run")]
    return max(reports, key=lambda report: report["date"], default=None)


def update(text, report, kind):
    """`text` with what stands between the markers replaced by the report ("full" or "targets"), or by the note
    that no GPU run exists yet."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    body = render(report, parts=kind == "full") if report else NOT_MEASURED + "\n"
    return f"{text[:start]}{BEGIN}\n{body}{END}{text[end:]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", type=Path, help="print this report instead of updating the pages")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date; change nothing")
    args = parser.parse_args(argv)
    if args.report:
        sys.stdout.write(render(json.loads(args.report.read_text())))
        return 0
    report = newest_result()
    stale = []
    for page, kind in PAGES.items():
        text = page.read_text() if page.is_file() else ""
        if BEGIN not in text:
            continue
        if update(text, report, kind) != text:
            stale.append(os.path.relpath(page, ROOT))
            if not args.check:
                page.write_text(update(text, report, kind))
    if args.check and stale:
        sys.stderr.write(f"out of date: {', '.join(stale)}; run `python bench/gpu_report.py`\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
