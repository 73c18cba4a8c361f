"""Property-based tests of the image processor and the processor: for random sizes, modes and hd_num, the grid obeys
the rule of docs/model.md section 4, the tiles have the promised shapes and white padding, and the token count computed from
the size alone (`image_token_budget`, `num_image_tokens`) is exactly the number of placeholder ids the processor
writes.

Examples are derandomised (the same on every run) and nothing is stored on disk, so CI is reproducible; raise
`max_examples` locally to search harder.
"""

import math
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_VISION
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

TILE, PATCH = TINY_VISION["image_size"], TINY_VISION["patch_size"]
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
WHITE = ((1 - CLIP_MEAN) / CLIP_STD)[:, None, None]  # (3, 1, 1), white after normalisation


def property_settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=True)


# @given tests may only take module- or session-scoped fixtures, so these two are module-scoped.
@pytest.fixture(scope="module")
def processor(tiny_processor):
    """The processor as a user loads it: errors must reach it (and so chat) unchanged."""
    return tiny_processor


@pytest.fixture(scope="module")
def hd(processor):
    """The image processing module as remote code loaded it: the count functions the processor uses."""
    return sys.modules[type(processor.image_processor).__module__]


sides = st.integers(1, 600)
hd_nums = st.integers(1, 60)
modes = st.sampled_from(MODES)
seeds = st.integers(0, 2**16)


