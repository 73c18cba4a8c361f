"""Tests for the published checkpoint layout: the two-shard bf16 `.bin` files load with no missing or unexpected
keys, so does their safetensors copy, and scripts/verify_checkpoint.py reports what does not match.
"""

import json
import shutil

import pytest
import torch
from conftest import ROOT, REFERENCE, TINY_CONFIG, load_file, write_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

PUBLISHED_SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


@pytest.fixture(scope="module")
def verify():
    return load_file("scripts/verify_checkpoint.py")


def tiny_state_dict(folder):
    """Every tensor of the tiny model, filled with seeded noise in bf16 (so a skipped tensor cannot pass as init)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(tensor.shape, generator=generator).to(torch.bfloat16)
        for name, tensor in model.state_dict().items()
    }


def write_published_layout(folder, state_dict):
    """Split `state_dict` into the two published `.bin` shards and write pytorch_model.bin.index.json."""
    names = list(state_dict)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for shard_name, shard_keys in zip(PUBLISHED_SHARDS, halves):
        torch.save({name: state_dict[name] for name in shard_keys}, folder / shard_name)
        weight_map.update(dict.fromkeys(shard_keys, shard_name))
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder, state_dict): our code, the tiny config.json and the tiny weights in the published `.bin` layout."""
    folder = write_model_dir(tmp_path_factory.mktemp("published"), TINY_CONFIG)
    state_dict = tiny_state_dict(folder)
    write_published_layout(folder, state_dict)
    return folder, state_dict


@pytest.fixture
def published_copy(published, tmp_path):
    """A throwaway copy of the published-layout folder, for tests that damage it."""
    return shutil.copytree(published[0], tmp_path / "copy")


def edit_shard(folder, name, edit):
    """Load the `.bin` shard the index puts `name` in, let `edit` change the dict in place, save it back."""
    shard = folder / json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"][name]
    tensors = torch.load(shard, weights_only=True)
    edit(tensors)
    torch.save(tensors, shard)


def assert_loads_exactly(folder, state_dict):
    """from_pretrained loads `folder` with no missing, unexpected or mis-shaped key, and every tensor bit-exact."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.bfloat16, output_loading_info=True
    )
    assert list(info["missing_keys"]) == []
    assert list(info["unexpected_keys"]) == []
    assert list(info["mismatched_keys"]) == []
    assert list(info["error_msgs"]) == []
    assert not info.get("conversion_errors")  # transformers 5.x only
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        assert loaded[name].dtype == torch.bfloat16, name
        assert torch.equal(loaded[name], tensor), name


def test_published_bin_layout_loads_exactly(published):
    folder, state_dict = published
    assert_loads_exactly(folder, state_dict)


def test_safetensors_copy_loads_exactly(published, verify, tmp_path):
    folder, state_dict = published
    max_shard_bytes = 100_000
    written = verify.convert_to_safetensors(folder, tmp_path / "st", max_shard_bytes=max_shard_bytes)

    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2  # the small limit forces more shards than the two inputs
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == shards + ["model.safetensors.index.json"]
    assert sorted(p.name for p in written) == sorted(shards + ["model.safetensors.index.json"])
    assert index["weight_map"].keys() == state_dict.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state_dict.values())
    largest_tensor = max(t.numel() * t.element_size() for t in state_dict.values())
    for shard in shards:
        assert (tmp_path / "st" / shard).stat().st_size <= max(max_shard_bytes, largest_tensor) + 10_000  # + header

    write_model_dir(tmp_path / "st", TINY_CONFIG)
    assert_loads_exactly(tmp_path / "st", state_dict)


def test_verify_accepts_the_published_layout(published, verify, capsys):
    folder, state_dict = published
    assert verify.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"tensors:    {len(state_dict)} (model: {len(state_dict)})" in out
    assert out.strip().splitlines()[-1] == f"OK: all {len(state_dict)} tensors match the model"


def test_verify_accepts_a_safetensors_copy(published, verify, tmp_path):
    folder, _ = published
    verify.convert_to_safetensors(folder, tmp_path / "st", max_shard_bytes=100_000)
    assert verify.main([str(tmp_path / "st"), "--config", str(folder)]) == 0


def test_verify_main_writes_safetensors_copy(published, verify, tmp_path):
    folder, state_dict = published
    assert verify.main([str(folder), "--to-safetensors", str(tmp_path / "st")]) == 0
    assert verify.read_checkpoint_shapes(tmp_path / "st") == {n: tuple(t.shape) for n, t in state_dict.items()}


def test_verify_reports_missing_tensor(published_copy, verify, capsys):
    name = "model.layers.1.feed_forward.w2.Plora_B.weight"
    edit_shard(published_copy, name, lambda tensors: tensors.pop(name))
    assert verify.main([str(published_copy)]) == 1
    out = capsys.readouterr().out
    assert f"missing:    {name} " in out
    assert out.strip().splitlines()[-1] == "FAIL: 1 missing, 0 unexpected, 0 mis-shaped tensors"


def test_verify_reports_unexpected_tensor(published_copy, verify, capsys):
    name = "model.layers.0.attention.rotary_emb.inv_freq"
    edit_shard(published_copy, "output.weight", lambda tensors: tensors.update({name: torch.zeros(4)}))
    assert verify.main([str(published_copy)]) == 1
    out = capsys.readouterr().out
    assert f"unexpected: {name} (4,)" in out
    assert out.strip().splitlines()[-1] == "FAIL: 0 missing, 1 unexpected, 0 mis-shaped tensors"


def test_verify_reports_mis_shaped_tensor(published_copy, verify, capsys):
    name = "plora_sub_GN"
    hidden = TINY_CONFIG["vision_config"]["hidden_size"] * 4
    edit_shard(published_copy, name, lambda tensors: tensors.update({name: torch.zeros(1, 1, hidden)}))
    assert verify.main([str(published_copy)]) == 1
    out = capsys.readouterr().out
    assert f"mis-shaped: {name} checkpoint (1, 1, {hidden}), model (1, 1, 1, {hidden})" in out
    assert out.strip().splitlines()[-1] == "FAIL: 0 missing, 0 unexpected, 1 mis-shaped tensors"


def test_published_config_is_checked_against_the_shipped_model(verify, tmp_path):
    """The published config.json has no vision fields, so the repo root's full config is the reference."""
    shutil.copy(REFERENCE / "published_config.json", tmp_path / "config.json")
    assert verify.default_config_folder(tmp_path) == ROOT
    assert verify.default_config_folder(write_model_dir(tmp_path / "ours", TINY_CONFIG)) == tmp_path / "ours"


def test_expected_shapes_equal_the_published_names(verify):
    lines = (REFERENCE / "checkpoint_keys.tsv").read_text().splitlines()
    published = {}
    for line in lines[1:]:
        name, shape = line.split("\t")
        published[name] = tuple(int(size) for size in shape.split(","))
    expected = verify.expected_shapes(ROOT)
    assert len(published) == 942
    assert expected == published
    assert verify.num_parameters(expected) == 8_597_499_904
