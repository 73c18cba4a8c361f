"""Benchmark: generation about an image, end to end, against a text-only LLM of the same size.

For each image case, batch size, attention backend and cache it measures our time to first token (pre-processing
included: image processor, prompt ids, prefill with the vision tower), greedy decode tokens/s and peak memory, and
the same for transformers' `LlamaForCausalLM` with identical LLM dimensions on the same number of tokens (random
text ids, so no vision). The decode bound is the memory-bandwidth limit: the bytes of weights one decoding step
reads, divided by the measured device copy bandwidth.

Run: `python bench/bench_generate.py --size tiny` (CPU smoke test, seconds), or the real 7B shapes with random
weights on a GPU: `python bench/bench_generate.py --size 7b --device cuda --dtype bfloat16 --json out.json`.
`--cases`, `--batch-sizes`, `--attention` and `--caches` pick subsets; "compiled" is a static cache whose decoding
step transformers compiles, which it does on CUDA only.
"""

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from bench_llm import LLM_DIMS, build_llama, synchronized
from bench_preprocess import median_seconds, synthetic_image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_flash_attn_2_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from chat import build_tiny_model_dir  # noqa: E402

# name: (width, height, hd_num), the paper's HD-9/16/25 on a 1080p image and HD-55 on a 4K-wide one.
CASES = {
    "1920x1080@9": (1920, 1080, 9),
    "1920x1080@16": (1920, 1080, 16),
    "1920x1080@25": (1920, 1080, 25),
    "3840x1600@55": (3840, 1600, 55),
}
CACHES = {
    "dynamic": {},
    "static": {"cache_implementation": "static", "disable_compile": True},
    "compiled": {"cache_implementation": "static"},
}
DEFAULTS = {
    "tiny": dict(cases=["1920x1080@16", "3840x1600@55"], batch_sizes=[1, 4], attention=["sdpa"],
                 caches=["dynamic", "static"], decode_steps=32),
    "7b": dict(cases=list(CASES), batch_sizes=[1, 4], attention=["sdpa", "eager", "flash_attention_2"],
               caches=list(CACHES), decode_steps=64),
}  # fmt: skip
QUERY = "<ImageHere>Describe the image in detail."


@functools.cache
def case_image(case):
    width, height, _ = CASES[case]
    return synthetic_image(width, height)


def build_ours(size, dtype, device, workdir):
    """Our model with random weights, through remote code, and the tiny tokenizer of `scripts/chat.py`. At 7b the
    shipped config.json, with the tiny vocabulary's placeholder id (any reserved id costs the same)."""
    folder = build_tiny_model_dir(Path(workdir))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if size == "7b":
        tiny = json.loads((folder / "config.json").read_text())
        shipped = json.loads((ROOT / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**shipped, "image_token_id": tiny["image_token_id"]}))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=dtype)
    return model.eval(), tokenizer


def copy_bandwidth(device, repeats):
    """Bytes per second of a large on-device copy, counting each byte read once and written once."""
    size = (1 << 30) if device.type == "cuda" else (1 << 27)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    (seconds,) = median_seconds([synchronized(lambda: target.copy_(source), device)], repeats)
    return 2 * size / seconds


def decode_weight_bytes(model):
    """Bytes of weights one decoding step reads: not the token embeddings (one row each), and for our model not
    the vision side or the Partial LoRA branches, which text positions skip."""
    embeddings = model.get_input_embeddings().weight
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if p is not embeddings and not name.startswith(("vit.", "vision_proj.", "plora_")) and ".Plora_" not in name
    )


def peak_bytes(model, function, device):
    """Peak device memory of `model` alone while `function` runs: its weights plus the most the call allocates
    (activations, KV cache), leaving out the other model, which is resident too. CUDA only; None elsewhere."""
    if device.type != "cuda":
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return weights + torch.cuda.max_memory_allocated(device) - resident


def measure(model, prefill, generate_all, steps, device, repeats):
    """Time to first token, decode tokens/s per sequence and peak memory of one model on one input."""
    first, full = median_seconds([synchronized(prefill, device), synchronized(generate_all, device)], repeats)
    return {
        "ttft_ms": 1e3 * first,
        "decode_tokens_per_s": steps / (full - first),
        "peak_bytes": peak_bytes(model, generate_all, device),
    }


