"""Check a downloaded InternLM-XComposer2-4KHD checkpoint against our model, and optionally copy it to safetensors.

Usage: python scripts/verify_checkpoint.py FOLDER [--config DIR] [--to-safetensors OUT [--max-shard-gb 5]]
Reads only tensor names and shapes (one shard at a time), builds our model on the meta device, and lists the
missing, unexpected and mis-shaped tensors. Exit status 0 when everything matches, 1 otherwise.

The model is always built from THIS repository's code with the checked config's values: the Python files of the
checked folder (the published repository ships its own) are never run.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.dynamic_module_utils import get_class_from_dynamic_module

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import run  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from image_processing_4khd import check_folder_for_lfs_pointers  # noqa: E402
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of `folder`, preferring safetensors as `from_pretrained` does (sharded, then single)."""
    for index_name, single_name in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            absent = [file.name for file in files if not file.is_file()]
            if absent:
                raise FileNotFoundError(f"{index_name} names shards that are not in {folder}: {', '.join(absent)}")
            return files
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise FileNotFoundError(
        f"No checkpoint in {folder}: expected {SAFE_INDEX}, model.safetensors, {BIN_INDEX} or pytorch_model.bin."
    )


def bin_checkpoint_files(folder: Path) -> list[Path]:
    """The `.bin` weight files of `folder`; a `ValueError` when it holds safetensors, which need no conversion."""
    files = checkpoint_files(folder)
    if files[0].suffix == ".safetensors":
        raise ValueError(
            f"{folder} already holds safetensors weights ({files[0].name}); there is nothing to convert: load the "
            "folder as it is, or drop --to-safetensors."
        )
    return files


