"""Chat with InternLM-XComposer2-4KHD about an image, one-shot or interactively (multi-turn).

    python scripts/chat.py [--model PATH] [--image IMAGE] [--hd-num N] [--query TEXT] [--interactive]

--model (or the IXC_MODEL environment variable) names a folder with the published weights and our files.
Without it a TINY RANDOM model and tokenizer are built locally: the replies are gibberish, but every step
(image tiles, token layout, prompt, generation, streaming) is the real code path.
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from cli import check_model_folder, run  # noqa: E402
from image_processing_4khd import image_token_budget, to_pil_image, validate_hd_num  # noqa: E402

TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "plora_ranks": {"wqkv": 4, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
    "plora_alphas": {"wqkv": 8, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
}  # fmt: skip
CORPUS = [
    "Describe the image. The image shows a document with a title, a table, a bar chart and coloured boxes.",
    "What is in the picture? A page with text and shapes in red, green, orange and blue.",
    "Hello! How can I help you today? Please ask a question about the image.",
]


def build_tiny_model_dir(folder: Path) -> Path:
    """Our code and JSON files, a tiny config, random weights and a tiny sentencepiece tokenizer in `folder`."""
    import sentencepiece as spm

    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.json"), *ROOT.glob("*.jinja")]:
        shutil.copy(path, folder / path.name)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model_file, model_type="bpe", vocab_size=300,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
        user_defined_symbols=[f"[UNUSED_TOKEN_{index}]" for index in range(140, 147)],
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=model_file.getvalue())
    image_token_id = pieces.piece_to_id("[UNUSED_TOKEN_140]")
    config = json.loads((folder / "config.json").read_text())
    config.update(TINY, vocab_size=300, image_token_id=image_token_id)
    (folder / "config.json").write_text(json.dumps(config))
    for name, update in [("processor_config.json", {"image_token_id": image_token_id}),
                         ("preprocessor_config.json", {"image_size": 56, "patch_size": 14})]:  # fmt: skip
        (folder / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **update}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    # The shipped generation settings, with its stop ids (</s> and the turn end) as the tiny vocabulary numbers them;
    # save_pretrained would otherwise write the defaults of the config, which stop on </s> only.
    shipped = json.loads((ROOT / "generation_config.json").read_text())
    stop_ids = [pieces.eos_id(), pieces.piece_to_id("[UNUSED_TOKEN_145]")]
    ids = {"bos_token_id": pieces.bos_id(), "eos_token_id": stop_ids, "pad_token_id": pieces.eos_id()}
    model.generation_config = GenerationConfig(**{**shipped, **ids})
    model.save_pretrained(folder)
    return folder


def answer(model, tokenizer, query, image, history, args):
    """Stream one reply to stdout; returns the reply and the time to its first printed piece."""
    start, first_token_s, printed = time.perf_counter(), None, ""
    options = dict(hd_num=args.hd_num, history=history, max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    for reply in model.stream_chat(tokenizer, query, image=image, **options):
        first_token_s = first_token_s or time.perf_counter() - start
        print(reply[len(printed) :], end="", flush=True)
        printed = reply
    print()
    return printed, first_token_s or time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("IXC_MODEL"), help="folder with real weights (or IXC_MODEL)")
    parser.add_argument("--image", default=str(ROOT / "assets" / "sample_4k.png"))
    parser.add_argument("--hd-num", type=int, default=25)
    parser.add_argument("--query", default="<ImageHere>Describe the image.")
    parser.add_argument("--interactive", action="store_true", help="keep asking follow-up questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    args = parser.parse_args(argv)
    # A bad --hd-num, image or --model fails here, before minutes of loading.
    validate_hd_num(args.hd_num)
    width, height = to_pil_image(args.image).size
    if args.model:
        check_model_folder(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, dtype = Path(args.model), torch.bfloat16
        else:
            print("!!! No --model given: using a TINY RANDOM model. Its replies are random gibberish. !!!")
            folder, dtype = build_tiny_model_dir(Path(tmp)), torch.float32
        device_map = "auto" if torch.cuda.is_available() else None
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

        vision = model.config.vision_config
        rows, cols, tokens = image_token_budget(width, height, args.hd_num, vision.image_size, vision.patch_size)
        print(f"image {args.image}: {width}x{height}, hd_num {args.hd_num} -> {rows} x {cols} crops, {tokens} image tokens")

        history, query = [], args.query
        while True:
            print(f"user: {query}\nassistant: ", end="", flush=True)
            try:
                reply, first_token_s = answer(model, tokenizer, query, args.image, history, args)
            except ValueError as error:
                if not args.interactive:
                    raise
                print(f"\nerror: {error}")  # a bad turn (e.g. too long) keeps the session and its history
            else:
                history = history + [(query, reply)]
                print(f"[time to first token {first_token_s * 1000:.0f} ms on {model.device}]")
            if not args.interactive:
                break
            try:
                query = input("user (empty line to quit): ").strip()
            except EOFError:
                break
            if not query:
                break


if __name__ == "__main__":
    run(main)
