"""What the command-line scripts share: one `error:` line instead of a traceback for a user's mistake, the check of a
model folder before anything is loaded, and silencing third-party noise that says nothing about the run.
"""

import logging
import sys
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def run(main):
    """Call `main()` and exit with the status it returns (0 for anything but an int); a `ValueError` or `OSError` (a
    user's mistake: a missing file, a bad option, a bad image) exits with status 1 and one `error: ...` line on
    stderr, not a traceback; Ctrl-C exits with status 130, quietly."""
    try:
        status = main()
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


def quiet_third_party():
    """Silence the bitsandbytes CPU backend's warning that the optional `kernels` package (fetched from the Hub) is
    missing; it is printed on every import of peft and changes nothing for these scripts."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def looks_like_a_path(name: str) -> bool:
    """Whether `name` can only be a local path, not a Hub id (`name` or `org/name`)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def check_model_folder(name, what: str = "model folder"):
    """Refuse a model argument that names no usable local folder, before transformers turns it into a Hub lookup.

    A name that exists locally must be a folder with config.json and weights; a name that can only be a path must
    exist. Anything else (`org/name`) is left to `from_pretrained` as a Hub id.

    Raises:
        `FileNotFoundError`: for a missing folder, or a folder without config.json or weights.
        `NotADirectoryError`: for a file.
    """
    path = Path(str(name)).expanduser()
    if not path.exists():
        if looks_like_a_path(str(name)):
            raise FileNotFoundError(
                f"No {what} at {str(name)!r}; pass the folder that holds config.json and the weights."
            )
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{str(name)!r} is a file; pass the {what} that holds config.json and the weights.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {str(name)!r}; pass the {what} that holds our config and weights.")
    if not any((path / weights).is_file() for weights in WEIGHT_FILES):
        raise FileNotFoundError(
            f"No weights in {str(name)!r}: expected one of {', '.join(WEIGHT_FILES)}. Put the published weights "
            "beside our files (see README), or pass the folder that holds them."
        )
