"""Fine-tuning data: the official conversation JSON, the `data.txt` file that mixes several of them, and the collator
that pads examples into batches (docs/model.md section 7).

A JSON file is a list of samples::

    {"id": "0", "image": ["images/cat.jpg"], "conversations": [
        {"from": "user", "value": "<ImageHere>What is on the mat?"},
        {"from": "assistant", "value": "A cat."}]}

`image` may be missing or empty for text-only samples; relative image paths are read from `image_folder` (default:
the JSON file's folder). A `data.txt` lists one source per line, `path count_in_thousands [hd_num]`: the JSON path
(relative to the `data.txt` folder), how many thousand samples to draw from it (more than it has repeats it), and
optionally the source's own `hd_num`.

Examples longer than `max_length` are dropped when the dataset is built, and the count is logged: an image is never
cut, and nothing is truncated silently.
"""

import json
import logging
import math
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROLES = ("user", "assistant")
# The most a data.txt line may draw from one source, in thousands (ten million samples): larger counts are typos,
# and the index list alone would exhaust memory.
MAX_THOUSANDS = 10_000
MAX_HD_NUM = 1000  # the image processor's limit


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file; a file that is not UTF-8 raises a `ValueError` naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: the file is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); save "
            "it as UTF-8."
        ) from None


def read_samples(path: Path) -> list:
    """The samples of one JSON data file; invalid JSON raises a `ValueError` naming the line and column."""
    try:
        samples = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}.") from None
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} must hold a non-empty JSON list of samples, got {type(samples).__name__}.")
    return samples


@dataclass
class DataSource:
    """One JSON file of samples, how many to draw from it (`None`: each once) and its `hd_num` (`None`: default)."""

    path: Path
    num_samples: int | None = None
    hd_num: int | None = None


def read_sources(data_path) -> list[DataSource]:
    """The sources named by `data_path`: a JSON file (its samples, each once) or a `data.txt` mixing file.

    Raises:
        `FileNotFoundError`: for a missing file, also one that a `data.txt` line names. `ValueError`: for a malformed
        `data.txt` line (a count that is not a number in (0, MAX_THOUSANDS], an hd_num outside 1-1000) or a file
        that is not UTF-8, naming the file and the line.
    """
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path}; pass a JSON list of samples or a data.txt mixing file.")
    if path.suffix == ".json":
        return [DataSource(path)]
    sources = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split("#")[0].split()
        if not fields:
            continue
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            thousands = float(fields[1])
            hd_num = int(fields[2]) if len(fields) == 3 else None
            if not (math.isfinite(thousands) and 0 < thousands <= MAX_THOUSANDS and round(thousands * 1000) > 0):
                raise ValueError
            if hd_num is not None and not 1 <= hd_num <= MAX_HD_NUM:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{path}:{number}: expected 'json_path count_in_thousands [hd_num]' with a count in (0, "
                f"{MAX_THOUSANDS}] thousand and an hd_num in 1-{MAX_HD_NUM}, got {line.strip()!r}."
            ) from None
        source_path = Path(fields[0]) if Path(fields[0]).is_absolute() else path.parent / fields[0]
        if not source_path.is_file():
            raise FileNotFoundError(f"{path}:{number}: no data file at {source_path}; fix the path on that line.")
        sources.append(DataSource(source_path, round(thousands * 1000), hd_num))
    if not sources:
        raise ValueError(f"{path} lists no data sources; write one 'json_path count_in_thousands' per line.")
    return sources


def draw(num_available: int, num_samples: int | None, rng: random.Random) -> list[int]:
    """Indices of `num_samples` samples out of `num_available`: whole passes in order, then a random subset."""
    if num_samples is None:
        return list(range(num_available))
    passes, rest = divmod(num_samples, num_available)
    return list(range(num_available)) * passes + sorted(rng.sample(range(num_available), rest))


