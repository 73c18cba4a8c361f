"""Image processor for InternLM-XComposer2-4KHD: HD resize and white padding, tiles, and the global view.

It also holds the pure layout functions (grid, token count) that the processor and the model share, so
the number of tokens an image costs is computed in exactly one place.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

logger = logging.get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_HD_NUM = 1000
WHITE = 255


class HDLayout(NamedTuple):
    """Where an image lands after the HD transform; every size is in pixels of the original orientation."""

    rows: int
    cols: int
    resized_width: int
    resized_height: int
    padded_width: int
    padded_height: int
    transposed: bool

    @property
    def offset(self) -> tuple[int, int]:
        """`(left, top)` of the resized image on the white canvas.

        The original pads only the short side of the landscape image, centred with the odd pixel at the end,
        then transposes back; so a portrait image is padded left and right.
        """
        return (self.padded_width - self.resized_width) // 2, (self.padded_height - self.resized_height) // 2


def validate_hd_num(hd_num) -> int:
    """Check the maximum number of crops per image and return it as an `int`.

    Raises:
        `ValueError`: if `hd_num` is not an integer in `[1, MAX_HD_NUM]` (bools are rejected too).
    """
    if isinstance(hd_num, bool) or not isinstance(hd_num, Integral):
        raise ValueError(
            f"hd_num must be an integer, the maximum number of crops per image; got {hd_num!r} of type "
            f"{type(hd_num).__name__}. Pass e.g. hd_num=25 (the chat default) or 55 (4K images)."
        )
    if not 1 <= hd_num <= MAX_HD_NUM:
        raise ValueError(
            f"hd_num must be between 1 and {MAX_HD_NUM}, got {hd_num}; the published model used 9 to 65."
        )
    return int(hd_num)


def _validate_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def hd_layout(width: int, height: int, hd_num: int, tile_size: int) -> HDLayout:
    """Choose the crop grid and the resized size of a `width` x `height` image (no pixels touched).

    The rule of the published model: work in landscape orientation (a portrait image is transposed), pick
    the largest integer `scale` with `scale * ceil(scale / ratio) <= hd_num`, resize the width to
    `scale * tile_size` keeping the aspect ratio (height floored), then pad the height up to a multiple of
    `tile_size`. So the long side is never padded and `rows * cols <= hd_num` always holds.

    Args:
        width (`int`), height (`int`):
            Size of the input image in pixels.
        hd_num (`int`):
            Maximum number of crops (`rows * cols`).
        tile_size (`int`):
            Side of one crop, the vision tower's input size.

    Returns:
        `HDLayout`: rows, cols, resized and padded sizes in the original orientation, and whether the
        transform works on the transposed image.
    """
    width = _validate_positive_int(width, "width")
    height = _validate_positive_int(height, "height")
    hd_num = validate_hd_num(hd_num)
    tile_size = _validate_positive_int(tile_size, "tile_size")

    transposed = width < height
    if transposed:
        width, height = height, width
    # A Python float and this exact loop, as in the original, so float edge cases pick the same scale.
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1

    new_width = scale * tile_size
    new_height = int(new_width / ratio)
    if new_height == 0:
        # The original crashes here (PIL cannot resize to zero rows); keep one row of pixels instead.
        logger.warning_once(
            f"An image of aspect ratio {ratio:.0f}:1 is thinner than one pixel after the HD resize; "
            "it is kept as a single pixel row. Crop or pad such images before passing them."
        )
        new_height = 1
    padded_height = -(-new_height // tile_size) * tile_size

    sizes = (new_width, new_height, new_width, padded_height)
    if transposed:
        sizes = (new_height, new_width, padded_height, new_width)
    resized_width, resized_height, padded_width, padded_height = sizes
    return HDLayout(
        rows=padded_height // tile_size,
        cols=padded_width // tile_size,
        resized_width=resized_width,
        resized_height=resized_height,
        padded_width=padded_width,
        padded_height=padded_height,
        transposed=transposed,
    )


def tokens_per_side(image_size: int, patch_size: int) -> int:
    """Vision tokens along one side of a tile: the CLIP patch grid after the 2x2 merge (24 // 2 = 12 for 7B).

    Raises:
        `ValueError`: if the patch grid is not an even integer, which the 2x2 merge needs.
    """
    patches, remainder = divmod(image_size, patch_size)
    if remainder or patches % 2:
        raise ValueError(
            f"image_size / patch_size must be an even integer for the 2x2 token merge, got "
            f"{image_size} / {patch_size}; use e.g. image_size=336, patch_size=14."
        )
    return patches // 2


def num_image_tokens(rows: int, cols: int, tokens_per_side: int) -> int:
    """Number of tokens one image takes in the language model, for a `rows` x `cols` crop grid.

    With `t = tokens_per_side`, the sequence is
    - the global view: `t` rows of `t` tokens, each row followed by a newline token: `t * (t + 1)`;
    - one separator token between the global and the local part: `1`;
    - the crops stitched into one `(t * rows) x (t * cols)` grid, each of its `t * rows` rows followed by a
      newline token: `t * rows * (t * cols + 1)`.
    The sum is `t**2 * (rows * cols + 1) + 1 + t * (rows + 1)`; 3661 for a 4 x 6 grid at `t = 12`.
    """
    return tokens_per_side**2 * (rows * cols + 1) + 1 + tokens_per_side * (rows + 1)


def image_token_budget(
    width: int, height: int, hd_num: int, image_size: int = 336, patch_size: int = 14
) -> tuple[int, int, int]:
    """Which grid and how many tokens a `width` x `height` image gets at `hd_num`, without touching pixels.

    Returns:
        `tuple[int, int, int]`: `(rows, cols, num_tokens)`.
    """
    layout = hd_layout(width, height, hd_num, image_size)
    num_tokens = num_image_tokens(layout.rows, layout.cols, tokens_per_side(image_size, patch_size))
    return layout.rows, layout.cols, num_tokens


# ---- Git LFS pointer files: a clone of the Hub repository made without git-lfs holds small text stubs instead of
# the weights, `tokenizer.model` and images, and the libraries that read them fail with unrelated messages. ----

LFS_HEADER = b"version https://git-lfs.github.com/spec/"
# A pointer is three short lines (version, oid sha256, size); a real weight, tokenizer or image file is far larger.
MAX_POINTER_BYTES = 1024
# The files a model folder needs whose content Git LFS stores on the Hub.
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth")
LFS_FIX = "Install git-lfs and run `git lfs install && git lfs pull` in the clone, or download the files again."


def is_lfs_pointer(path) -> bool:
    """Whether `path` is a Git LFS pointer file (small, and starting with the LFS spec line)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_POINTER_BYTES:
            return False
        with path.open("rb") as file:
            return file.read(len(LFS_HEADER)) == LFS_HEADER
    except OSError:
        return False


def check_not_lfs_pointer(path, what: str):
    """Raise a `ValueError` if `path` is a Git LFS pointer instead of the `what` (e.g. "sentencepiece model") it should
    be. (Not an `OSError`: transformers replaces those from a tokenizer's `__init__` with a generic message.)"""
    if is_lfs_pointer(path):
        raise ValueError(
            f"{str(path)!r} is a Git LFS pointer file, not the {what}: the repository was cloned without git-lfs. "
            f"{LFS_FIX}"
        )


def check_folder_for_lfs_pointers(folder):
    """Raise a `ValueError` naming every weight or tokenizer file of the local `folder` that is a Git LFS pointer.

    A Hub id or a path that is not a local folder is left alone.
    """
    if not isinstance(folder, (str, Path)) or not Path(folder).is_dir():
        return
    files = Path(folder).iterdir()
    pointers = sorted(path.name for path in files if path.suffix in LFS_SUFFIXES and is_lfs_pointer(path))
    if pointers:
        raise ValueError(
            f"{', '.join(pointers)} in {str(folder)!r} are Git LFS pointer files, not the real files: the repository "
            f"was cloned without git-lfs. {LFS_FIX}"
        )


# What Pillow raises for a file it recognised but cannot decode (truncated or corrupt data, impossible headers).
DECODE_ERRORS = (OSError, SyntaxError, ValueError)
# The only formats read from files; Pillow knows many more, and some run external programs (PostScript/EPS runs
# Ghostscript) or rarely used decoders on what may be an uploaded file. MPO is how Pillow opens many camera JPEGs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")
DECODED_FORMATS = (*IMAGE_FORMATS, "MPO")
FORMAT_NAMES = ", ".join(IMAGE_FORMATS[:-1]).replace("WEBP", "WebP") + f" or {IMAGE_FORMATS[-1]}"


def to_pil_image(image) -> Image.Image:
    """Turn one supported input into a decoded PIL image (any mode; pixels untouched).

    Accepted: a PIL image; a path (`str` or `pathlib.Path`); a `uint8` numpy array `(H, W)` or `(H, W, C)`;
    a `uint8` torch tensor `(H, W)`, `(C, H, W)` (torch's convention, chosen when the first dimension is 1, 3
    or 4) or `(H, W, C)`. `C` is 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped later as `convert("RGB")` does).

    As with the original `Image.open(path).convert("RGB")`:
    - EXIF orientation is ignored: a photo stored sideways with an orientation tag stays sideways (apply
      `PIL.ImageOps.exif_transpose` first to get it upright);
    - a multi-frame file (animated GIF, APNG or WebP, multi-page TIFF) gives its first frame; a PIL image
      gives the frame it is on.

    Pixels are decoded here, so a broken file fails with its name before any other work. A file (a path, or
    a PIL image opened from one) with more than `PIL.Image.MAX_IMAGE_PIXELS` pixels is refused before its
    pixels are decoded; Pillow itself only warns up to twice that limit. Images made in memory are not limited.

    Raises:
        `FileNotFoundError`: for a path that does not exist.
        `IsADirectoryError`: for a path to a directory.
        `ValueError`: for a file Pillow cannot read or decode, a file over the pixel limit, an empty image,
            or any other type, dtype or shape.
    """
    if isinstance(image, (str, Path)):
        image = _open_image_file(Path(image))
    elif isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        _decode(image, f"image file {filename!r}" if filename else "the image")
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        image = _array_to_pil(image)
    else:
        raise ValueError(
            f"Unsupported image type {type(image).__name__}; pass a PIL image, a path, a uint8 numpy array or "
            "torch tensor, or a list of those."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(
            f"The image is empty ({image.width} x {image.height} pixels); pass an image with at least one pixel "
            "in each direction."
        )
    return image


def _open_image_file(path: Path) -> Image.Image:
    """Open and decode the image file at `path` (its first frame), and close the file."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a directory, not an image file; pass the path of one image file inside it."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"Image file not found: {str(path)!r}. Pass an existing local path (URLs are not fetched), "
            "a PIL image, or a uint8 array."
        )
    name = f"image file {str(path)!r}"
    check_not_lfs_pointer(path, "image")
    try:
        opened = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        # Pillow refuses above twice the limit while reading the header; `_decode` refuses the rest.
        raise _too_many_pixels(name, f"over {2 * Image.MAX_IMAGE_PIXELS}") from error
    except UnidentifiedImageError as error:
        raise ValueError(
            f"Cannot read {name}: Pillow does not recognise its format as {FORMAT_NAMES}, the formats read here. "
            "Convert it to one of them, and check that the path points at the image, not at e.g. a text or HTML file."
        ) from error
    except DECODE_ERRORS as error:
        raise _undecodable(name, error) from error
    # The context closes the file also for multi-frame formats, which Pillow otherwise keeps open to seek in.
    with opened:
        _decode(opened, name)
    return opened


def _decode(image: Image.Image, name: str):
    """Decode a lazily opened image now, so that errors name the file; a no-op for an image in memory.

    An image read from a file is checked against the pixel limit on its header size, before decoding.
    """
    if isinstance(image, ImageFile.ImageFile):
        if image.tile and image.format not in DECODED_FORMATS:
            raise ValueError(
                f"Refusing to decode {name}: it is a {image.format} image, not {FORMAT_NAMES}, and some decoders run "
                "external programs (PostScript runs Ghostscript). Convert it to PNG first, or call image.load() "
                "yourself if you trust the file."
            )
        if image.tile and image.fp is None:
            # Pillow would fail on a bare assert here.
            raise ValueError(
                f"Cannot decode {name}: its file was closed before the pixels were read, e.g. by leaving a "
                "`with Image.open(...)` block. Call image.load() inside the block, or pass the path instead."
            )
        limit = Image.MAX_IMAGE_PIXELS  # read at call time, so a limit the user raised applies
        pixels = image.width * image.height
        if limit is not None and pixels > limit:
            raise _too_many_pixels(name, f"{image.width} x {image.height} = {pixels}")
    try:
        image.load()
    except DECODE_ERRORS as error:
        raise _undecodable(name, error) from error


def _too_many_pixels(name: str, pixels: str) -> ValueError:
    return ValueError(
        f"Refusing to decode {name}: it has {pixels} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS} (Pillow's guard against decompression bombs). If you trust the file, raise the "
        "limit before passing it (`PIL.Image.MAX_IMAGE_PIXELS = <pixel count>`, or None to switch the check off); "
        "otherwise pass a downscaled copy."
    )


def _undecodable(name: str, error: Exception) -> ValueError:
    return ValueError(
        f"Cannot decode {name}: {str(error).rstrip('.')}. If the file is truncated or corrupt, download or export "
        "it again; to accept a partly decoded image, set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` yourself."
    )


def _array_to_pil(array) -> Image.Image:
    """A numpy array or torch tensor of uint8 pixels as a PIL image (the layouts of `to_pil_image`)."""
    uint8 = torch.uint8 if isinstance(array, torch.Tensor) else np.uint8
    if array.dtype != uint8:
        raise ValueError(
            f"Image arrays must hold uint8 pixels in [0, 255], got dtype {array.dtype}; convert with "
            "(x * 255).round() cast to uint8, or pass a PIL image. Pre-processed pixel_values go to the model "
            "with their image_grids, not to the image processor."
        )
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        array = array.numpy()
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return Image.fromarray(array)
    raise ValueError(
        f"Image arrays must be (H, W), (H, W, C) or, for torch tensors, (C, H, W) with C in 1, 3, 4; got shape "
        f"{tuple(array.shape)}. Pass several images as a list; transpose a (C, H, W) numpy array to (H, W, C)."
    )


def _resize_plane(plane: Image.Image, layout: HDLayout) -> Image.Image:
    """Steps 1, 3 and 5 of the HD transform for one colour plane: transpose, bilinear resize, transpose back.

    PIL resizes every band of an RGB image with the same integer arithmetic, so resizing the three planes
    one by one reproduces the RGB resize exactly. The resize must happen in landscape orientation: PIL
    resizes in two separable passes rounded to uint8 in between, so the order of the passes matters.

    Args:
        plane (`PIL.Image.Image`): One channel ("L") of the RGB image, original orientation.
        layout (`HDLayout`): The image's layout, from `hd_layout`.

    Returns:
        `PIL.Image.Image`: "L" image of size `(layout.resized_width, layout.resized_height)`.
    """
    size = (layout.resized_width, layout.resized_height)
    if not layout.transposed:
        return plane.resize(size, Image.Resampling.BILINEAR)
    # A mirror over the diagonal (not a rotation), as in the original.
    plane = plane.transpose(Image.Transpose.TRANSPOSE).resize(size[::-1], Image.Resampling.BILINEAR)
    return plane.transpose(Image.Transpose.TRANSPOSE)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Load lazily opened files here, once, before worker threads read the pixels. `convert` as the original:
    # alpha is dropped (no compositing onto white), palette, grey and 16-bit modes are mapped by PIL.
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def hd_transform(image: Image.Image, hd_num: int, tile_size: int) -> Image.Image:
    """Resize and white-pad `image` so both sides are multiples of `tile_size` (docs/model.md section 4, steps 1-5).

    Args:
        image (`PIL.Image.Image`): The input, any mode; converted to RGB first.
        hd_num (`int`): Maximum number of crops.
        tile_size (`int`): Side of one crop.

    Returns:
        `PIL.Image.Image`: RGB image of size `(layout.padded_width, layout.padded_height)`.
    """
    layout = hd_layout(*image.size, hd_num, tile_size)
    image = _to_rgb(image)
    resized = Image.merge("RGB", [_resize_plane(image.getchannel(channel), layout) for channel in range(3)])
    canvas = Image.new("RGB", (layout.padded_width, layout.padded_height), (WHITE, WHITE, WHITE))
    canvas.paste(resized, layout.offset)
    return canvas


def tile_views(padded: torch.Tensor, tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global view and the crops of one normalised, padded image (docs/model.md section 5, step 1).

    Args:
        padded (`torch.Tensor` of shape `(C, H, W)`, float32): H and W multiples of `tile_size`.
        tile_size (`int`): the vision tower's input side S.
    Returns:
        `(global_view, crops)`: `(C, S, S)` bicubic without antialias (the published model's, on the normalised
        padded image in fp32), and a `(rows, cols, C, S, S)` view of `padded` in row-major crop order (no copy).
    """
    channels, height, width = padded.shape
    rows, cols = height // tile_size, width // tile_size
    global_view = F.interpolate(padded[None], size=(tile_size, tile_size), mode="bicubic", align_corners=False)[0]
    crops = padded.view(channels, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)  # (rows, cols, C, S, S)
    return global_view, crops


def _write_tiles(image: Image.Image, layout: HDLayout, mean: torch.Tensor, std: torch.Tensor, tiles: torch.Tensor):
    """HD-transform and normalise one RGB image straight into its tiles: global view, then row-major crops.

    One thread per colour channel runs the whole pipeline for its plane: PIL and torch release the GIL, so
    the channels run in parallel, and each writes its crops into place with a single copy.

    Args:
        image (`PIL.Image.Image`): RGB input.
        layout (`HDLayout`): Its layout, from `hd_layout`.
        mean (`torch.Tensor`), std (`torch.Tensor`): float32 `(3,)` normalisation constants.
        tiles (`torch.Tensor`): float32 `(1 + rows * cols, 3, S, S)` output, filled in place.
    """
    rows, cols, size = layout.rows, layout.cols, tiles.shape[-1]
    left, top = layout.offset
    # Inference mode is per thread: `tiles` made under the caller's may only be written under it.
    inference = torch.is_inference_mode_enabled()

    def write_channel(channel: int):
        with torch.inference_mode(inference):
            _write_channel(channel)

    def _write_channel(channel: int):
        plane = np.asarray(_resize_plane(image.getchannel(channel), layout))  # (h, w) uint8
        padded = torch.full((layout.padded_height, layout.padded_width), float(WHITE))
        padded.numpy()[top : top + plane.shape[0], left : left + plane.shape[1]] = plane
        # The same float32 operations as torchvision's ToTensor + Normalize, so the values are bit-identical.
        padded.div_(255).sub_(mean[channel]).div_(std[channel])  # (H, W)
        global_view, crops = tile_views(padded[None], size)  # (1, S, S), (rows, cols, 1, S, S)
        tiles[0, channel] = global_view[0]
        tiles[1:, channel].view(rows, cols, size, size).copy_(crops[:, :, 0])

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(write_channel, range(3)))


class InternLMXComposer2ImageProcessorKwargs(ImagesKwargs, total=False):
    """`hd_num`: maximum number of crops per image; `image_size`, `patch_size`: the vision tower's."""

    hd_num: int
    image_size: int
    patch_size: int


class InternLMXComposer2ImageProcessor(BaseImageProcessor):
    r"""Turns images into the tiles the 4KHD vision tower sees: per image a global view, then its crops.

    Args:
        image_size (`int`, *optional*, defaults to 336):
            Tile side, the CLIP input size.
        patch_size (`int`, *optional*, defaults to 14):
            CLIP patch size; with `image_size` it fixes the tokens per tile side (`tokens_per_side`).
        hd_num (`int`, *optional*, defaults to 25):
            Default maximum number of crops per image (the original `chat()` default; 55 for 4K images).
        image_mean (`tuple[float]`, *optional*, defaults to CLIP's mean):
            Per-channel mean for normalisation.
        image_std (`tuple[float]`, *optional*, defaults to CLIP's std):
            Per-channel standard deviation for normalisation.
    """

    model_input_names = ["pixel_values", "image_grids"]
    valid_kwargs = InternLMXComposer2ImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 336,
        patch_size: int = 14,
        hd_num: int = 25,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        tokens_per_side(image_size, patch_size)  # fail now on a patch grid the 2x2 merge cannot use
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need one value per RGB channel, got {list(image_mean)} and "
                f"{list(image_std)}; the published model uses CLIP's {list(CLIP_MEAN)} and {list(CLIP_STD)}."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hd_num = validate_hd_num(hd_num)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def __call__(self, images, hd_num: int | None = None, return_tensors: str = "pt") -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, hd_num=hd_num, return_tensors=return_tensors)

    def token_budget(self, width: int, height: int, hd_num: int | None = None) -> tuple[int, int, int]:
        """How many tokens a `width` x `height` image costs at `hd_num` (default `self.hd_num`), without pixels.

        Returns:
            `tuple[int, int, int]`: `(rows, cols, num_tokens)`, the crop grid and the image's token count at this
            processor's tile size (3661 for 1920 x 1080 at hd_num 25 with 336 px tiles).
        """
        hd_num = self.hd_num if hd_num is None else validate_hd_num(hd_num)
        return image_token_budget(width, height, hd_num, self.image_size, self.patch_size)

    def preprocess(self, images, hd_num: int | None = None, return_tensors: str = "pt") -> BatchFeature:
        """HD-transform, normalise and tile one image or a list of images.

        Args:
            images:
                One image or a list of images; each a PIL image, a path, or a uint8 array/tensor as accepted by
                `to_pil_image`. Images may differ in size.
            hd_num (`int`, *optional*):
                Maximum number of crops per image; defaults to `self.hd_num`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` for numpy arrays.

        Returns:
            `BatchFeature` with
            - `pixel_values`: float32 `(T, 3, S, S)` with `S = image_size`; per image in order its global view,
              then its `rows * cols` crops in row-major order, so `T = sum(rows * cols + 1)`;
            - `image_grids`: int64 `(N, 2)`, the `(rows, cols)` of each image.
        """
        hd_num = self.hd_num if hd_num is None else validate_hd_num(hd_num)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given; pass an image or a non-empty list of images.")
        images = [to_pil_image(image) for image in images]
        size = self.image_size
        layouts = [hd_layout(*image.size, hd_num, size) for image in images]
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)

        # Each image writes straight into its slice of one output: no per-image tensors to concatenate.
        pixel_values = torch.empty(sum(layout.rows * layout.cols + 1 for layout in layouts), 3, size, size)
        start = 0
        for image, layout in zip(images, layouts):
            num_tiles = layout.rows * layout.cols + 1
            _write_tiles(_to_rgb(image), layout, mean, std, pixel_values[start : start + num_tiles])
            start += num_tiles

        image_grids = torch.tensor([[layout.rows, layout.cols] for layout in layouts], dtype=torch.long)
        data = {"pixel_values": pixel_values, "image_grids": image_grids}
        return BatchFeature(data=data, tensor_type=return_tensors)
