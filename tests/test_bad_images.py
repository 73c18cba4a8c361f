"""Bad and unusual image inputs: every failure is a clear error naming the file and the fix; every unusual but valid
input (other modes, several frames, an EXIF orientation tag) is read as the original `Image.open(path).convert("RGB")`.
"""

import gc
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

TILE = 56  # the tiny CLIP of conftest
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def processor(tiny_processor):
    """The processor as a user loads it: errors must reach it (and so chat) unchanged."""
    return tiny_processor


@pytest.fixture(scope="module")
def hd(processor):
    """The image processing module as remote code loaded it."""
    return sys.modules[type(processor.image_processor).__module__]


@pytest.fixture(scope="module")
def image_processor(hd):
    return hd.InternLMXComposer2ImageProcessor(image_size=TILE, hd_num=4)


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def saved(image, path, **options):
    image.save(path, **options)
    return path


def truncated(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def pixels_of(image_processor, image):
    return image_processor(image)["pixel_values"]


# ---- files that cannot be read ----


def test_directory_raises_is_a_directory_error(image_processor, tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"'{tmp_path}' is a directory.*image file inside it"):
        image_processor(str(tmp_path))


@pytest.mark.parametrize("content", [b"just some notes\n", b""], ids=["text", "empty"])
def test_file_that_is_not_an_image_raises_value_error_naming_it(image_processor, tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"Cannot read image file '.*notes\.png': Pillow does not recognise"):
        image_processor(path)


@pytest.mark.parametrize(
    "fmt, keep",
    [("PNG", 0.5), ("JPEG", 0.5), ("GIF", 0.5), ("TIFF", 0.5), ("JPEG", 0.02)],
    ids=["png", "jpeg", "gif", "tiff", "jpeg-header"],
)
def test_truncated_file_raises_value_error_naming_it(image_processor, tmp_path, fmt, keep):
    path = truncated(saved(noise(80, 60), tmp_path / f"cut.{fmt.lower()}", format=fmt), keep)
    message = rf"Cannot decode image file '.*cut\.{fmt.lower()}'.*If the file is truncated or corrupt"
    with pytest.raises(ValueError, match=message):
        image_processor(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_file_raises_value_error_naming_it(image_processor, tmp_path):
    path = saved(noise(80, 60), tmp_path / "corrupt.png")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 20] = bytes(20)  # zeros in the middle of the compressed pixels
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Cannot decode image file '.*corrupt\.png'"):
        image_processor(path)


def test_lazily_opened_truncated_image_fails_in_to_pil_image_naming_it(hd, tmp_path):
    # Pillow reads only the header in Image.open; decoding happens in our code, not deep inside the resize.
    lazy = Image.open(truncated(saved(noise(80, 60), tmp_path / "lazy.png"), 0.5))
    with pytest.raises(ValueError, match=r"Cannot decode image file '.*lazy\.png'"):
        hd.to_pil_image(lazy)


def test_image_closed_before_its_pixels_were_read_raises_value_error(hd, tmp_path):
    with Image.open(saved(noise(80, 60), tmp_path / "closed.png")) as image:
        pass  # the `with` block closes the file; the pixels were never read
    with pytest.raises(ValueError, match=r"image file '.*closed\.png'.*closed before the pixels were read"):
        hd.to_pil_image(image)


def test_truncated_file_loads_when_the_user_opts_in(image_processor, tmp_path, monkeypatch):
    path = truncated(saved(noise(80, 60), tmp_path / "cut.png"), 0.5)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert image_processor(path)["image_grids"].tolist() == [[2, 2]]


# ---- the decompression-bomb limit (a tiny monkeypatched limit keeps the files small) ----

LIMIT = 1000


@pytest.fixture
def small_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(50, 30), (100, 50)], ids=["up to 2x: Pillow only warns", "over 2x: Pillow raises"])
def test_file_over_the_pixel_limit_is_refused_with_the_fix(image_processor, tmp_path, small_pixel_limit, size):
    path = saved(noise(*size), tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"Refusing to decode image file '.*big\.png'.*MAX_IMAGE_PIXELS = 1000.*trust"):
        image_processor(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding(hd, tmp_path, small_pixel_limit):
    # Its pixel data is broken: refusing it by the header's size shows nothing was decoded.
    path = truncated(saved(noise(50, 30), tmp_path / "big.png"), 0.5)
    with pytest.raises(ValueError, match=r"it has 50 x 30 = 1500 pixels"):
        hd.to_pil_image(path)
    with pytest.raises(ValueError, match=r"it has 50 x 30 = 1500 pixels"):
        hd.to_pil_image(Image.open(path))


def test_images_within_the_limit_or_in_memory_are_accepted(hd, tmp_path, small_pixel_limit):
    assert hd.to_pil_image(saved(noise(40, 25), tmp_path / "at_limit.png")).size == (40, 25)
    assert hd.to_pil_image(noise(100, 50)).size == (100, 50)
    assert hd.to_pil_image(np.zeros((50, 100, 3), dtype=np.uint8)).size == (100, 50)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_raised_limit_applies(hd, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    path = saved(noise(50, 30), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert hd.to_pil_image(path).size == (50, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    assert hd.to_pil_image(path).size == (50, 30)


# ---- empty images and bad arrays ----


@pytest.mark.parametrize(
    "empty",
    [Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), dtype=np.uint8), torch.zeros(3, 5, 0, dtype=torch.uint8)],
    ids=["pil", "numpy", "torch"],
)
def test_empty_image_raises_value_error(image_processor, empty):
    with pytest.raises(ValueError, match=r"The image is empty \((0 x 5|5 x 0) pixels\)"):
        image_processor(empty)


@pytest.mark.parametrize(
    "bad_input, message",
    [
        (torch.zeros(3, 20, 20, dtype=torch.bfloat16), r"uint8 pixels.*got dtype torch\.bfloat16"),
        (torch.zeros(2, 3, TILE, TILE), r"got dtype torch\.float32.*pixel_values go to the model"),
        (torch.zeros(20, 20, dtype=torch.bool), r"got dtype torch\.bool"),
        (np.zeros((20, 20, 3), dtype=np.int64), r"got dtype int64"),
        (torch.zeros(1, 3, 20, 20, dtype=torch.uint8), r"shape \(1, 3, 20, 20\).*several images as a list"),
        (np.zeros((3, 20, 30), dtype=np.uint8), r"shape \(3, 20, 30\).*transpose a \(C, H, W\) numpy array"),
    ],
    ids=["bfloat16", "pixel_values", "bool", "int64", "batched", "numpy-chw"],
)
def test_bad_pixel_arrays_raise_value_error_with_the_fix(image_processor, bad_input, message):
    with pytest.raises(ValueError, match=message):
        image_processor(bad_input)


@pytest.mark.parametrize("hd_num", [25.0, float("nan"), 10**12, np.int64(0), torch.tensor(25), [25]])
def test_more_bad_hd_num_values_raise(hd, image_processor, hd_num):
    with pytest.raises(ValueError, match="hd_num"):
        hd.validate_hd_num(hd_num)
    with pytest.raises(ValueError, match="hd_num"):
        image_processor(noise(20, 20), hd_num=hd_num)


def test_numpy_integer_hd_num_is_accepted(hd):
    assert hd.validate_hd_num(np.int64(25)) == 25 and type(hd.validate_hd_num(np.int64(25))) is int


# ---- the errors reach the processor (and so chat) unchanged ----


def test_processor_raises_the_same_errors(processor, tmp_path):
    prompt = processor.build_prompt("<ImageHere>Describe.")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    cut = truncated(saved(noise(80, 60), tmp_path / "cut.png"), 0.5)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        processor(prompt, images=str(tmp_path / "missing.png"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        processor(prompt, images=str(tmp_path))
    with pytest.raises(ValueError, match=r"Cannot read image file '.*notes\.txt'"):
        processor(prompt, images=notes)
    with pytest.raises(ValueError, match=r"Cannot decode image file '.*cut\.png'"):
        processor(prompt, images=cut)
    with pytest.raises(ValueError, match="hd_num"):
        processor(prompt, images=noise(20, 20), hd_num=0)


# ---- unusual but valid files: read as Image.open(path).convert("RGB") ----


def frames():
    return [Image.new("RGB", (90, 40), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]


@pytest.mark.parametrize(
    "name, options",
    [
        ("animated.gif", {}),
        ("animated.png", {}),  # APNG
        ("pages.tiff", {}),
        ("animated.webp", {"lossless": True}),
    ],
)
def test_multi_frame_file_gives_its_first_frame(image_processor, tmp_path, name, options):
    first, *rest = frames()
    path = saved(first, tmp_path / name, save_all=True, append_images=rest, **options)
    with Image.open(path) as check:
        assert check.n_frames == 3
    assert torch.equal(pixels_of(image_processor, path), pixels_of(image_processor, first))


def test_multi_frame_file_is_closed_after_reading(image_processor, tmp_path):
    # Pillow keeps multi-frame files open to seek in them; we read the first frame and close the file.
    first, *rest = frames()
    path = saved(first, tmp_path / "animated.gif", save_all=True, append_images=rest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        image_processor(path)
        gc.collect()
    assert [str(warning.message) for warning in caught if warning.category is ResourceWarning] == []


def test_pil_image_gives_the_frame_it_is_on(image_processor, tmp_path):
    first, *rest = frames()
    path = saved(first, tmp_path / "animated.gif", save_all=True, append_images=rest)
    with Image.open(path) as animated:
        animated.seek(2)
        assert torch.equal(pixels_of(image_processor, animated), pixels_of(image_processor, rest[1]))


def save_mode(image, mode, path):
    """Save `image` in `mode` (with transparency where the mode has it) and return the path."""
    if mode == "P+transparency":
        palette = image.quantize(colors=16)
        return saved(palette, path.with_suffix(".png"), transparency=bytes([0, 128] + [255] * 14))
    if mode == "I;16":
        grey = np.asarray(image.convert("L")).astype(np.uint16) * 200  # well beyond 255
        return saved(Image.fromarray(grey), path.with_suffix(".png"))
    if mode == "CMYK":
        return saved(image.convert("CMYK"), path.with_suffix(".jpg"), quality=95)
    return saved(image.convert(mode), path.with_suffix(".png"))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P+transparency", "LA", "RGBA", "L"])
def test_file_modes_are_converted_like_the_original(image_processor, tmp_path, mode):
    path = save_mode(noise(90, 40, seed=4), mode, tmp_path / "image")
    with Image.open(path) as check:
        assert check.mode == mode.split("+")[0]
    expected = pixels_of(image_processor, np.asarray(Image.open(path).convert("RGB")))
    assert torch.equal(pixels_of(image_processor, path), expected)


def test_exif_orientation_is_ignored_as_in_the_original(hd, image_processor, tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    path = saved(noise(90, 40, seed=5), tmp_path / "sideways.jpg", exif=exif)
    with Image.open(path) as stored:
        assert stored.getexif()[EXIF_ORIENTATION] == 6
        assert ImageOps.exif_transpose(stored).size == (40, 90)  # what applying the tag would give
    assert hd.to_pil_image(path).size == (90, 40)
    output = image_processor(path)
    assert output["image_grids"].tolist() == [[1, 2]]  # landscape; the upright portrait would be [[2, 1]]
    as_stored = pixels_of(image_processor, np.asarray(Image.open(path).convert("RGB")))
    assert torch.equal(output["pixel_values"], as_stored)
