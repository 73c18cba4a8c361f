"""Tests for image_processing_4khd.py: the grid rule, pixels, token counts, inputs and loading.

Every expected value comes from an independent implementation written here from docs/model.md sections 4 and 5.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_file
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TINY_TILE = 56  # the tiny CLIP of conftest: 56 / 14 = 4 patches, 2 tokens per side after the 2x2 merge


@pytest.fixture(scope="module")
def hd():
    """The root module, imported by path (for the pure functions; loading through Auto is tested below)."""
    return load_file("image_processing_4khd.py")


# ---- independent references, straight from docs/model.md section 4 ----


def reference_grid(width, height, hd_num, tile):
    """(rows, cols, resized (w, h), padded (w, h)) by enumerating every candidate scale."""
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = max(s for s in range(1, hd_num + 1) if s * math.ceil(s / ratio) <= hd_num)
    new_long = scale * tile
    # The original crashes on a zero-pixel short side; ours keeps one pixel row (documented deviation).
    new_short = max(int(new_long / ratio), 1)
    padded_short = math.ceil(new_short / tile) * tile
    if width >= height:
        return padded_short // tile, scale, (new_long, new_short), (new_long, padded_short)
    return scale, padded_short // tile, (new_short, new_long), (padded_short, new_long)


def reference_padded_canvas(image, hd_num, tile):
    """docs/model.md section 4, steps 1-5 with plain PIL calls: the padded RGB canvas."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    _, _, (new_w, new_h), (_, padded_h) = reference_grid(image.width, image.height, hd_num, tile)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(image, (0, (padded_h - new_h) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def reference_padded(image, hd_num, tile):
    """docs/model.md section 4, step 6 in numpy float32: (3, H, W) normalised padded image."""
    pixels = np.asarray(reference_padded_canvas(image, hd_num, tile)).astype(np.float32) / 255
    pixels = (pixels - CLIP_MEAN) / CLIP_STD  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def count_tokens_by_enumeration(rows, cols, tokens_per_side):
    """Lay out docs/model.md section 5, steps 4-6 token by token and count."""
    sequence = []
    for _ in range(tokens_per_side):  # global view: each row, then a newline
        sequence += ["global"] * tokens_per_side + ["newline"]
    sequence.append("separator")
    for _ in range(tokens_per_side * rows):  # stitched crops: each row, then a newline
        sequence += ["local"] * (tokens_per_side * cols) + ["newline"]
    return len(sequence)


