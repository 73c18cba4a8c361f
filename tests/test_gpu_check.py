"""The GPU check (`bench/gpu_check.py`) kept from rotting between GPU runs: its dry run on CPU at tiny shapes
reports every part with numbers, its time budget stops it, and the performance page shows the newest GPU result.
"""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, load_file

CASES = {"3840x1600@55": (3840, 1600, 55), "1920x1080@16": (1920, 1080, 16)}
TINY_TILE = {"image_size": 56, "patch_size": 14}  # the tiles of scripts/chat.py's tiny model, which the dry run uses


def run_check(out, *arguments):
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out), *arguments]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check"))


@pytest.fixture(scope="module")
def parts(dry_run):
    return dry_run[0]["parts"]


def image_tokens(case):
    budget = load_file("image_processing_4khd.py").image_token_budget
    return budget(*CASES[case], **TINY_TILE)[2]


def test_every_part_ran_and_the_table_names_each(dry_run, parts):
    report, markdown = dry_run
    assert list(parts) == ["1_cuda_tests", "2_ttft", "3_decode", "4_bf16_vs_fp32", "5_fp16_autocast",
                           "6_quantized", "7_lora_step", "8_device_map"]  # fmt: skip
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
    assert all(0 < part["seconds"] < report["elapsed_s"] for part in parts.values())
    assert report["dry_run"] is True and report["elapsed_s"] < report["budget_s"]
    assert [line.split(" | ")[1] for line in markdown.splitlines() if line[:4] in {f"| {i}." for i in range(1, 9)}] == [
        "ok"
    ] * 8
    assert [target["passed"] for target in report["targets"]] == [None] * 8  # a dry run measures no target


def test_cuda_tests_are_selected_and_skipped_on_cpu(parts):
    tests = parts["1_cuda_tests"]
    outcomes = tests["outcomes"]
    cuda_only = [name for name in outcomes if "cuda" in name.rsplit("::", 1)[1]]
    assert len(cuda_only) >= 2 and {outcomes[name] for name in cuda_only} == {"skipped"}
    assert any("quantized" in name for name in outcomes)  # the bitsandbytes tests, which use CUDA when it is there
    assert tests["selected"] == len(outcomes) == tests["passed"] + tests["failed"] + tests["skipped"]
    assert tests["skipped"] >= len(cuda_only)


def test_time_to_first_token_is_split_into_its_steps(parts):
    ttft = parts["2_ttft"]
    assert ttft["hd_num"] == 55 and ttft["tokens"] > image_tokens("3840x1600@55")
    assert all(ttft[f"{step}_s"] > 0 for step in ("ttft", "preprocess", "vision", "prefill"))  # no ratios: CPU noise
    assert ttft["weight_bytes"] > 0 and ttft["peak_bytes"] is None  # no allocator counts CPU memory


def test_decode_rows_cover_every_cache_and_batch(parts):
    decode = parts["3_decode"]
    rows = decode["rows"]
    assert [(row["batch"], row["cache"]) for row in rows] == [
        (batch, cache) for batch in (1, 8) for cache in ("dynamic", "static", "compiled")
    ]
    for row in rows:
        assert row["ours"] > 0 and row["llama"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["llama"])
        assert row["share_of_bound"] == pytest.approx(row["ours"] / decode["bound_tokens_per_s"]["ours"])
        assert row["compiled"] is False  # transformers compiles the decoding step on CUDA only
    # Same LLM dimensions, so the same weight bytes, except that ours is read through its own attribute names.
    assert decode["weight_bytes"]["ours"] == decode["weight_bytes"]["llama"]
    assert decode["copy_bandwidth_bytes_per_s"] > 1e8


@pytest.mark.parametrize("name", ["4_bf16_vs_fp32", "5_fp16_autocast"])
def test_precisions_agree_with_bf16(parts, name):
    part = parts[name]
    assert part["steps"] == 8 and part["logits_finite"] is True
    assert 0 < part["logits_max_abs_diff"] < 0.05  # a different precision, so never exactly equal
    assert 0 < part["logits_relative_diff"] < 0.02
    assert 0.5 <= part["top1_agreement"] <= 1 and 0 <= part["greedy_agreement"] <= 1


def test_fp16_autocast_runs_from_the_raw_image(parts):
    part = parts["5_fp16_autocast"]
    assert part["new_tokens"] == 8 and part["end_to_end_s"] > 0
    assert part["weights_dtype"] == "torch.float32"  # on CPU; bf16 on CUDA, the model card's setting


def test_quantized_models_keep_partial_lora_and_agree(parts):
    quantized = parts["6_quantized"]
    assert quantized["bitsandbytes"]
    for bits, linear in (("4bit", "PLoRALinear4bit"), ("8bit", "PLoRALinear8bitLt")):
        assert quantized[bits]["quantized_linears"] == linear
        assert quantized[bits]["load_s"] > 0 and quantized[bits]["logits_finite"] is True
        assert 0 < quantized[bits]["logits_max_abs_diff"] < 0.1
        assert 0.5 <= quantized[bits]["top1_agreement"] <= 1


def test_lora_step_trains_the_adapters(parts):
    lora = parts["7_lora_step"]
    assert lora["tokens"] == 1024 and 0 < lora["labelled_tokens"] < 1024 - image_tokens("1920x1080@16")
    assert lora["trainable_parameters"] > 0 and lora["step_s"] > 0
    assert len(lora["losses"]) == 3 and all(math.isfinite(loss) and loss > 0 for loss in lora["losses"])
    assert all(norm > 0 for norm in lora["grad_norms"])


