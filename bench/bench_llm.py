"""Benchmark: our InternLM2 decoder with Partial LoRA against transformers' LlamaForCausalLM of the same dimensions.

Run: `python bench/bench_llm.py` (CPU, small) or `python bench/bench_llm.py --size 7b --device cuda`. Random weights,
same dtype, SDPA for both. Prints prefill time (ours with most positions marked as image, as in a 4KHD prompt, and
ours text-only) and greedy decode tokens/s with a KV cache, each with the ratio to Llama and its target.
"""

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from bench_preprocess import median_seconds
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_model_dir  # noqa: E402

PUBLISHED = json.loads((ROOT / "config.json").read_text())
LLM_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
# LLM dimensions, with the prefill length and decode steps run by default. Only the LLM is measured, so the vision
# tower is tiny at every size.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=1024, seq_len=256, decode_steps=32),
    "small": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, seq_len=1024, decode_steps=64),
    "7b": dict(**{name: PUBLISHED[name] for name in LLM_DIMS}, seq_len=4096, decode_steps=128),
}
SHARED_FIELDS = {
    name: PUBLISHED[name] for name in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
IMAGE_FRACTION = 0.9
PREFILL_TARGET = 1.15  # ours / Llama, image-heavy prefill: at most
DECODE_TARGET = 0.95  # ours / Llama, tokens/s: at least

# transformers 5.2x renamed the `past_key_values` argument to `cache`; ours accepts both, Llama only its own.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def build_ours(dims, dtype, device, workdir):
    """Our model through the user's path: our files + config.json in a folder, AutoConfig with remote code."""
    # Partial LoRA ranks scaled with the width, so the branch costs the published share of the FLOPs at every size.
    width_ratio = dims["hidden_size"] / PUBLISHED["hidden_size"]
    ranks, alphas = {}, {}
    for name, rank in PUBLISHED["plora_ranks"].items():
        ranks[name] = max(1, round(rank * width_ratio))
        alphas[name] = ranks[name] * PUBLISHED["plora_alphas"][name] / rank  # the published scale alpha / rank
    config = {**dims, **SHARED_FIELDS, "vision_config": TINY_VISION, "plora_ranks": ranks, "plora_alphas": alphas,
              "image_token_id": dims["vocab_size"] - 1}
    folder = write_model_dir(Path(workdir) / "ours", config)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=True, attn_implementation="sdpa", dtype=dtype
        )
    # Plora_B is what makes the branch non-zero; draw it explicitly so the branch does real work at any init.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "Plora_B" in name:
                parameter.normal_(std=config.initializer_range)
    return model.eval()


def build_llama(dims, dtype, device):
    config = LlamaConfig(**dims, **SHARED_FIELDS, hidden_act="silu", attention_bias=False, mlp_bias=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def synchronized(function, device):
    """`function` followed by a device sync, so the timer sees the GPU work finish."""
    if device.type != "cuda":
        return function

    def run():
        function()
        torch.cuda.synchronize(device)

    return run


def image_mask_for(seq_len, device):
    """(1, T) bool: a short text head and tail around image positions, as a 4KHD prompt lays them out."""
    num_image = int(seq_len * IMAGE_FRACTION)
    start = (seq_len - num_image) // 2
    mask = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
    mask[:, start : start + num_image] = True
    return mask


def decode_loop(model, prompt_ids, steps):
    """Prefill `prompt_ids` once, then a function that decodes `steps` greedy tokens from that same cache."""
    cache = DynamicCache()
    logits = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
    first_token = logits[:, -1:].argmax(-1)  # (1, 1)

    def run():
        generated = cache.get_seq_length() - prompt_ids.shape[1]
        if generated:
            cache.crop(-generated)  # forget the previous run's tokens (a negative count works on 4.57 and 5.x)
        token = first_token
        for _ in range(steps):
            logits = model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache}).logits
            token = logits[:, -1:].argmax(-1)

    return run


