"""Benchmark: how long each refusal of a hostile input takes and how much memory it needs (the project's limit is under
1 s and under 200 MB each).

Run: `python bench/bench_refusals.py [--repeats 3]`. Builds the tiny random model of scripts/chat.py in a temporary
folder, then for each hostile call prints the exception, the slowest of `--repeats` runs, and the growth of the
process's peak resident memory over the resident memory before the call (Linux: the peak is reset through
/proc/self/clear_refs before each call). The last line says whether every case met both limits. The 4000 x 3000
photo at hd_num 1000 uses the real 336 px tiles, where building its tiles would take gigabytes.
"""

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S, MEMORY_LIMIT_MB = 1.0, 200


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def memory_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(call):
    """(exception, seconds, peak resident growth in MB) of one call that must raise."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    before = memory_kb("VmRSS")
    start = time.perf_counter()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - every refusal is measured, whatever its type
        seconds = time.perf_counter() - start
        return error, seconds, (memory_kb("VmHWM") - before) / 1024
    raise AssertionError("the call did not refuse")


def cases(model, tokenizer, processor, folder, files):
    """(name, call) of hostile calls across the categories of docs/limits-and-errors.md."""
    inputs = dict(processor(processor.build_prompt("<ImageHere>Hi"), images=[files / "ok.png"], hd_num=2))
    ids = inputs["input_ids"]
    hd = sys.modules[type(processor.image_processor).__module__]
    real_tiles = type(processor)(
        hd.InternLMXComposer2ImageProcessor(), tokenizer, image_token_id=processor.image_token_id
    )
    photo = Image.new("RGB", (4000, 3000), (90, 90, 90))
    finetune_data = load_script("finetune_data")
    (files / "bad.json").write_text('[{"id": 1,\n "image": }]')
    (files / "data.txt").write_text("bad.json 1e12\n")
    chat = dict(max_new_tokens=2, do_sample=False)
    return [
        ("generate: 1-D ids", lambda: model.generate(ids[0], max_new_tokens=2)),
        ("generate: float ids", lambda: model.generate(ids.float(), max_new_tokens=2)),
        ("generate: id out of vocabulary", lambda: model.generate(ids.clamp(max=10**9) + 10**9, max_new_tokens=2)),
        ("generate: empty ids", lambda: model.generate(ids[:, :0], max_new_tokens=2)),
        ("generate: short attention mask", lambda: model.generate(ids, attention_mask=ids[:, 1:], max_new_tokens=2)),
        ("generate: placeholders, no pixels", lambda: model.generate(ids, max_new_tokens=2)),
        ("generate: float image_grids", lambda: model.generate(**{**inputs, "image_grids": inputs["image_grids"].float()})),
        ("generate: NaN pixels", lambda: model.generate(**{**inputs, "pixel_values": inputs["pixel_values"] * math.nan})),
        ("generate: max_new_tokens 10**9", lambda: model.generate(**inputs, max_new_tokens=10**9)),
        ("forward: float ids", lambda: model(ids.float())),
        ("chat: history None", lambda: model.chat(tokenizer, "Hi", history=None, **chat)),
        ("chat: history pair of 3", lambda: model.chat(tokenizer, "Hi", history=[("a", "b", "c")], **chat)),
        ("chat: bytes query", lambda: model.chat(tokenizer, b"Hi", **chat)),
        ("chat: lone surrogate", lambda: model.chat(tokenizer, "Hi \udc80", **chat)),
        ("chat: max_new_tokens 10**9", lambda: model.chat(tokenizer, "Hi", max_new_tokens=10**9)),
        ("chat: processor as tokenizer", lambda: model.chat(processor, "Hi", **chat)),
        ("chat: EPS image named .png", lambda: model.chat(tokenizer, "Hi", image=str(files / "eps.png"), **chat)),
        ("chat: Git LFS pointer image", lambda: model.chat(tokenizer, "Hi", image=str(files / "lfs.png"), **chat)),
        ("batch_chat: one str query", lambda: model.batch_chat(tokenizer, "Hello", max_new_tokens=2)),
        ("processor: 4000x3000 at hd_num 1000 (336 px tiles)",
         lambda: real_tiles(real_tiles.build_prompt("<ImageHere>Hi"), images=[photo], hd_num=1000, max_length=16000)),
        ("training: two user turns", lambda: processor.training_example(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}])),
        ("training: literal </s> in a question", lambda: processor.training_example(
            [{"role": "user", "content": "x </s> y"}, {"role": "assistant", "content": "z"}])),
        ("training data: bad JSON", lambda: finetune_data.ConversationDataset(
            processor, finetune_data.read_sources(files / "bad.json"), max_length=4096, hd_num=2)),
        ("training data: absurd count", lambda: finetune_data.read_sources(files / "data.txt")),
        ("image: float array", lambda: processor.image_processor(np.zeros((20, 20, 3)))),
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the slowest and largest are shown")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, files = Path(tmp) / "model", Path(tmp) / "files"
        folder.mkdir()
        files.mkdir()
        load_script("chat").build_tiny_model_dir(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        Image.new("RGB", (100, 60), (200, 30, 30)).save(files / "ok.png")
        Image.new("RGB", (40, 30)).save(files / "eps.png", format="EPS")
        (files / "lfs.png").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")

        rows = []
        for name, call in cases(model, tokenizer, processor, folder, files):
            runs = [measure(call) for _ in range(args.repeats)]
            error = runs[0][0]
            rows.append((name, type(error).__name__, max(r[1] for r in runs), max(r[2] for r in runs)))
        width = max(len(row[0]) for row in rows)
        print(f"{'refusal':<{width}}  {'error':<18} {'max s':>7} {'max MB':>7}")
        for name, error, seconds, megabytes in rows:
            print(f"{name:<{width}}  {error:<18} {seconds:7.3f} {megabytes:7.1f}")
        slowest, largest = max(row[2] for row in rows), max(row[3] for row in rows)
        ok = slowest < TIME_LIMIT_S and largest < MEMORY_LIMIT_MB
        print(f"{len(rows)} refusals: slowest {slowest:.3f} s (limit {TIME_LIMIT_S} s), largest peak growth "
              f"{largest:.1f} MB (limit {MEMORY_LIMIT_MB} MB): {'OK' if ok else 'OVER THE LIMIT'}")  # fmt: skip


if __name__ == "__main__":
    main()
