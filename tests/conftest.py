"""Shared fixtures: tiny configs and a model folder laid out the way a user gets it from the Hub.

Tests load our code through `from_pretrained(folder, trust_remote_code=True)`, never by importing the
root files directly, so they exercise the path a user takes.
"""

import importlib.util
import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
# Facts about the published checkpoint (copied from the published repository): its config.json and all tensor names/shapes.
REFERENCE = ROOT / "tests" / "fixtures"

# No test may reach the network, and remote-code modules are copied into a throwaway cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ixc_modules_{os.getpid()}"))

# Root files that make up the Hub repository (code and the small JSON files beside it).
REMOTE_CODE_FILES = sorted(p.name for p in ROOT.glob("*.py"))

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

TINY_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "image_token_id": 100,
    "vision_config": TINY_VISION,
    "plora_ranks": {"wqkv": 4, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
    "plora_alphas": {"wqkv": 8, "wo": 8, "w1": 8, "w2": 8, "w3": 8},
}


def load_file(relative_path: str):
    """A Python file of this repository imported by path as a module named after it (the root files and scripts/
    are not a package)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_model_dir(path: Path, config: dict) -> Path:
    """Write our remote-code files and `config` (as config.json with our auto_map) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copy(ROOT / name, path / name)
    shipped = json.loads((ROOT / "config.json").read_text())
    full = {"auto_map": shipped["auto_map"], "model_type": shipped["model_type"], **config}
    (path / "config.json").write_text(json.dumps(full, indent=2))
    return path


def write_processor_dir(path: Path, sp_model_file: Path, image_token_id: int, tokenizer_config=None) -> Path:
    """Our code, a tokenizer.model and the shipped tokenizer/processor JSON files in `path`, with the tiny tile
    size of TINY_VISION and the tiny vocabulary's `image_token_id`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copy(ROOT / name, path / name)
    shutil.copy(sp_model_file, path / "tokenizer.model")
    if tokenizer_config is None:
        tokenizer_config = json.loads((ROOT / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    processor_config = json.loads((ROOT / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**processor_config, "image_token_id": image_token_id}))
    image_config = json.loads((ROOT / "preprocessor_config.json").read_text())
    tile = {"image_size": TINY_VISION["image_size"], "patch_size": TINY_VISION["patch_size"]}
    (path / "preprocessor_config.json").write_text(json.dumps({**image_config, **tile}))
    return path


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory, sp_model_file):
    """The processor over the tiny tokenizer and TINY_VISION tiles, loaded as remote code the way a user loads it."""
    from transformers import AutoProcessor

    image_token_id = spm.SentencePieceProcessor(model_file=str(sp_model_file)).piece_to_id("[UNUSED_TOKEN_140]")
    folder = write_processor_dir(tmp_path_factory.mktemp("tiny_processor"), sp_model_file, image_token_id)
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A folder holding our code and a tiny config, as a user's downloaded repo would."""
    return write_model_dir(tmp_path / "tiny", TINY_CONFIG)


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection fail loudly for the duration of a test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# A fixed corpus and options, so the tiny sentencepiece model (and every id in the tests) is reproducible.
SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, so describe the image in detail.",
    "The user asks a question and the assistant answers it politely.",
    "What is in the picture? There is a cat sitting on a red chair near the window.",
    "Please describe this image. The image shows a city street at night with many lights.",
    "You are a helpful assistant that can read charts, documents and photos.",
    "How many people are there? Two people are walking along the river.",
    "Hello world! This is a tiny corpus for a tiny tokenizer used only in tests.",
]


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory):
    """Train a byte-fallback BPE model shaped like InternLM2's: <unk>=0, <s>=1, </s>=2, no pad, the marker pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[f"[UNUSED_TOKEN_{index}]" for index in range(140, 147)],
        # No normalisation and no dummy prefix, so each text segment encodes on its own terms.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