def test_split_model_gives_the_same_logits(parts):
    split = parts["8_device_map"]
    assert set(split["placement"]) == {"cpu", "disk"}  # on CUDA: the GPU and the CPU
    assert split["logits_max_abs_diff"] == 0 and split["same_greedy_ids"] is True and split["greedy_steps"] == 4


def test_budget_stops_the_run_and_still_writes_the_report(tmp_path):
    report, markdown = run_check(tmp_path, "--budget", "0.001", "--parts", "2", "3")
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "2_ttft": "skipped",
        "3_decode": "skipped",
    }
    assert all("time budget" in part["reason"] for part in report["parts"].values())
    assert "| 2. time to first token, real shape | skipped |" in markdown


# ---- the report and the performance page ----

gpu_report = load_file("bench/gpu_report.py")


def real_report(**parts):
    base = {"date": "2026-12-01T10:00:00+00:00", "device": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0",
            "cuda": "13.0", "bitsandbytes": "0.50.2", "elapsed_s": 400.0, "budget_s": 450.0, "dry_run": False}  # fmt: skip
    return {**base, "parts": parts}


def test_targets_pass_and_fail_by_their_limits():
    decode = {"status": "ok", "rows": [
        {"batch": 1, "cache": "dynamic", "ours": 40.0, "llama": 38.0, "ratio": 40 / 38, "share_of_bound": 0.15},
        {"batch": 1, "cache": "compiled", "ours": 200.0, "llama": 210.0, "ratio": 200 / 210, "share_of_bound": 0.76},
    ]}  # fmt: skip
    report = real_report(
        **{"2_ttft": {"status": "ok", "ttft_s": 0.5, "peak_bytes": 25e9}, "3_decode": decode,
           "6_quantized": {"status": "ok", "4bit": {"request_peak_bytes": 9.9e9}},
           "7_lora_step": {"status": "ok", "peak_bytes": 40e9}}  # fmt: skip
    )
    passed = {target["target"]: target["passed"] for target in gpu_report.evaluate_targets(report)}
    assert list(passed.values()) == [True, True, None, False, True, False, True, False]


def test_render_shows_decode_rows_and_skips():
    decode = {"status": "ok", "seconds": 90.0, "prompt_tokens": 8150, "copy_bandwidth_bytes_per_s": 4.3e12,
              "bound_tokens_per_s": {"ours": 280.0, "llama": 281.0}, "rows": [
                  {"batch": 1, "cache": "static", "ours": 50.0, "llama": 40.0, "ratio": 1.25, "share_of_bound": 0.18,
                   "compiled": False},
                  {"batch": 8, "cache": "static", "error": "OutOfMemoryError: CUDA out of memory."},
                  {"batch": 8, "cache": "compiled", "skipped": "time budget (12 s left)"}]}  # fmt: skip
    markdown = gpu_report.render(real_report(**{"3_decode": decode}))
    assert "| 1 | static | 50.0 | 40.0 | 1.25 | 18% | no |" in markdown
    assert "| 8 | static | failed: OutOfMemoryError: CUDA out of memory. | | | | |" in markdown
    assert "| 8 | compiled | skipped: time budget (12 s left) | | | | |" in markdown
    assert "| 2. time to first token, real shape | not run | - |  |" in markdown
    assert "bandwidth bound 280 (ours) / 281 (Llama) tokens/s" in markdown


def test_performance_page_shows_the_newest_result(tmp_path, monkeypatch):
    assert gpu_report.main(["--check"]) == 0  # docs/performance.md is what the newest bench/results gives
    page, readme = tmp_path / "performance.md", tmp_path / "README.md"
    page.write_text(f"# Performance\n\n{gpu_report.BEGIN}\nold\n{gpu_report.END}\n\nmore text\n")
    readme.write_text(f"## Performance\n{gpu_report.BEGIN}\n{gpu_report.END}\n")
    monkeypatch.setattr(gpu_report, "PAGES", {page: "full", readme: "targets"})
    monkeypatch.setattr(gpu_report, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    assert gpu_report.main(["--check"]) == 1 and "old" in page.read_text()
    assert gpu_report.main([]) == 0 and gpu_report.NOT_MEASURED in page.read_text()
    for day in ("2026-12-01", "2026-12-03", "2026-12-02"):
        ttft = {"status": "ok", "ttft_s": 0.25, "tokens": 8150, "preprocess_s": 0.05, "vision_s": 0.03,
                "prefill_s": 0.17, "peak_bytes": 20e9}  # fmt: skip
        report = real_report(**{"2_ttft": ttft})
        (tmp_path / "results" / f"{day}-h200.json").write_text(json.dumps({**report, "date": f"{day}T10:00:00+00:00"}))
    assert gpu_report.main([]) == 0
    text = page.read_text()
    assert "GPU check of 2026-12-03T10:00:00+00:00 on NVIDIA H200" in text and gpu_report.NOT_MEASURED not in text
    assert "| 2. time to first token, real shape | ok | - | 8150 tokens: pre-processing 0.05 s, vision 0.03 s, " \
        "prefill 0.17 s; peak 20.0 GB |" in text
    assert text.startswith("# Performance\n\n") and text.endswith(f"{gpu_report.END}\n\nmore text\n")
    summary = readme.read_text()
    assert "| Time to first token, 3840×1600 at hd_num 55, pre-processing included | 0.25 s | <= 0.5 s | pass |" in summary
    assert "| part |" not in summary and "| part |" in text  # the README shows the targets, the page everything
    assert gpu_report.main(["--check"]) == 0
