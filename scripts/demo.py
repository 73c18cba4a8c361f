"""`make demo`: one image through the whole model, step by step, explaining what each step shows.

    python scripts/demo.py [--model PATH] [--image IMAGE] [--hd-num N] [--query TEXT] [--keep DIR]

Without --model (or the IXC_MODEL environment variable) a TINY RANDOM model and tokenizer are built locally: the
reply is gibberish, but every step (crop grid, token count, prompt ids, streaming) is the real code path.
--keep DIR keeps that tiny model folder, so the README's snippets can be tried on it (`path = "DIR"`).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from chat import build_tiny_model_dir  # noqa: E402
from cli import check_model_folder, run  # noqa: E402
from image_processing_4khd import image_token_budget, to_pil_image, tokens_per_side, validate_hd_num  # noqa: E402
from show_layout import draw_layout  # noqa: E402

# The published model's vision tower: 336 px tiles of 14 px patches (docs/model.md section 1).
PUBLISHED_TILE = (336, 14)
PREVIEW_CHARS = 48


def heading(number: int, title: str):
    print(f"\n== {number}. {title} ==")


def token_budget_table(width: int, height: int, hd_num: int, model_tile: tuple[int, int] | None) -> list[str]:
    """Lines giving the image's cost at the published tile size and, unless `model_tile` is `None`, at this model's
    (a tiny model has the same grid but smaller tiles, so far fewer tokens)."""
    tiles = [("published model", *PUBLISHED_TILE)] + ([("this model", *model_tile)] if model_tile else [])
    lines = [f"{'':18}{'tile':>8}{'tokens per tile side':>22}{'image tokens':>14}"]
    for name, image_size, patch_size in tiles:
        num_tokens = image_token_budget(width, height, hd_num, image_size, patch_size)[2]
        side = tokens_per_side(image_size, patch_size)
        lines.append(f"{name:18}{image_size:>6} px{side:>22}{num_tokens:>14}")
    return lines


def prompt_runs(input_ids: list[int], tokenizer, image_token_id: int) -> list[tuple[str, int, str]]:
    """Split prompt ids into runs: `(kind, number of ids, preview)` with kind BOS, IMAGE or text."""
    runs = []
    for token_id in input_ids:
        kind = "BOS" if token_id == tokenizer.bos_token_id else "IMAGE" if token_id == image_token_id else "text"
        if runs and runs[-1][0] == kind and kind != "BOS":
            runs[-1][1].append(token_id)
        else:
            runs.append((kind, [token_id]))
    described = []
    for kind, ids in runs:
        if kind == "text":
            text = tokenizer.decode(ids)
            preview = text if len(text) <= PREVIEW_CHARS else f"{text[:20]} ... {text[-(PREVIEW_CHARS - 25):]}"
            described.append((kind, len(ids), repr(preview)))
        else:
            described.append((kind, len(ids), f"id {ids[0]}"))
    return described


def tiny_reply_options(tokenizer, length: int) -> dict:
    """`generate` options that make a tiny random model's reply visible: it often picks a stop id at once and strings
    byte-fallback pieces into invalid UTF-8 (which a streamer holds back to the very end). So: exactly `length` new
    tokens, no byte pieces or reserved `[UNUSED_TOKEN_N]` pieces (turn markers, the image placeholder), no repeated
    pairs. Real weights never get these."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    unreadable = [index for index, piece in enumerate(pieces) if piece.startswith(("<0x", "[UNUSED_TOKEN_"))]
    return {"min_new_tokens": length, "max_new_tokens": length, "suppress_tokens": unreadable, "no_repeat_ngram_size": 2}


def stream_reply(model, tokenizer, query: str, image, hd_num: int, **generate_kwargs):
    """Print the reply as it streams; returns it with the time to its first piece and the total time, in seconds."""
    start, first_piece_s, printed = time.perf_counter(), None, ""
    print("assistant: ", end="", flush=True)
    options = dict(hd_num=hd_num, do_sample=False, **generate_kwargs)
    for reply in model.stream_chat(tokenizer, query, image=image, **options):
        if reply != printed and first_piece_s is None:
            first_piece_s = time.perf_counter() - start
        print(reply[len(printed) :], end="", flush=True)
        printed = reply
    total_s = time.perf_counter() - start
    print()
    return printed, first_piece_s or total_s, total_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("IXC_MODEL"), help="folder with real weights (or IXC_MODEL)")
    parser.add_argument("--image", default=str(ROOT / "assets" / "sample_4k.png"))
    parser.add_argument("--hd-num", type=int, default=25, help="maximum number of crops (default 25)")
    parser.add_argument("--query", default="<ImageHere>Describe the image.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--keep", metavar="DIR", help="build the tiny model in DIR and keep it (must be new or empty)")
    parser.add_argument("--layout", metavar="FILE", help="where to write the layout picture (default: out/demo/)")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()  # the loading bars of a tiny model would bury the lines that teach something
    validate_hd_num(args.hd_num)
    image = to_pil_image(args.image)  # a bad image fails here, before anything is built or loaded
    if args.model:
        check_model_folder(args.model)
    if args.keep and args.model:
        raise ValueError("--keep keeps the tiny model; it has no meaning with --model. Drop one of them.")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise FileExistsError(f"--keep {args.keep!r} is not empty; name a new or empty folder for the tiny model.")

    with tempfile.TemporaryDirectory() as scratch:
        heading(1, "The model")
        if args.model:
            folder, dtype = Path(args.model), torch.bfloat16
            print(f"loading the weights in {folder} (bf16)")
        else:
            folder, dtype = Path(args.keep or scratch), torch.float32
            folder.mkdir(parents=True, exist_ok=True)
            print(f"No --model given: building a TINY RANDOM model in {folder}.")
            print("Its reply is random word pieces (we keep it from bytes and markers); every step is real.")
            build_tiny_model_dir(folder)
        device_map = "auto" if torch.cuda.is_available() else None
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        vision = model.config.vision_config
        tile = (vision.image_size, vision.patch_size)
        print(f"{model.config.num_hidden_layers} decoder layers, hidden {model.config.hidden_size}, "
              f"{vision.image_size} px tiles, {sum(p.numel() for p in model.parameters()):,} parameters on {model.device}")  # fmt: skip

        heading(2, "The crop grid")
        rows, cols, _ = image_token_budget(*image.size, args.hd_num, *tile)
        print(f"{args.image}: {image.width} x {image.height}, hd_num {args.hd_num} (at most {args.hd_num} crops)")
        print(f"-> {rows} rows x {cols} cols = {rows * cols} crops, plus 1 global view of the whole image")
        print("The grid depends only on the aspect ratio and hd_num, not on the tile size.")

        heading(3, "The token budget")
        print("\n".join(token_budget_table(*image.size, args.hd_num, None if tile == PUBLISHED_TILE else tile)))
        print("Per image: global view + separator + the crops, with a newline token after every row of tokens.")
        print("Ask before sending: processor.image_processor.token_budget(width, height, hd_num) -> (rows, cols, tokens)")

        heading(4, "The prompt layout")
        processor = model.build_processor(tokenizer, args.hd_num)
        prompt = processor.build_prompt(args.query)
        input_ids = processor(prompt, images=[image], hd_num=args.hd_num)["input_ids"][0].tolist()
        for kind, count, preview in prompt_runs(input_ids, tokenizer, model.config.image_token_id):
            print(f"  {kind:6}{count:>6} ids  {preview}")
        print(f"  total {len(input_ids)} ids. Every text segment starts with its own BOS, as in the original chat.")

        heading(5, "The layout picture")
        layout_file = Path(args.layout or (Path(args.keep) if args.keep else ROOT / "out" / "demo") / "layout.png")
        layout_file.parent.mkdir(parents=True, exist_ok=True)
        drawing, _ = draw_layout(image, args.hd_num, *tile, max_width=1600)
        drawing.save(layout_file, optimize=True)
        print(f"wrote {layout_file}: the padded image cut into crops, and the global view")
        if tile != PUBLISHED_TILE:
            print(f"(at the published tile size: python scripts/show_layout.py {args.image} --hd-num {args.hd_num})")

        heading(6, "The streamed reply")
        print(f"user: {args.query}")
        options = {"max_new_tokens": args.max_new_tokens}
        options = options if args.model else tiny_reply_options(tokenizer, args.max_new_tokens)
        _, first_piece_s, total_s = stream_reply(model, tokenizer, args.query, image, args.hd_num, **options)
        print(f"time to first token {first_piece_s * 1000:.0f} ms (pre-processing, vision tower and prefill of "
              f"{len(input_ids)} ids on {model.device}); whole reply {total_s:.2f} s")  # fmt: skip

    heading(7, "Next")
    if args.keep:
        print(f"The tiny model stays in {args.keep}: set path = {args.keep!r} in the README's snippets to try them.")
    model_path = args.model or "PATH"
    if not args.model:
        print("With the published weights (PATH: a folder holding them and this repository's files, see README):")
        print(f"  python scripts/demo.py --model {model_path} --hd-num 55     (or: make demo MODEL={model_path})")
    print(f"  python scripts/chat.py --model {model_path} --interactive   (a multi-turn chat in the terminal)")
    print(f"  make web MODEL={model_path}                                 (the same in a browser)")


if __name__ == "__main__":
    run(main)
