"""Draw what the 4KHD model sees of an image: the padded HD image cut into crops, and the global view.

Usage: python scripts/show_layout.py IMAGE [--hd-num 55] [--image-size 336] [--patch-size 14] [-o layout.png]
Prints the sizes, the crop grid and the token count, and writes a picture of them.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import run  # noqa: E402
from image_processing_4khd import (  # noqa: E402
    InternLMXComposer2ImageProcessor,
    hd_layout,
    hd_transform,
    num_image_tokens,
    to_pil_image,
    tokens_per_side,
)

GRID_COLOUR = (220, 30, 30)
CONTENT_COLOUR = (30, 90, 220)
MARGIN = 24


def global_view_image(processor: InternLMXComposer2ImageProcessor, image: Image.Image, hd_num: int) -> Image.Image:
    """The processor's global view (tile 0), un-normalised back to an RGB picture."""
    global_view = processor(image, hd_num=hd_num)["pixel_values"][0]  # (3, S, S)
    mean = torch.tensor(processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_std)[:, None, None]
    pixels = (global_view * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (S, S, 3)


def draw_layout(image: Image.Image, hd_num: int, image_size: int, patch_size: int, max_width: int):
    """Return the drawing and the facts it shows (a list of caption lines)."""
    processor = InternLMXComposer2ImageProcessor(image_size=image_size, patch_size=patch_size, hd_num=hd_num)
    layout = hd_layout(*image.size, hd_num, image_size)
    num_tokens = num_image_tokens(layout.rows, layout.cols, tokens_per_side(image_size, patch_size))
    facts = [
        f"original {image.width} x {image.height}, hd_num {hd_num}, tile {image_size} px",
        f"resized to {layout.resized_width} x {layout.resized_height}"
        + (" (portrait: resized while transposed, then transposed back)" if layout.transposed else ""),
        f"padded with white to {layout.padded_width} x {layout.padded_height}",
        f"grid {layout.rows} rows x {layout.cols} cols = {layout.rows * layout.cols} crops (+1 global view)",
        f"{num_tokens} image tokens in the language model",
    ]

    # Left: the padded HD image, scaled to fit beside the global view; right: the global view at its own size.
    padded = hd_transform(image, hd_num, image_size)
    panel_width = max_width - image_size - 3 * MARGIN
    scale = min(1.0, panel_width / padded.width, 1000 / padded.height)
    shown = padded.resize((max(1, round(padded.width * scale)), max(1, round(padded.height * scale))), Image.LANCZOS)

    font = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=max(10, min(28, round(image_size * scale / 5))))
    line_height = 30
    legend = "red: crops, numbered by their index in pixel_values; blue: the resized image, white padding around it"
    caption = [*facts, legend]
    caption_top = MARGIN + max(shown.height, image_size + line_height) + MARGIN
    text_width = max(font.getlength(line) for line in caption)
    width = max(shown.width + image_size + 3 * MARGIN, round(text_width) + 2 * MARGIN)
    canvas = Image.new("RGB", (width, caption_top + line_height * len(caption) + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    left, top = MARGIN, MARGIN
    canvas.paste(shown, (left, top))

    content_left, content_top = layout.offset
    draw.rectangle(
        (
            left + content_left * scale,
            top + content_top * scale,
            left + (content_left + layout.resized_width) * scale - 1,
            top + (content_top + layout.resized_height) * scale - 1,
        ),
        outline=CONTENT_COLOUR,
        width=2,
    )
    tile = image_size * scale
    for row in range(layout.rows + 1):
        draw.line((left, top + row * tile, left + shown.width, top + row * tile), fill=GRID_COLOUR, width=2)
    for col in range(layout.cols + 1):
        draw.line((left + col * tile, top, left + col * tile, top + shown.height), fill=GRID_COLOUR, width=2)
    # Crops are numbered as their position in pixel_values: tile 0 is the global view, crops follow row-major.
    for row in range(layout.rows):
        for col in range(layout.cols):
            x, y = left + col * tile + 4, top + row * tile + 3
            label = str(1 + row * layout.cols + col)
            draw.rectangle(draw.textbbox((x, y), label, font=small), fill="white")
            draw.text((x, y), label, fill=GRID_COLOUR, font=small)

    global_left = left + shown.width + MARGIN
    draw.text((global_left, top), "tile 0: global view", fill="black", font=font)
    canvas.paste(global_view_image(processor, image, hd_num), (global_left, top + line_height))
    for index, line in enumerate(caption):
        draw.text((MARGIN, caption_top + index * line_height), line, fill="black", font=font)
    return canvas, facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="path to an image file")
    parser.add_argument("--hd-num", type=int, default=25, help="maximum number of crops (default 25)")
    parser.add_argument("--image-size", type=int, default=336, help="tile size, the CLIP input (default 336)")
    parser.add_argument("--patch-size", type=int, default=14, help="CLIP patch size (default 14)")
    parser.add_argument("--max-width", type=int, default=1600, help="width of the drawing in pixels")
    parser.add_argument("-o", "--output", default="layout.png", help="where to write the drawing")
    args = parser.parse_args()

    image = to_pil_image(args.image)
    drawing, facts = draw_layout(image, args.hd_num, args.image_size, args.patch_size, args.max_width)
    drawing.save(args.output, optimize=True)
    print("\n".join(facts))
    print(f"wrote {args.output} ({drawing.width} x {drawing.height})")


if __name__ == "__main__":
    run(main)