def load_bin_shard(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` shard memory-mapped: tensors are read from disk only when touched."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint in `folder`, reading one shard at a time."""
    shapes = {}
    for path in checkpoint_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as shard:
                shapes.update({name: tuple(shard.get_slice(name).get_shape()) for name in shard.keys()})
        else:
            shapes.update({name: tuple(tensor.shape) for name, tensor in load_bin_shard(path).items()})
    return shapes


def default_config_folder(folder: Path) -> Path:
    """`folder` when its config.json is ours (our model_type and vision fields), else the repo root.

    The published config.json has no vision fields; the repo root's config.json describes the same model in full.
    """
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        shipped_type = json.loads((REPO_ROOT / "config.json").read_text())["model_type"]
        if config.get("model_type") == shipped_type and "vision_config" in config:
            return folder
    return REPO_ROOT


def our_class(reference: str):
    """A class of this repository's remote code (e.g. "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"),
    loaded the way transformers loads remote code, from REPO_ROOT: never from the folder being checked."""
    return get_class_from_dynamic_module(reference, REPO_ROOT)


def expected_shapes(config_folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of our model, built from this repository's code with the values of the
    config.json in `config_folder` (that folder's Python files are not run).

    The model is built on the meta device, so this costs no memory even at the 7B size.
    """
    shipped = json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    config_class = our_class(shipped["AutoConfig"])
    config = config_class.from_dict(json.loads((config_folder / "config.json").read_text()))
    with init_empty_weights():
        model = our_class(shipped["AutoModelForCausalLM"])(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def foreign_code(folder: Path) -> list[str]:
    """The Python files of `folder` that differ from this repository's (and so were not run)."""
    return sorted(
        path.name
        for path in folder.glob("*.py")
        if not (REPO_ROOT / path.name).is_file() or (REPO_ROOT / path.name).read_bytes() != path.read_bytes()
    )


@dataclass
class Comparison:
    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, in checkpoint, in model)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)


def compare(found: dict[str, tuple], expected: dict[str, tuple]) -> Comparison:
    """Tensors the model expects but the checkpoint lacks, the reverse, and those present in both with other shapes."""
    return Comparison(
        missing=sorted(expected.keys() - found.keys()),
        unexpected=sorted(found.keys() - expected.keys()),
        mis_shaped=[(name, found[name], expected[name]) for name in sorted(found.keys() & expected.keys())
                    if found[name] != expected[name]],
    )


def num_parameters(shapes: dict[str, tuple]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def write_shard(out: Path, number: int, tensors: dict[str, torch.Tensor]) -> tuple[Path, list[str]]:
    path = out / f"model-{number:05d}.safetensors"  # renamed to "-of-N" once the shard count is known
    save_file(tensors, path, metadata={"format": "pt"})
    return path, list(tensors)


def convert_to_safetensors(folder: Path, out: Path, max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Copy the `.bin` checkpoint in `folder` to safetensors shards of at most `max_shard_bytes` in `out`.

    Names and dtypes are unchanged. Input shards are memory-mapped and read one at a time, so peak memory is
    about one output shard. A tensor larger than `max_shard_bytes` gets a shard of its own.
    Returns the written files, `model.safetensors.index.json` last.
    """
    files = bin_checkpoint_files(folder)
    out.mkdir(parents=True, exist_ok=True)
    shards, pending, pending_bytes, total_size = [], {}, 0, 0
    for path in files:
        for name, tensor in load_bin_shard(path).items():
            size = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + size > max_shard_bytes:
                shards.append(write_shard(out, len(shards) + 1, pending))
                pending, pending_bytes = {}, 0
            pending[name] = tensor.contiguous()
            pending_bytes += size
            total_size += size
    if pending:
        shards.append(write_shard(out, len(shards) + 1, pending))

    written, weight_map = [], {}
    for number, (path, names) in enumerate(shards, start=1):
        written.append(path.rename(out / f"model-{number:05d}-of-{len(shards):05d}.safetensors"))
        weight_map.update(dict.fromkeys(names, written[-1].name))
    index = out / SAFE_INDEX
    index.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return written + [index]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The published layout is pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json; a "
        "safetensors copy (model.safetensors or sharded with model.safetensors.index.json) is read the same way.",
    )
    parser.add_argument("folder", type=Path, help="folder holding the downloaded weights")
    parser.add_argument(
        "--config",
        type=Path,
        help="folder whose config.json to check against, with this repository's code (default: FOLDER if its "
        "config.json is ours, with vision fields; otherwise this repository's root, i.e. the published 7B model)",
    )
    parser.add_argument(
        "--to-safetensors",
        type=Path,
        metavar="OUT",
        help="after a clean check, write a sharded safetensors copy (weights and model.safetensors.index.json "
        "only) to OUT; copy our .py and .json files beside them to load it with from_pretrained",
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GB (1e9 bytes)")
    args = parser.parse_args(argv)

    if not args.folder.is_dir():
        raise FileNotFoundError(
            f"No folder at {str(args.folder)!r}; pass the folder that holds the downloaded weights."
        )
    check_folder_for_lfs_pointers(args.folder)
    if args.to_safetensors:
        bin_checkpoint_files(args.folder)  # refuses safetensors before the check, not after it
    config_folder = args.config or default_config_folder(args.folder)
    if not (config_folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {str(config_folder)!r}; pass --config with a folder that has one.")
    found = read_checkpoint_shapes(args.folder)
    expected = expected_shapes(config_folder)
    result = compare(found, expected)
    print(f"checkpoint: {args.folder} ({len(checkpoint_files(args.folder))} weight files)")
    print(f"model:      {config_folder / 'config.json'} with this repository's code")
    if foreign_code(args.folder):
        print(f"note:       not run, the folder's own code: {', '.join(foreign_code(args.folder))}")
    print(f"tensors:    {len(found)} (model: {len(expected)})")
    print(f"parameters: {num_parameters(found):,} (model: {num_parameters(expected):,})")
    for name in result.missing:
        print(f"missing:    {name} {expected[name]}")
    for name in result.unexpected:
        print(f"unexpected: {name} {found[name]}")
    for name, in_checkpoint, in_model in result.mis_shaped:
        print(f"mis-shaped: {name} checkpoint {in_checkpoint}, model {in_model}")

    if not result.ok:
        skipped = "; no safetensors copy written" if args.to_safetensors else ""
        print(f"FAIL: {len(result.missing)} missing, {len(result.unexpected)} unexpected, "
              f"{len(result.mis_shaped)} mis-shaped tensors{skipped}")
        return 1
    print(f"OK: all {len(found)} tensors match the model")
    if args.to_safetensors:
        written = convert_to_safetensors(args.folder, args.to_safetensors, int(args.max_shard_gb * 1e9))
        print(f"wrote {len(written) - 1} safetensors shards and {SAFE_INDEX} to {args.to_safetensors}")
    return 0


if __name__ == "__main__":
    run(main)
