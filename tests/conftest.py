"""Shared fixtures: tiny configs and a model folder laid out the way a user gets it from the Hub.

Tests load our code through `from_pretrained(folder, trust_remote_code=True)`, never by importing the
root files directly, so they exercise the path a user takes.
"""

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

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


def write_model_dir(path: Path, config: dict) -> Path:
    """Write our remote-code files and `config` (as config.json with our auto_map) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copy(ROOT / name, path / name)
    shipped = json.loads((ROOT / "config.json").read_text())
    full = {"auto_map": shipped["auto_map"], "model_type": shipped["model_type"], **config}
    (path / "config.json").write_text(json.dumps(full, indent=2))
    return path


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