@torch.inference_mode()
def benchmark(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    dims = {name: SIZES[args.size][name] for name in LLM_DIMS}
    seq_len = args.seq_len or SIZES[args.size]["seq_len"]
    steps = args.decode_steps or SIZES[args.size]["decode_steps"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        ours = build_ours(dims, dtype, device, workdir)
    llama = build_llama(dims, dtype, device)

    embeds = torch.randn(1, seq_len, dims["hidden_size"], device=device, dtype=dtype) * 0.02  # (1, T, hidden)
    image_mask = image_mask_for(seq_len, device)
    prefill = {
        "ours_image": lambda: ours(inputs_embeds=embeds, image_mask=image_mask, logits_to_keep=1),
        "ours_text": lambda: ours(inputs_embeds=embeds, logits_to_keep=1),
        "llama": lambda: llama(inputs_embeds=embeds, logits_to_keep=1),
    }
    prefill_s = median_seconds([synchronized(f, device) for f in prefill.values()], args.repeats)
    prefill_ms = {name: 1e3 * s for name, s in zip(prefill, prefill_s)}

    prompt_ids = torch.randint(dims["vocab_size"], (1, seq_len), device=device)
    decode_s = median_seconds(
        [synchronized(decode_loop(model, prompt_ids, steps), device) for model in (ours, llama)], args.repeats
    )
    decode_tps = {"ours": steps / decode_s[0], "llama": steps / decode_s[1]}
    return {
        "size": args.size, "dims": dims, "seq_len": seq_len, "image_fraction": IMAGE_FRACTION, "decode_steps": steps,
        "device": str(device), "dtype": args.dtype, "attn_implementation": "sdpa", "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prefill_ms": prefill_ms,
        "prefill_ratio_image": prefill_ms["ours_image"] / prefill_ms["llama"],
        "prefill_ratio_text": prefill_ms["ours_text"] / prefill_ms["llama"],
        "decode_tokens_per_s": decode_tps,
        "decode_ratio": decode_tps["ours"] / decode_tps["llama"],
    }


def print_table(r):
    d = r["dims"]
    print(f"size {r['size']}: hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, layers "
          f"{d['num_hidden_layers']}, heads {d['num_attention_heads']}/{d['num_key_value_heads']} kv, vocab "
          f"{d['vocab_size']}; seq {r['seq_len']}, {r['device']} {r['dtype']}, sdpa, {r['torch_threads']} threads, "
          f"transformers {r['transformers']}, median of {r['repeats']}")
    p, t = r["prefill_ms"], r["decode_tokens_per_s"]
    image_ok = "met" if r["prefill_ratio_image"] <= PREFILL_TARGET else "MISSED"
    decode_ok = "met" if r["decode_ratio"] >= DECODE_TARGET else "MISSED"
    image_label = f"prefill, {r['image_fraction']:.0%} image (ms)"
    print(f"{'':<28} {'ours':>10} {'llama':>10} {'ours/llama':>11}  target")
    print(f"{image_label:<28} {p['ours_image']:>10.1f} {p['llama']:>10.1f} {r['prefill_ratio_image']:>10.3f}x  "
          f"<= {PREFILL_TARGET}x {image_ok}")
    text_ratio = r["prefill_ratio_text"]
    print(f"{'prefill, text only (ms)':<28} {p['ours_text']:>10.1f} {p['llama']:>10.1f} {text_ratio:>10.3f}x")
    print(f"{'decode (tokens/s)':<28} {t['ours']:>10.1f} {t['llama']:>10.1f} {r['decode_ratio']:>10.3f}x  "
          f">= {DECODE_TARGET}x {decode_ok}  ({r['decode_steps']} steps after a {r['seq_len']}-token prompt)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small", help="model dimensions (7b = the real LLM)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--seq-len", type=int, help="prefill length, also the decode prompt (default per size)")
    parser.add_argument("--decode-steps", type=int, help="greedy tokens per decode run (default per size)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs after one warm-up; the median is shown")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    results = benchmark(args)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
