"""Throughput of N image requests served by vLLM (the plugin in serving/vllm) against our own batched `generate`
(what `batch_chat` runs) on the same prompts and images, in the same run.

    .venv-vllm/bin/python bench/bench_serving.py                      # tiny random model on CPU (make bench-serving)
    python bench/bench_serving.py --model PATH --dtype bfloat16       # real weights, where vLLM has a GPU

Both sides generate exactly --max-new-tokens per request (vLLM ignores EOS, generate has no stop id), greedily, so
tokens/s compare like for like. Each side is timed --repeats times after a warm-up and its fastest round counts (the
other rounds only measure what else the machine was doing). Prints requests/s and generated tokens/s of each and
their ratio.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]


def make_images(count, tile):
    """`count` deterministic images of different shapes (wide, tall, square), a few tiles each."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    shapes = [(4 * tile, 2 * tile), (tile, 3 * tile), (2 * tile, 2 * tile)]
    images = []
    for index in range(count):
        width, height = shapes[index % len(shapes)]
        pixels = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def time_vllm(folder, prompts, images, args):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder), trust_remote_code=True, tokenizer_mode="internlm_xcomposer2", dtype=args.dtype,
        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=0, enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
    requests = [
        {"prompt": prompt, "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"hd_num": args.hd_num}}
        for prompt, image in zip(prompts, images)
    ]
    llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        timings.append(time.perf_counter() - start)
    return min(timings), sum(len(output.outputs[0].token_ids) for output in outputs)


def time_generate(folder, prompts, images, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pad = processor.tokenizer.pad_token_id

    @torch.no_grad()
    def run(batch_prompts, batch_images):
        inputs = processor(batch_prompts, images=[[image] for image in batch_images], hd_num=args.hd_num).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        output = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=None,
        )  # fmt: skip
        return output[:, inputs["input_ids"].shape[1] :].numel()

    run(prompts[:1], images[:1])  # warm-up
    timings = []
    for _ in range(args.repeats):
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(prompts), args.batch_size):
            tokens += run(prompts[first : first + args.batch_size], images[first : first + args.batch_size])
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return min(timings), tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder with real weights (default: a tiny random model, CPU)")
    parser.add_argument("--requests", type=int, default=16, help="image requests, all submitted at once")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate() call on our side")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hd-num", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="float32 (tiny default) or bfloat16 (--model default)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45, help="vLLM's share; ours loads beside it")
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side; the fastest is reported")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
            args.dtype = args.dtype or "bfloat16"
            args.max_model_len = args.max_model_len or 8192
        else:
            sys.path.insert(0, str(ROOT / "serving" / "vllm" / "tests"))
            from tiny import build_tiny_model_dir

            folder = build_tiny_model_dir(Path(tmp) / "tiny")
            args.dtype = args.dtype or "float32"
            args.max_model_len = args.max_model_len or 512
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        tile = AutoConfig.from_pretrained(folder, trust_remote_code=True).vision_config.image_size
        prompts = [processor.build_prompt("<ImageHere>Describe the image.", meta_instruction="")] * args.requests
        images = make_images(args.requests, tile)

        # Ours first: vLLM's CPU worker pins the process's OpenMP threads when it starts.
        ours_seconds, ours_tokens = time_generate(folder, prompts, images, args)
        vllm_seconds, vllm_tokens = time_vllm(folder, prompts, images, args)

    print(f"{args.requests} image requests, hd_num {args.hd_num}, {args.max_new_tokens} new tokens each, {args.dtype}")
    print(f"{'':22}{'requests/s':>12}{'tokens/s':>12}")
    for name, seconds, tokens in [
        ("vLLM (plugin)", vllm_seconds, vllm_tokens),
        (f"generate, batch {args.batch_size}", ours_seconds, ours_tokens),
    ]:
        print(f"{name:22}{args.requests / seconds:12.2f}{tokens / seconds:12.1f}")
    print(f"vLLM / generate throughput ratio: {ours_seconds / vllm_seconds:.2f}x")


if __name__ == "__main__":
    main()
