"""The vision side: every token of the global-local layout lands where docs/model.md section 5 puts it, and the tiny
CLIP tower runs the same code path as the 7B one, from pixels to projected features."""

import itertools

import pytest
import torch
from conftest import ROOT, TINY_CONFIG, load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, CLIPVisionModel


build_mlp = load_file("build_mlp.py")
image_processing = load_file("image_processing_4khd.py")

NEWLINE, SEPARATOR = -1.0, -2.0


def synthetic_features(num_tiles, side):
    """CLIP-like features (T, side, side, 3) where each patch holds its own (tile, row, col)."""
    tile, row, col = torch.meshgrid(torch.arange(num_tiles), torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([tile, row, col], dim=-1).float()


def expected_layout(rows, cols, t):
    """The token sequence of docs/model.md section 5, token by token: each entry is the 4 (tile, row, col) patches that
    were merged into it (top-left, top-right, bottom-left, bottom-right), or a newline/separator marker."""

    def merged(tile, r, c):
        return [(tile, 2 * r + dy, 2 * c + dx) for dy in (0, 1) for dx in (0, 1)]

    tokens = []
    for r in range(t):
        tokens += [merged(0, r, c) for c in range(t)] + ["newline"]
    tokens.append("separator")
    for big_row in range(rows * t):
        for big_col in range(cols * t):
            tile = 1 + (big_row // t) * cols + big_col // t
            tokens.append(merged(tile, big_row % t, big_col % t))
        tokens.append("newline")
    return tokens


def as_vector(token):
    if token == "newline":
        return torch.full((12,), NEWLINE)
    if token == "separator":
        return torch.full((12,), SEPARATOR)
    return torch.tensor([float(v) for patch in token for v in patch])


@pytest.mark.parametrize("rows,cols,t", [(1, 1, 2), (1, 3, 2), (3, 1, 2), (2, 3, 3), (4, 6, 12)])
def test_every_token_lands_where_spec_puts_it(rows, cols, t):
    features = synthetic_features(1 + rows * cols, 2 * t)
    merged = build_mlp.merge_2x2(features)  # (T, t, t, 12)
    glb_gn, sub_gn = torch.full((1, 1, 12), SEPARATOR), torch.full((1, 1, 1, 12), NEWLINE)
    (sequence,) = build_mlp.global_local_layout(merged, torch.tensor([[rows, cols]]), glb_gn, sub_gn)

    expected = torch.stack([as_vector(token) for token in expected_layout(rows, cols, t)])
    assert sequence.shape == expected.shape == (image_processing.num_image_tokens(rows, cols, t), 12)
    assert torch.equal(sequence, expected)


def test_layout_length_equals_count_function_for_many_grids():
    glb_gn, sub_gn = torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8)
    grids = list(itertools.product(range(1, 8), range(1, 8)))
    merged = torch.zeros(sum(r * c + 1 for r, c in grids), 2, 2, 8)
    sequences = build_mlp.global_local_layout(merged, torch.tensor(grids), glb_gn, sub_gn)
    assert [len(s) for s in sequences] == [image_processing.num_image_tokens(r, c, 2) for r, c in grids]


def test_tiles_and_grids_that_disagree_raise():
    merged = torch.zeros(5, 2, 2, 8)
    with pytest.raises(ValueError, match="account for 3 tiles but pixel_values holds 5"):
        build_mlp.global_local_layout(merged, torch.tensor([[1, 2]]), torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import write_model_dir

    folder = write_model_dir(tmp_path_factory.mktemp("vision") / "tiny", TINY_CONFIG)
    (folder / "preprocessor_config.json").write_text(
        (ROOT / "preprocessor_config.json").read_text().replace('"image_size": 336', '"image_size": 56')
    )
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    return model, processor


def test_tower_output_is_clip_last_layer_before_post_layernorm(tiny_model):
    """Our tower against transformers' CLIPVisionModel with the same weights: hidden_states[-1], CLS dropped."""
    model, _ = tiny_model
    reference = CLIPVisionModel(model.config.vision_config).eval()
    own = {k.removeprefix("vit.vision_tower."): v for k, v in model.state_dict().items() if k.startswith("vit.")}
    expected_keys = reference.state_dict().keys()
    if not any(k.startswith("vision_model.") for k in expected_keys):  # transformers 5 flattened the model
        own = {k.removeprefix("vision_model."): v for k, v in own.items()}
    missing, unexpected = reference.load_state_dict(own, strict=False)
    assert unexpected == [] and all("post_layernorm" in k or "position_ids" in k for k in missing)

    pixel_values = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model.vit(pixel_values)  # (T, 4, 4, C)
        theirs = reference(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
    assert ours.shape == (3, 4, 4, 32)
    assert (ours.flatten(1, 2) - theirs).abs().max().item() <= 1e-6


def test_image_features_from_pixels_have_the_processor_count(tiny_model):
    model, processor = tiny_model
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(100, 200), (300, 100), (56, 56)]]
    inputs = processor(images, hd_num=4)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grids"])
    counts = [image_processing.num_image_tokens(r, c, 2) for r, c in inputs["image_grids"].tolist()]
    assert [tuple(f.shape) for f in features] == [(n, TINY_CONFIG["hidden_size"]) for n in counts]
    assert inputs["image_grids"].tolist() == [[1, 2], [3, 1], [2, 2]]  # scale 2, 3 (portrait), 2


def test_images_with_different_grids_batch_like_one_by_one(tiny_model):
    model, processor = tiny_model
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(120, 250), (400, 90)]]
    with torch.no_grad():
        batch = processor(images, hd_num=6)
        together = model.get_image_features(batch["pixel_values"], batch["image_grids"])
        for image, joint in zip(images, together):
            alone = processor(image, hd_num=6)
            (single,) = model.get_image_features(alone["pixel_values"], alone["image_grids"])
            assert (single - joint).abs().max().item() <= 1e-5