def to_messages(conversations) -> list[dict]:
    """Official `{"from", "value"}` turns as chat messages `{"role", "content"}`."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} turns.")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"Each turn needs 'from' in {ROLES} and a string 'value', got {turn!r}.")
        messages.append({"role": turn["from"], "content": turn["value"]})
    return messages


class ConversationDataset(torch.utils.data.Dataset):
    """Training examples from official-format sources, built with the model's processor.

    Every sample is checked when the dataset is built (turns, `hd_num`, and every image file decoded once, so a
    truncated, unreadable or oversized image stops the run before training, not in the middle of it), and its length
    is computed from the images' sizes; samples longer than `max_length` are dropped with one logged warning. Items are
    `processor.training_example(...)` outputs: `input_ids`, `labels` and, with images, `pixel_values` and
    `image_grids`.

    Args:
        processor (`InternLMXComposer2Processor`): the model's processor.
        sources (`list[DataSource]`): from `read_sources`.
        max_length (`int`): the longest example kept, in ids.
        hd_num (`int`): the default maximum number of crops per image.
        image_folder (`str`, *optional*): where relative image paths start; default: each JSON file's folder.
        seed (`int`): seeds the draw from each source, so every process builds the same list.
    """

    def __init__(self, processor, sources, max_length: int, hd_num: int, image_folder=None, seed: int = 0):
        self.processor = processor
        self.max_length = max_length
        # The image reader of the processor's own module (remote code), so the check reads images exactly as training.
        self.read_image = sys.modules[type(processor.image_processor).__module__].to_pil_image
        self.image_sizes = {}  # path -> (width, height) of every image decoded so far
        rng = random.Random(seed)
        self.examples = []  # (messages, image paths, hd_num, source label)
        too_long = total = 0
        for source in sources:
            samples = read_samples(Path(source.path))
            folder = Path(image_folder) if image_folder is not None else Path(source.path).parent
            self._decode_images(samples, folder)
            hd = source.hd_num if source.hd_num is not None else hd_num
            kept = {}  # sample index -> example, or None when too long; repeated draws are checked once
            for index in draw(len(samples), source.num_samples, rng):
                total += 1
                if index not in kept:
                    kept[index] = self._check(samples[index], index, source.path, folder, hd)
                if kept[index] is None:
                    too_long += 1
                else:
                    self.examples.append(kept[index])
        if too_long:
            logger.warning(
                f"Dropped {too_long} of {total} samples longer than max_length={max_length} ids; raise max_length or "
                "lower hd_num to keep them."
            )
        if not self.examples:
            raise ValueError(f"No sample fits in max_length={max_length}; raise max_length or lower hd_num.")

    @staticmethod
    def _image_paths(sample, folder) -> list[Path]:
        """The image paths of one sample, relative ones under `folder`."""
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"'image' must be a path or a list of paths, got {names!r:.80}.")
        return [Path(name) if Path(name).is_absolute() else folder / name for name in names]

    def _decode_images(self, samples, folder):
        """Decode every image file the samples of one source name, in threads (Pillow releases the GIL), and record
        its size. A failure is raised later by `_check`, with the sample that names the file."""
        paths = set()
        for sample in samples:
            try:
                paths.update(self._image_paths(sample, folder) if isinstance(sample, dict) else [])
            except ValueError:
                continue  # reported by `_check` with the sample's name
        paths = [path for path in paths if path not in self.image_sizes and path.is_file()]

        def size_of(path):
            try:
                return self.read_image(path).size
            except (ValueError, OSError) as error:
                return error

        with ThreadPoolExecutor(max_workers=4) as pool:
            self.image_sizes.update(zip(paths, pool.map(size_of, paths)))

    def _check(self, sample, index, json_path, folder, hd_num):
        """The example of one sample as `(messages, image paths, hd_num, label)`, or `None` if it is too long."""
        label = f"sample {index} (id {sample.get('id')!r}) of {json_path}" if isinstance(sample, dict) else None
        try:
            if label is None:
                raise ValueError("a sample must be a JSON object with 'conversations' and optionally 'image'.")
            messages = to_messages(sample.get("conversations"))
            paths = self._image_paths(sample, folder)
            sizes = []
            for path in paths:
                if not path.is_file():
                    raise FileNotFoundError(f"image {path} does not exist")
                size = self.image_sizes[path]
                if isinstance(size, Exception):
                    raise size
                sizes.append(size)
            length = self.processor.training_length(messages, sizes, hd_num)
        except (ValueError, OSError) as error:
            raise type(error)(f"{label or f'sample {index} of {json_path}'}: {error}") from error
        return (messages, paths, hd_num, label) if length <= self.max_length else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index) -> dict:
        messages, paths, hd_num, label = self.examples[index]
        try:
            example = self.processor.training_example(messages, paths, hd_num=hd_num, max_length=self.max_length)
        except (ValueError, OSError) as error:
            raise type(error)(f"{label}: {error}") from error
        return dict(example)


class DataCollator:
    """Right-pads examples into a batch: pad ids in `input_ids`, -100 in `labels`, 0 in `attention_mask`; the images
    of all rows are concatenated in row order (the order the model fills the placeholder positions in).

    Args:
        pad_token_id (`int`): the tokenizer's pad id.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = example["input_ids"]
            labels[row, :size] = example["labels"]
            attention_mask[row, :size] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [example for example in examples if "pixel_values" in example]
        if with_images:
            batch["pixel_values"] = torch.cat([example["pixel_values"] for example in with_images])
            batch["image_grids"] = torch.cat([example["image_grids"] for example in with_images])
        return batch
