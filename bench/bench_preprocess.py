"""Benchmark: our image processor against the straightforward per-step pipeline of the original code.

Run: `python bench/bench_preprocess.py`. Prints the median time per image, the speed ratio and the largest
difference between the two outputs, which must be zero (at most 1e-6).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_processing_4khd import CLIP_MEAN, CLIP_STD, InternLMXComposer2ImageProcessor, hd_layout  # noqa: E402

CASES = [((3840, 1600), 55), ((1920, 1080), 25)]


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Seeded noise with drawn boxes and lines, so the resize has real work on edges and texture."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.line((x0, y1, x1, y0), fill=(0, 0, 0), width=5)
    return image


def straightforward(image: Image.Image, hd_num: int, size: int) -> torch.Tensor:
    """The original's per-step pipeline: PIL resize and pad, PIL to float tensor, normalise, interpolate, cat."""
    image = image.convert("RGB")
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = int(scale * size)
    new_height = int(new_width / ratio)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    padded_height = int(np.ceil(new_height / size) * size)
    canvas = Image.new("RGB", (new_width, padded_height), (255, 255, 255))
    canvas.paste(image, (0, (padded_height - new_height) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)

    tensor = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float().div(255)  # (3, H, W)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    tensor = tensor.sub(mean).div(std)
    global_view = F.interpolate(tensor[None], size=(size, size), mode="bicubic", align_corners=False)
    _, height, width = tensor.shape
    crops = [
        tensor[:, top : top + size, left : left + size][None]
        for top in range(0, height, size)
        for left in range(0, width, size)
    ]
    return torch.cat([global_view, *crops])


def median_seconds(functions, repeats: int) -> list[float]:
    """Median wall time of each function; the functions take turns, so drift on a busy machine hits all alike."""
    for function in functions:
        function()  # warm-up
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    processor = InternLMXComposer2ImageProcessor()
    size = processor.image_size
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
    print(f"{'image':>11} {'hd_num':>6} {'grid':>6} {'tiles':>5} {'straightforward':>16} {'ours':>9} {'speed-up':>8} "
          f"{'max |diff|':>10}")
    for (width, height), hd_num in CASES:
        image = synthetic_image(width, height)
        layout = hd_layout(width, height, hd_num, size)
        expected = straightforward(image, hd_num, size)
        ours = processor(image, hd_num=hd_num)["pixel_values"]
        if ours.shape != expected.shape:
            raise SystemExit(f"shape mismatch: ours {tuple(ours.shape)} vs straightforward {tuple(expected.shape)}")
        max_diff = (ours - expected).abs().max().item()
        reference_time, our_time = median_seconds(
            [lambda: straightforward(image, hd_num, size), lambda: processor(image, hd_num=hd_num)], args.repeats
        )
        grid = f"{layout.rows}x{layout.cols}"
        print(f"{width:>5}x{height:<5} {hd_num:>6} {grid:>6} {ours.shape[0]:>5} {reference_time * 1e3:>13.1f} ms "
              f"{our_time * 1e3:>6.1f} ms {reference_time / our_time:>7.2f}x {max_diff:>10.2e}")
        if max_diff > 1e-6:
            raise SystemExit(f"outputs differ by {max_diff:.3e} (> 1e-6)")


if __name__ == "__main__":
    main()