def run_case(ours, tokenizer, llama, case, batch, cache, args):
    """Ours (processor + generate) and Llama (generate on random ids of the same length) on one setting."""
    hd_num = CASES[case][2]
    image = case_image(case)
    processor = ours.build_processor(tokenizer, hd_num)
    prompts = [processor.build_prompt(QUERY)] * batch

    def prepare():
        inputs = processor(prompts, images=[[image]] * batch, hd_num=hd_num).to(args.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(ours.dtype)
        return inputs

    def our_generate(new_tokens):
        return ours.generate(**prepare(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **CACHES[cache])  # fmt: skip

    num_tokens = processor(prompts[:1], images=[[image]], hd_num=hd_num)["input_ids"].shape[1]
    text_ids = torch.randint(3, tokenizer.vocab_size, (batch, num_tokens), device=args.device)

    def llama_generate(new_tokens):
        return llama.generate(input_ids=text_ids, attention_mask=torch.ones_like(text_ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              **CACHES[cache])  # fmt: skip

    steps = args.decode_steps
    (prepare_s,) = median_seconds([synchronized(prepare, args.device)], args.repeats)
    result = {"case": case, "hd_num": hd_num, "tokens": num_tokens, "batch": batch, "cache": cache,
              "preprocess_ms": 1e3 * prepare_s}  # fmt: skip
    for name, model, generate in (("ours", ours, our_generate), ("llama", llama, llama_generate)):
        try:
            first, full = functools.partial(generate, 1), functools.partial(generate, 1 + steps)
            result[name] = measure(model, first, full, steps, args.device, args.repeats)
        except torch.OutOfMemoryError:
            result[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
    return result


def skip_reason(attention, cache, args):
    if attention == "flash_attention_2" and not (is_flash_attn_2_available() and args.device.type == "cuda"):
        return "flash-attn is not installed or the device is not CUDA"
    if attention == "flash_attention_2" and args.dtype == torch.float32:
        return "flash-attn needs fp16 or bf16"
    if cache == "compiled" and args.device.type != "cuda":
        return "transformers compiles the decoding step on CUDA only"
    return None


@torch.no_grad()
def benchmark(args):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        ours, tokenizer = build_ours(args.size, args.dtype, args.device, workdir)
    llama = build_llama({name: getattr(ours.config, name) for name in LLM_DIMS}, args.dtype, args.device)
    bandwidth = copy_bandwidth(args.device, args.repeats)
    weights = {"ours": decode_weight_bytes(ours), "llama": decode_weight_bytes(llama)}
    results, skipped = [], []
    for attention in args.attention:
        for cache in args.caches:
            reason = skip_reason(attention, cache, args)
            if reason:
                skipped.append({"attention": attention, "cache": cache, "reason": reason})
                continue
            ours.set_attn_implementation(attention)
            llama.set_attn_implementation(attention)
            for case in args.cases:
                for batch in args.batch_sizes:
                    result = run_case(ours, tokenizer, llama, case, batch, cache, args)
                    results.append({"attention": attention, **result})
    return {
        "size": args.size, "device": str(args.device), "dtype": str(args.dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats, "decode_steps": args.decode_steps, "copy_bandwidth_bytes_per_s": bandwidth,
        "decode_weight_bytes": weights,
        "decode_bound_tokens_per_s": {name: bandwidth / size for name, size in weights.items()},
        "results": results, "skipped": skipped,
    }  # fmt: skip


def cell(measurement, key, scale=1.0, digits=1):
    value = measurement.get(key)
    return "OOM" if "error" in measurement else "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(report):
    print(f"size {report['size']}, {report['device']} {report['dtype']}, torch {report['torch']}, transformers "
          f"{report['transformers']}, {report['torch_threads']} threads, median of {report['repeats']}, "
          f"{report['decode_steps']} decode steps")
    bound, weights = report["decode_bound_tokens_per_s"], report["decode_weight_bytes"]
    print(f"copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; weights read per decode step: ours "
          f"{weights['ours'] / 2**20:.1f} MiB, llama {weights['llama'] / 2**20:.1f} MiB -> bound {bound['ours']:.0f} "
          f"(ours) / {bound['llama']:.0f} (llama) tokens/s per sequence")
    print("TTFT: ours from the raw image (pre-processing alone in 'prep'), llama from text ids of the same length. "
          "Decode: tokens/s per sequence, and ours as a share of the bound. Peak memory in GiB (CUDA only).")
    print(f"{'case':<13} {'tokens':>6} {'B':>2} {'attention':<17} {'cache':<8} {'prep ms':>8} {'TTFT ours':>10} "
          f"{'llama':>8} {'decode ours':>12} {'llama':>8} {'ratio':>6} {'of bound':>9} {'peak ours':>10} {'llama':>7}")
    for r in report["results"]:
        ours, llama = r["ours"], r["llama"]
        ratio = share = "-"
        if "error" not in ours and "error" not in llama:
            ratio = f"{ours['decode_tokens_per_s'] / llama['decode_tokens_per_s']:.2f}"
            share = f"{ours['decode_tokens_per_s'] / bound['ours']:.0%}"
        print(f"{r['case']:<13} {r['tokens']:>6} {r['batch']:>2} {r['attention']:<17} {r['cache']:<8} "
              f"{r['preprocess_ms']:>8.1f} {cell(ours, 'ttft_ms'):>10} {cell(llama, 'ttft_ms'):>8} "
              f"{cell(ours, 'decode_tokens_per_s'):>12} {cell(llama, 'decode_tokens_per_s'):>8} {ratio:>6} {share:>9} "
              f"{cell(ours, 'peak_bytes', 2**-30, 2):>10} {cell(llama, 'peak_bytes', 2**-30, 2):>7}")
    for s in report["skipped"]:
        print(f"skipped {s['attention']} / {s['cache']}: {s['reason']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=DEFAULTS, default="tiny", help="tiny (CPU smoke) or 7b (the real shapes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    parser.add_argument("--cases", nargs="+", choices=CASES, help="image cases (default per size)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default per size")
    parser.add_argument("--attention", nargs="+", choices=DEFAULTS["7b"]["attention"], help="default per size")
    parser.add_argument("--caches", nargs="+", choices=CACHES, help="default per size")
    parser.add_argument("--decode-steps", type=int, help="tokens timed after the first (default per size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is shown")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))

    report = benchmark(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