def make_image(width, height, mode, seed):
    """Seeded noise in `mode`; "I;16" uses values beyond 255, as 16-bit files do."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P":
        return image.quantize(colors=16)
    return image.convert(mode)


def stitch(crops, rows, cols):
    """The padded image `(3, rows * S, cols * S)` back from its row-major crops `(rows * cols, 3, S, S)`."""
    size = crops.shape[-1]
    return crops.view(rows, cols, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, rows * size, cols * size)


def check_padding(pixel_values, layout):
    """Outside the resized image the crops are exactly normalised white; inside, values of pixels in [0, 1]."""
    padded = stitch(pixel_values[1:], layout.rows, layout.cols)  # (3, H, W)
    left, top = layout.offset
    content = torch.zeros(padded.shape[1:], dtype=torch.bool)
    content[top : top + layout.resized_height, left : left + layout.resized_width] = True
    assert torch.equal(padded[:, ~content], WHITE[:, :, 0].expand(3, int((~content).sum())))
    low, high = ((0 - CLIP_MEAN) / CLIP_STD)[:, None], ((1 - CLIP_MEAN) / CLIP_STD)[:, None]
    assert ((padded[:, content] >= low) & (padded[:, content] <= high)).all()


# ---- the grid rule, on sizes alone ----


@property_settings(300)
@given(width=st.integers(1, 10000), height=st.integers(1, 10000), hd_num=st.integers(1, 200))
@example(width=1920, height=1080, hd_num=25)
@example(width=1, height=10000, hd_num=25)
def test_layout_obeys_the_spec_rule(hd, width, height, hd_num):
    layout = hd.hd_layout(width, height, hd_num, TILE)
    rows, cols = layout.rows, layout.cols
    assert rows >= 1 and cols >= 1 and rows * cols <= hd_num
    assert (layout.padded_width, layout.padded_height) == (cols * TILE, rows * TILE)
    assert layout.transposed == (width < height)

    # In landscape orientation: the long side becomes scale tiles, the largest scale with scale * ceil(scale / ratio)
    # <= hd_num; the short side keeps the aspect ratio (floored, at least one pixel) and is padded to whole tiles.
    if width >= height:
        ratio, scale = width / height, cols
        resized_long, resized_short = layout.resized_width, layout.resized_height
        padded_long, padded_short = layout.padded_width, layout.padded_height
    else:
        ratio, scale = height / width, rows
        resized_long, resized_short = layout.resized_height, layout.resized_width
        padded_long, padded_short = layout.padded_height, layout.padded_width
    assert resized_long == padded_long == scale * TILE
    assert scale * math.ceil(scale / ratio) <= hd_num < (scale + 1) * math.ceil((scale + 1) / ratio)
    assert resized_short == max(int(resized_long / ratio), 1)
    assert 0 <= padded_short - resized_short < TILE

    # Centred white padding on the short side only, the odd pixel at the end.
    left, top = layout.offset
    pad_left, pad_top = layout.padded_width - layout.resized_width, layout.padded_height - layout.resized_height
    assert (left, top) == (pad_left // 2, pad_top // 2)
    assert (pad_left if width >= height else pad_top) == 0


@property_settings(200)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), hd_num=st.integers(1, 199))
def test_layout_is_symmetric_and_grows_with_hd_num(hd, width, height, hd_num):
    layout = hd.hd_layout(width, height, hd_num, TILE)
    mirrored = hd.hd_layout(height, width, hd_num, TILE)
    if width != height:
        assert (mirrored.rows, mirrored.cols) == (layout.cols, layout.rows)
        assert (mirrored.resized_width, mirrored.resized_height) == (layout.resized_height, layout.resized_width)
    larger = hd.hd_layout(width, height, hd_num + 1, TILE)
    assert larger.rows >= layout.rows and larger.cols >= layout.cols


@property_settings(200)
@given(width=st.integers(1, 10000), height=st.integers(1, 10000), hd_num=st.integers(1, 100))
def test_token_budget_counts_the_layout(hd, width, height, hd_num):
    rows, cols, num_tokens = hd.image_token_budget(width, height, hd_num, TILE, PATCH)
    layout = hd.hd_layout(width, height, hd_num, TILE)
    assert (rows, cols) == (layout.rows, layout.cols)
    side = TILE // PATCH // 2
    # docs/model.md section 5: the global view and the stitched crops, each row followed by a newline, one separator.
    assert num_tokens == side * (side + 1) + 1 + side * rows * (side * cols + 1)
    assert num_tokens == hd.num_image_tokens(rows, cols, side)


# ---- pixels ----


@property_settings(60)
@given(width=sides, height=sides, mode=modes, hd_num=hd_nums, seed=seeds)
@example(width=1, height=600, mode="RGB", hd_num=60, seed=0)
@example(width=600, height=1, mode="I;16", hd_num=1, seed=0)
def test_image_processor_tiles(hd, width, height, mode, hd_num, seed):
    image = make_image(width, height, mode, seed)
    image_processor = hd.InternLMXComposer2ImageProcessor(image_size=TILE, patch_size=PATCH)
    output = image_processor(image, hd_num=hd_num)
    pixel_values, grids = output["pixel_values"], output["image_grids"]
    layout = hd.hd_layout(width, height, hd_num, TILE)
    rows, cols = layout.rows, layout.cols
    assert grids.tolist() == [[rows, cols]] and grids.dtype == torch.int64
    assert pixel_values.shape == (rows * cols + 1, 3, TILE, TILE) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    check_padding(pixel_values, layout)
    # Every mode is read as PIL's convert("RGB"), as the original did.
    assert torch.equal(pixel_values, image_processor(image.convert("RGB"), hd_num=hd_num)["pixel_values"])


@property_settings(15)
@given(width=st.integers(1, 400), height=st.integers(1, 400), mode=modes, hd_num=st.integers(1, 9), seed=seeds)
def test_image_processor_tiles_at_the_real_tile_size(hd, width, height, mode, hd_num, seed):
    output = hd.InternLMXComposer2ImageProcessor()(make_image(width, height, mode, seed), hd_num=hd_num)
    layout = hd.hd_layout(width, height, hd_num, 336)
    assert output["image_grids"].tolist() == [[layout.rows, layout.cols]]
    assert output["pixel_values"].shape == (layout.rows * layout.cols + 1, 3, 336, 336)
    check_padding(output["pixel_values"], layout)


@property_settings(30)
@given(
    images=st.lists(st.tuples(sides, sides, modes, seeds), min_size=1, max_size=4),
    hd_num=st.integers(1, 30),
)
def test_image_list_is_the_concatenation_of_single_images(hd, images, hd_num):
    images = [make_image(*description) for description in images]
    image_processor = hd.InternLMXComposer2ImageProcessor(image_size=TILE, patch_size=PATCH)
    batch = image_processor(images, hd_num=hd_num)
    singles = [image_processor(image, hd_num=hd_num) for image in images]
    assert torch.equal(batch["pixel_values"], torch.cat([single["pixel_values"] for single in singles]))
    grids = batch["image_grids"].tolist()
    assert grids == [list(hd.image_token_budget(*image.size, hd_num, TILE, PATCH)[:2]) for image in images]
    assert batch["pixel_values"].shape[0] == sum(rows * cols + 1 for rows, cols in grids)


# ---- the processor: placeholder runs equal the counts computed without pixels ----


def placeholder_runs(ids, image_token_id):
    """Lengths of the runs of consecutive `image_token_id` in `ids`, in order."""
    is_image = np.concatenate([[0], (np.asarray(ids) == image_token_id).astype(np.int8), [0]])
    starts, ends = np.flatnonzero(np.diff(is_image) == 1), np.flatnonzero(np.diff(is_image) == -1)
    return (ends - starts).tolist()


@property_settings(50)
@given(images=st.lists(st.tuples(sides, sides, modes, seeds), min_size=1, max_size=3), hd_num=hd_nums)
def test_placeholder_runs_equal_the_token_budget(processor, hd, images, hd_num):
    sizes = [(width, height) for width, height, _, _ in images]
    images = [make_image(*description) for description in images]
    # Text between the images, so each image's run of placeholders stands on its own.
    query = "".join(f"<ImageHere>picture {index}. " for index in range(len(images))) + "Compare them."
    output = processor(processor.build_prompt(query), images=images, hd_num=hd_num)
    ids = output["input_ids"][0].tolist()
    image_token_id = processor.image_token_id

    budgets = [hd.image_token_budget(width, height, hd_num, TILE, PATCH) for width, height in sizes]
    side = hd.tokens_per_side(TILE, PATCH)
    assert output["image_grids"].tolist() == [[rows, cols] for rows, cols, _ in budgets]
    expected_runs = [hd.num_image_tokens(rows, cols, side) for rows, cols, _ in budgets]
    assert expected_runs == [num_tokens for _, _, num_tokens in budgets]
    assert placeholder_runs(ids, image_token_id) == expected_runs
    assert output["pixel_values"].shape[0] == sum(rows * cols + 1 for rows, cols, _ in budgets)

    # The images change only the placeholder runs: the text ids are those of the same prompt with 1 x 1 images.
    tiny = processor(processor.build_prompt(query), images=[Image.new("RGB", (1, 1))] * len(images), hd_num=1)
    text_ids = [token for token in ids if token != image_token_id]
    assert text_ids == [token for token in tiny["input_ids"][0].tolist() if token != image_token_id]


@property_settings(40)
@given(images=st.lists(st.tuples(sides, sides), min_size=0, max_size=2), hd_num=hd_nums)
def test_training_length_from_sizes_equals_the_built_example(processor, images, hd_num):
    pictures = [Image.new("RGB", size, (20, 40, 60)) for size in images]
    messages = [
        {"role": "user", "content": "<ImageHere>" * len(images) + "What is in the picture?"},
        {"role": "assistant", "content": "A cat sitting on a red chair."},
    ]
    built = processor.training_example(messages, pictures, hd_num=hd_num)
    assert processor.training_length(messages, images, hd_num=hd_num) == len(built["input_ids"])


@property_settings(60)
@given(width=sides, height=sides, hd_num=st.integers(2, 60), target=st.integers(1, 60), slack=st.integers(-2, 2))
def test_too_long_error_names_the_largest_hd_num_that_fits(processor, hd, width, height, hd_num, target, slack):
    prompt = processor.build_prompt("<ImageHere>Describe.", meta_instruction="")
    image = Image.new("RGB", (width, height))
    # The prompt's length at any hd_num is its text ids plus the image's budget; aim max_length near one of them.
    tokens = {k: hd.image_token_budget(width, height, k, TILE, PATCH)[2] for k in range(1, hd_num + 1)}
    text_length = processor(prompt, images=image, hd_num=1)["input_ids"].shape[1] - tokens[1]
    max_length = text_length + tokens[min(target, hd_num)] + slack
    fitting = [k for k in range(1, hd_num) if text_length + tokens[k] <= max_length]

    if text_length + tokens[hd_num] <= max_length:
        output = processor(prompt, images=image, hd_num=hd_num, max_length=max_length)
        assert output["input_ids"].shape[1] == text_length + tokens[hd_num]
    elif fitting:
        with pytest.raises(ValueError, match=rf"more than max_length={max_length} .* hd_num={max(fitting)} fits"):
            processor(prompt, images=image, hd_num=hd_num, max_length=max_length)
    else:
        with pytest.raises(ValueError, match="even hd_num=1 does not fit"):
            processor(prompt, images=image, hd_num=hd_num, max_length=max_length)