def sample_image(width, height, seed=0):
    """Seeded noise with drawn shapes, so the resize meets both texture and hard edges."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 5, height // 4, width // 2, height // 2), fill=(200, 30, 60))
    draw.line((0, height - 1, width - 1, 0), fill=(0, 0, 0), width=3)
    return image


def with_mode(image, mode):
    if mode == "P":
        return image.quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    if mode == "I;16":
        grey = np.asarray(image.convert("L")).astype(np.uint16) * 3  # values beyond 255 too
        return Image.fromarray(grey)
    return image.convert(mode)


# ---- the grid rule ----


def test_grid_rule_matches_enumeration_on_random_sizes(hd):
    rng = np.random.default_rng(1234)
    sizes = [(1, 1), (1, 10000), (10000, 1), (336, 336), (1920, 1080), (1080, 1920), (3840, 1600)]
    sizes += [tuple(int(v) for v in np.exp(rng.uniform(0, np.log(10000), 2))) for _ in range(3000)]
    for index, (width, height) in enumerate(sizes):
        hd_num = index % 100 + 1
        layout = hd.hd_layout(width, height, hd_num, 336)
        rows, cols, resized, padded = reference_grid(width, height, hd_num, 336)
        assert (layout.rows, layout.cols) == (rows, cols), (width, height, hd_num)
        assert (layout.resized_width, layout.resized_height) == resized
        assert (layout.padded_width, layout.padded_height) == padded == (cols * 336, rows * 336)
        assert layout.transposed == (width < height)
        assert 1 <= rows * cols <= hd_num


def test_grid_examples_from_the_model_facts(hd):
    assert hd.image_token_budget(1920, 1080, 25) == (4, 6, 3661)
    assert hd.image_token_budget(3840, 1600, 55) == (5, 11, 8137)
    layout = hd.hd_layout(1920, 1080, 25, 336)
    assert (layout.resized_width, layout.resized_height, layout.padded_height) == (2016, 1134, 1344)
    assert layout.offset == (0, 105)
    portrait = hd.hd_layout(1080, 1920, 25, 336)
    assert (portrait.rows, portrait.cols, portrait.offset) == (6, 4, (105, 0))


def test_extremely_thin_image_keeps_one_pixel_row(hd):
    layout = hd.hd_layout(10000, 1, 25, 336)
    assert (layout.rows, layout.cols, layout.resized_width, layout.resized_height) == (1, 25, 8400, 1)
    layout = hd.hd_layout(1, 10000, 25, 336)
    assert (layout.rows, layout.cols, layout.resized_width, layout.resized_height) == (25, 1, 1, 8400)


# ---- token counts ----


@pytest.mark.parametrize("tokens_per_side", [1, 2, 12])
def test_num_image_tokens_equals_enumerated_layout(hd, tokens_per_side):
    for rows in range(1, 13):
        for cols in range(1, 13):
            expected = count_tokens_by_enumeration(rows, cols, tokens_per_side)
            assert hd.num_image_tokens(rows, cols, tokens_per_side) == expected


def test_tokens_per_side(hd):
    assert hd.tokens_per_side(336, 14) == 12
    assert hd.tokens_per_side(TINY_TILE, 14) == 2
    with pytest.raises(ValueError, match="even integer"):
        hd.tokens_per_side(42, 14)  # 3 patches: no 2x2 merge
    with pytest.raises(ValueError, match="even integer"):
        hd.tokens_per_side(100, 14)


def test_token_budget_with_tiny_tiles(hd):
    rows, cols, num_tokens = hd.image_token_budget(1920, 1080, 25, image_size=TINY_TILE, patch_size=14)
    layout = hd.hd_layout(1920, 1080, 25, TINY_TILE)
    assert (rows, cols) == (layout.rows, layout.cols) == (4, 6)
    assert num_tokens == count_tokens_by_enumeration(4, 6, 2) == 4 * 25 + 1 + 2 * 5


# ---- pixels ----


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
@pytest.mark.parametrize("size", [(230, 130), (130, 230)], ids=["landscape", "portrait"])
def test_pixels_match_reference_pipeline(hd, mode, size):
    image = with_mode(sample_image(*size), mode)
    assert image.mode == mode
    hd_num = 7
    processor = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE, hd_num=hd_num)
    output = processor(image)
    pixel_values, grid = output["pixel_values"], output["image_grids"]
    expected = reference_padded(image, hd_num, TINY_TILE)  # (3, H, W)
    rows, cols = expected.shape[1] // TINY_TILE, expected.shape[2] // TINY_TILE
    assert grid.tolist() == [[rows, cols]] and grid.dtype == torch.int64
    assert pixel_values.shape == (1 + rows * cols, 3, TINY_TILE, TINY_TILE)
    assert pixel_values.dtype == torch.float32

    # The contract is a max abs diff <= 1e-6; the processor does the same float32 operations as the
    # reference, so the values are in fact bit-identical, and asserting that catches reordered arithmetic.
    global_view = F.interpolate(expected[None], size=(TINY_TILE, TINY_TILE), mode="bicubic", align_corners=False)
    assert (pixel_values[0] - global_view[0]).abs().max().item() == 0
    for row in range(rows):
        for col in range(cols):
            crop = expected[:, row * TINY_TILE : (row + 1) * TINY_TILE, col * TINY_TILE : (col + 1) * TINY_TILE]
            assert (pixel_values[1 + row * cols + col] - crop).abs().max().item() == 0, (row, col)


@pytest.mark.parametrize("size", [(500, 300), (300, 500)], ids=["landscape", "portrait"])
def test_pixels_match_reference_at_full_tile_size(hd, size):
    image = sample_image(*size, seed=3)
    pixel_values = hd.InternLMXComposer2ImageProcessor()(image, hd_num=6)["pixel_values"]
    expected = reference_padded(image, 6, 336)
    rows, cols = expected.shape[1] // 336, expected.shape[2] // 336
    crops = expected.view(3, rows, 336, cols, 336).permute(1, 3, 0, 2, 4).reshape(-1, 3, 336, 336)
    global_view = F.interpolate(expected[None], size=(336, 336), mode="bicubic", align_corners=False)
    assert (pixel_values - torch.cat([global_view, crops])).abs().max().item() == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
@pytest.mark.parametrize("size", [(230, 130), (130, 230), (97, 97)], ids=["landscape", "portrait", "square"])
def test_hd_transform_equals_reference_canvas(hd, mode, size):
    image = with_mode(sample_image(*size, seed=5), mode)
    ours = hd.hd_transform(image, 9, TINY_TILE)
    expected = reference_padded_canvas(image, 9, TINY_TILE)
    assert ours.mode == "RGB" and ours.size == expected.size
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_padding_is_normalised_white(hd):
    layout = hd.hd_layout(250, 101, 3, TINY_TILE)
    top = layout.offset[1]
    bottom = layout.padded_height - layout.resized_height - top
    # Resized to 112 x 45, padded to 56 rows: the odd padding row goes to the bottom.
    assert (layout.rows, layout.cols, top, bottom) == (1, 2, 5, 6)
    crops = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE)(sample_image(250, 101), hd_num=3)
    crops = crops["pixel_values"][1:]
    white = torch.from_numpy((np.float32(1.0) - CLIP_MEAN) / CLIP_STD)[None, :, None, None]
    assert torch.equal(crops[:, :, :top], white.expand_as(crops[:, :, :top]))
    assert torch.equal(crops[:, :, -bottom:], white.expand_as(crops[:, :, -bottom:]))
    assert not torch.equal(crops[:, :, top], white[:, :, 0].expand_as(crops[:, :, top]))


# ---- inputs ----


def test_input_kinds_give_identical_pixels(hd, tmp_path):
    image = sample_image(150, 90, seed=7)
    path = tmp_path / "image.png"
    image.save(path)
    array = np.array(image)
    processor = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE, hd_num=5)
    expected = processor(image)["pixel_values"]
    lazily_opened = Image.open(path)  # pixels not read yet
    inputs = [str(path), path, lazily_opened, array, torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array)]
    for kind in inputs:
        assert torch.equal(processor(kind)["pixel_values"], expected), type(kind)

    grey = image.convert("L")
    grey_array = np.array(grey)
    expected_grey = processor(grey)["pixel_values"]
    for kind in (grey_array, grey_array[..., None], torch.from_numpy(grey_array)):
        assert torch.equal(processor(kind)["pixel_values"], expected_grey)


def test_list_of_images_concatenates_tiles_and_grids(hd):
    images = [sample_image(150, 90, seed=1), sample_image(60, 200, seed=2), sample_image(40, 40, seed=3)]
    processor = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE, hd_num=6)
    singles = [processor(image) for image in images]
    batch = processor(images)
    assert torch.equal(batch["pixel_values"], torch.cat([single["pixel_values"] for single in singles]))
    assert torch.equal(batch["image_grids"], torch.cat([single["image_grids"] for single in singles]))
    grids = batch["image_grids"].tolist()
    assert grids == [list(reference_grid(*image.size, 6, TINY_TILE)[:2]) for image in images]
    assert batch["pixel_values"].shape[0] == sum(rows * cols + 1 for rows, cols in grids)


def test_return_tensors_np(hd):
    output = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE)(sample_image(80, 60), return_tensors="np")
    rows, cols = reference_grid(80, 60, 25, TINY_TILE)[:2]
    assert isinstance(output["pixel_values"], np.ndarray) and output["pixel_values"].dtype == np.float32
    assert output["pixel_values"].shape == (rows * cols + 1, 3, TINY_TILE, TINY_TILE)
    assert output["image_grids"].tolist() == [[rows, cols]]


def test_missing_file_raises_file_not_found(hd, tmp_path):
    missing = tmp_path / "nope.png"
    processor = hd.InternLMXComposer2ImageProcessor()
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor([sample_image(50, 50), missing])


@pytest.mark.parametrize("hd_num", [0, -1, 2.5, True, 1001, "25", None])
def test_bad_hd_num_raises(hd, hd_num):
    with pytest.raises(ValueError, match="hd_num"):
        hd.validate_hd_num(hd_num)
    with pytest.raises(ValueError, match="hd_num"):
        hd.image_token_budget(100, 100, hd_num)
    with pytest.raises(ValueError, match="hd_num"):
        hd.InternLMXComposer2ImageProcessor(hd_num=hd_num)
    if hd_num is not None:  # None means "the processor's default" in a call
        with pytest.raises(ValueError, match="hd_num"):
            hd.InternLMXComposer2ImageProcessor()(sample_image(50, 50), hd_num=hd_num)


@pytest.mark.parametrize(
    "bad_input, message",
    [
        (np.zeros((20, 20, 3), dtype=np.float32), "uint8"),
        (np.zeros((20, 20, 2), dtype=np.uint8), "shape"),
        (torch.zeros(2, 20, 20, 2, dtype=torch.uint8), "shape"),
        (12345, "Unsupported image type"),
        ([], "No images"),
    ],
)
def test_bad_inputs_raise_value_error(hd, bad_input, message):
    with pytest.raises(ValueError, match=message):
        hd.InternLMXComposer2ImageProcessor()(bad_input)


def test_bad_constructor_arguments_raise_value_error(hd):
    with pytest.raises(ValueError, match="even integer"):
        hd.InternLMXComposer2ImageProcessor(image_size=336, patch_size=16)
    with pytest.raises(ValueError, match="one value per RGB channel"):
        hd.InternLMXComposer2ImageProcessor(image_mean=(0.5,))


# ---- saving and loading ----


def test_save_and_reload_round_trip(hd, tmp_path):
    processor = hd.InternLMXComposer2ImageProcessor(image_size=TINY_TILE, patch_size=14, hd_num=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["image_size"], saved["patch_size"], saved["hd_num"]) == (TINY_TILE, 14, 16)
    reloaded = hd.InternLMXComposer2ImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.image_size, reloaded.patch_size, reloaded.hd_num) == (TINY_TILE, 14, 16)
    assert reloaded.image_mean == pytest.approx(CLIP_MEAN.tolist()) and reloaded.image_std == processor.image_std
    image = sample_image(120, 70)
    assert torch.equal(reloaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_auto_image_processor_with_remote_code(hd, tmp_path, no_network):
    for name in ("image_processing_4khd.py", "preprocessor_config.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    processor = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(processor).__name__ == "InternLMXComposer2ImageProcessor"
    assert (processor.image_size, processor.patch_size, processor.hd_num) == (336, 14, 25)
    assert processor.image_mean == pytest.approx(CLIP_MEAN.tolist())
    assert processor.image_std == pytest.approx(CLIP_STD.tolist())
    assert processor.model_input_names == ["pixel_values", "image_grids"]

    image = sample_image(400, 250)
    direct = hd.InternLMXComposer2ImageProcessor()(image, hd_num=4)
    loaded = processor(image, hd_num=4)
    assert torch.equal(loaded["pixel_values"], direct["pixel_values"])
    assert loaded["image_grids"].tolist() == [list(reference_grid(400, 250, 4, 336)[:2])]

    # Saved from the Auto class, the folder keeps the code and auto_map, and loads again with an override.
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    assert (saved / "image_processing_4khd.py").is_file()
    auto_map = json.loads((saved / "preprocessor_config.json").read_text())["auto_map"]
    assert auto_map["AutoImageProcessor"] == "image_processing_4khd.InternLMXComposer2ImageProcessor"
    again = AutoImageProcessor.from_pretrained(saved, trust_remote_code=True, hd_num=9)
    assert again.hd_num == 9 and again.image_size == 336


def test_shipped_config_holds_the_7b_defaults():
    config = json.loads((ROOT / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_4khd.InternLMXComposer2ImageProcessor"
    assert config["image_processor_type"] == "InternLMXComposer2ImageProcessor"
    assert (config["image_size"], config["patch_size"], config["hd_num"]) == (336, 14, 25)
    assert config["image_mean"] == pytest.approx(CLIP_MEAN.tolist())
    assert config["image_std"] == pytest.approx(CLIP_STD.tolist())


def test_works_under_inference_mode(hd):
    """The channel threads write into tiles made under the caller's inference mode (it is per thread)."""
    processor = hd.InternLMXComposer2ImageProcessor()
    image = Image.new("RGB", (800, 600), (10, 200, 30))
    expected = processor(image, hd_num=4)["pixel_values"]
    with torch.inference_mode():
        got = processor(image, hd_num=4)["pixel_values"]
    assert got.shape == expected.shape == (1 + 4, 3, 336, 336)
    assert torch.equal(got, expected)
