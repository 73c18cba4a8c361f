"""Safety of a remote-code repository: no code execution from weight files, no eval/exec/pickle in our code, and
safetensors by default."""

import ast

import pytest
import torch
from conftest import ROOT, TINY_CONFIG, load_file, write_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

# Everything of ours that runs on a user's machine: the remote code, the scripts and the benchmarks.
OUR_CODE = sorted([*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py")])
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}


class OpensAFile:
    """A pickle payload: unpickling it calls `open(path, "w")`, i.e. runs code chosen by the file's author."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_our_code_has_no_eval_exec_or_pickle():
    assert len(OUR_CODE) >= 10
    problems = []
    for path in OUR_CODE:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                problems.append(f"{where} calls {node.func.id}")
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"{where} imports from {node.module}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                    if not safe:
                        problems.append(f"{where} calls torch.load without weights_only=True")
    assert problems == []


@pytest.fixture
def model_folder(tmp_path):
    folder = write_model_dir(tmp_path / "tiny", TINY_CONFIG)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    return folder


def test_weights_are_saved_as_safetensors(model_folder):
    names = sorted(path.name for path in model_folder.iterdir() if path.suffix in (".safetensors", ".bin", ".pt"))
    assert names == ["model.safetensors"]


def test_safetensors_are_preferred_over_a_bin_next_to_them(model_folder, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"payload": OpensAFile(marker)}, model_folder / "pytorch_model.bin")
    model = AutoModelForCausalLM.from_pretrained(model_folder, trust_remote_code=True)
    assert type(model).__name__ == "InternLMXComposer2ForCausalLM"
    assert not marker.exists()


def test_a_bin_with_code_in_its_pickle_is_refused(model_folder, tmp_path):
    """transformers reads `.bin` weights with `torch.load(weights_only=True)`: a pickle that would run code is
    rejected, and the code never runs."""
    marker = tmp_path / "pwned"
    (model_folder / "model.safetensors").unlink()
    torch.save({"payload": OpensAFile(marker)}, model_folder / "pytorch_model.bin")
    # transformers 4.57 wraps the unpickling error in its own "Unable to load weights" message.
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global|unable to load weights"):
        AutoModelForCausalLM.from_pretrained(model_folder, trust_remote_code=True)
    assert not marker.exists()


def test_verify_checkpoint_refuses_code_in_a_bin(model_folder, tmp_path):
    verify = load_file("scripts/verify_checkpoint.py")
    marker = tmp_path / "pwned"
    (model_folder / "model.safetensors").unlink()
    torch.save({"payload": OpensAFile(marker)}, model_folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        verify.read_checkpoint_shapes(model_folder)
    assert not marker.exists()
