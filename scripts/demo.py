"""Run one image through the whole model: image processor -> CLIP tiles -> global-local tokens -> decoder -> a few
greedy tokens. Without --model it builds a tiny RANDOM model locally (answers are meaningless; this checks
the machinery). With --model PATH it loads real weights from PATH (our code and config beside them).

    python scripts/demo.py [IMAGE] [--hd-num N] [--model PATH]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from image_processing_4khd import num_image_tokens, tokens_per_side  # noqa: E402

TINY = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "image_token_id": 200,
    "plora_ranks": {"wqkv": 4, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
    "plora_alphas": {"wqkv": 8, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
}  # fmt: skip


def build_tiny_model_dir(folder: Path) -> Path:
    """Our code + a tiny config + random weights + a matching image processor config, in `folder`."""
    for path in ROOT.glob("*.py"):
        shutil.copy(path, folder / path.name)
    shipped = json.loads((ROOT / "config.json").read_text())
    config = {"auto_map": shipped["auto_map"], "model_type": shipped["model_type"], **TINY}
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((ROOT / "preprocessor_config.json").read_text())
    processor.update(image_size=TINY["vision_config"]["image_size"], patch_size=TINY["vision_config"]["patch_size"])
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", default=str(ROOT / "assets" / "sample_4k.png"))
    parser.add_argument("--hd-num", type=int, default=16)
    parser.add_argument("--model", help="folder with real weights, our code and config (default: tiny random model)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, dtype = Path(args.model), torch.bfloat16
        else:
            print("!!! No --model given: building a TINY RANDOM model. Its tokens are meaningless. !!!")
            folder, dtype = build_tiny_model_dir(Path(tmp)), torch.float32
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        config = model.config

        start = time.perf_counter()
        images = processor(args.image, hd_num=args.hd_num)
        rows, cols = images["image_grids"][0].tolist()
        tps = tokens_per_side(config.vision_config.image_size, config.vision_config.patch_size)
        num_tokens = num_image_tokens(rows, cols, tps)
        prompt = [config.bos_token_id] + [config.image_token_id] * num_tokens + [config.bos_token_id]
        input_ids = torch.tensor([prompt], device=device)
        pixel_values = images["pixel_values"].to(device=device, dtype=dtype)
        image_grids = images["image_grids"].to(device)
        with torch.no_grad():
            first = model(input_ids, pixel_values=pixel_values, image_grids=image_grids, logits_to_keep=1)
        first_token_s = time.perf_counter() - start
        with torch.no_grad():
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                image_grids=image_grids, do_sample=False,
                max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
            )  # fmt: skip

    print(f"image: {args.image}  hd_num {args.hd_num}  grid {rows} x {cols}  -> {num_tokens} image tokens")
    print(f"prompt length {input_ids.shape[1]}, time to first token {first_token_s * 1000:.0f} ms on {device}")
    print(f"first token id {int(first.logits[0, -1].argmax())}; greedy ids {output[0, input_ids.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
