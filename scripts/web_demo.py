"""`make web`: chat with InternLM-XComposer2-4KHD about images in a browser (a Gradio app on 127.0.0.1).

    python scripts/web_demo.py [--model PATH] [--port 7860]

Upload one or more images, pick hd_num (the crop grid, the token cost and the tile layout show before anything is
sent), then chat; the reply streams. Without --model (or IXC_MODEL) a TINY RANDOM model is built: gibberish
replies, real code path. Needs the optional extra: `pip install -r requirements-web.txt` (`make web` does it).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from chat import build_tiny_model_dir  # noqa: E402
from cli import check_model_folder, run  # noqa: E402
from demo import PUBLISHED_TILE, tiny_reply_options  # noqa: E402 - PUBLISHED_TILE: what a real run pays
from image_processing_4khd import image_token_budget, to_pil_image, validate_hd_num  # noqa: E402
from show_layout import draw_layout  # noqa: E402

MAX_HD_NUM = 100  # the slider's range; the published model used 9 to 65


def plan(image_files: list[str], hd_num: int, tile: tuple[int, int]) -> str:
    """Markdown: per image its size, crop grid and token cost at `tile` (and at the published tile, if different)."""
    if not image_files:
        return "No image: upload one or more to see their crop grid and token cost."
    validate_hd_num(hd_num)
    lines = ["| image | size | grid | crops | image tokens |" + (" at 336 px tiles |" if tile != PUBLISHED_TILE else ""),
             "|---|---|---|---|---|" + ("---|" if tile != PUBLISHED_TILE else "")]  # fmt: skip
    total, total_published = 0, 0
    for index, file in enumerate(image_files, start=1):
        width, height = to_pil_image(file).size
        rows, cols, num_tokens = image_token_budget(width, height, hd_num, *tile)
        published = image_token_budget(width, height, hd_num, *PUBLISHED_TILE)[2]
        total, total_published = total + num_tokens, total_published + published
        extra = f" {published} |" if tile != PUBLISHED_TILE else ""
        lines.append(f"| {index} | {width} x {height} | {rows} x {cols} | {rows * cols} + global | {num_tokens} |{extra}")
    summary = f"**{total} image tokens** at hd_num {hd_num}"
    if tile != PUBLISHED_TILE:
        summary += f" with this model's {tile[0]} px tiles ({total_published} with the published model's 336 px tiles)"
    return "\n".join([*lines, "", summary + "."])


def layout_pictures(image_files: list[str], hd_num: int, tile: tuple[int, int], folder: Path) -> list[str]:
    """Draw each image's tile layout (scripts/show_layout.py) into `folder`; returns the picture files."""
    pictures = []
    for index, file in enumerate(image_files):
        drawing, _ = draw_layout(to_pil_image(file), hd_num, *tile, max_width=1200)
        picture = folder / f"layout_{time.time_ns()}_{index}.png"
        drawing.save(picture)
        pictures.append(str(picture))
    return pictures


def turn_query(question: str, history: list[tuple[str, str]], num_images: int, image_token: str) -> str:
    """The query for `chat`: the images go first in the first turn (as the model card writes them) unless the user
    placed `image_token` (`<ImageHere>`) already; later turns pass the same images again and keep them in the first
    turn."""
    placed = image_token in question or any(image_token in past for past, _ in history)
    return question if placed or not num_images else image_token * num_images + question


def build_app(model, tokenizer, generate_options: dict, tiny: bool, folder: Path):
    """The Gradio Blocks app around `model`, which answers with `generate_options`; `folder` holds the layout
    pictures; `tiny` says the model is a tiny random one."""
    import gradio as gr

    vision = model.config.vision_config
    tile = (vision.image_size, vision.patch_size)
    image_token = model.build_processor(tokenizer).image_token

    def files_of(files) -> list[str]:
        return [str(file) for file in files or []]  # Gradio gives a list of paths, or None

    def show_plan(files, hd_num):
        files = files_of(files)
        return plan(files, hd_num, tile), layout_pictures(files, hd_num, tile, folder)

    def new_images(files, hd_num):
        # New images start a new conversation: the history's placeholders belong to the old ones.
        return (*show_plan(files, hd_num), [], [], "")

    def respond(question, files, hd_num, chat_history, messages):
        files = files_of(files)
        if not question.strip():
            raise gr.Error("Type a question first.")
        query = turn_query(question, chat_history, len(files), image_token)
        messages = [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        start, first_piece_s, reply = time.perf_counter(), None, ""
        options = dict(hd_num=int(hd_num), **generate_options)
        try:
            for reply in model.stream_chat(tokenizer, query, image=files or None, history=chat_history,
                                           do_sample=False, **options):  # fmt: skip
                if reply and first_piece_s is None:
                    first_piece_s = time.perf_counter() - start
                messages[-1]["content"] = reply
                yield "", messages, chat_history, "streaming..."
        except ValueError as error:  # e.g. too many image tokens: the message names the hd_num that fits
            raise gr.Error(str(error)) from error
        total_s = time.perf_counter() - start
        status = f"time to first token {(first_piece_s or total_s) * 1000:.0f} ms, whole reply {total_s:.2f} s"
        yield "", messages, [*chat_history, (query, reply)], status

    with gr.Blocks(title="InternLM-XComposer2-4KHD") as app:
        gr.Markdown(
            "## InternLM-XComposer2-4KHD\n"
            + ("**Tiny random model: the replies are gibberish**, every step is the real code path. "
               "Start with `--model PATH` for the published weights.\n" if tiny else "")  # fmt: skip
        )
        chat_history = gr.State([])  # (query, reply) pairs, as `chat` takes them
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
                hd_num = gr.Slider(1, MAX_HD_NUM, value=model.config.hd_num, step=1, label="hd_num (maximum crops)",
                                   elem_id="hd-num")  # fmt: skip
                cost = gr.Markdown(plan([], model.config.hd_num, tile), elem_id="plan")
                layouts = gr.Gallery(label="Tile layout", columns=1, elem_id="layout")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=480)
                question = gr.Textbox(label="Question", placeholder="Ask about the images", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("", elem_id="status")

        files.change(new_images, [files, hd_num], [cost, layouts, chatbot, chat_history, status])
        hd_num.change(show_plan, [files, hd_num], [cost, layouts], trigger_mode="always_last")
        for trigger in (send.click, question.submit):
            trigger(respond, [question, files, hd_num, chat_history, chatbot], [question, chatbot, chat_history, status])
        clear.click(lambda: ([], [], ""), None, [chatbot, chat_history, status])
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("IXC_MODEL"), help="folder with real weights (or IXC_MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio as gr
    except ImportError:
        sys.exit("error: the web demo needs Gradio: run `make web`, or `pip install -r requirements-web.txt`.")
    if args.model:
        check_model_folder(args.model)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.model:
            folder, dtype = Path(args.model), torch.bfloat16
        else:
            folder, dtype = build_tiny_model_dir(scratch), torch.float32
        device_map = "auto" if torch.cuda.is_available() else None
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        (scratch / "layouts").mkdir()
        options = {"max_new_tokens": args.max_new_tokens} if args.model else tiny_reply_options(tokenizer, 24)
        app = build_app(model, tokenizer, options, not args.model, scratch / "layouts")
        # System fonts: the default theme would fetch its fonts from the web.
        theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
        app.queue().launch(server_name=args.host, server_port=args.port, theme=theme, footer_links=[],
                           allowed_paths=[str(scratch / "layouts")])  # fmt: skip


if __name__ == "__main__":
    run(main)
