"""Tests for the model: loading through the Auto classes, the published layout, Partial LoRA, the fused wqkv
layout, attention backends, the KV cache, padding, image inputs and training, all on tiny random models.

Expected values come from the config, docs/model.md sections 1-3 and plain torch recomputations written here.
"""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from accelerate import init_empty_weights
from conftest import ROOT, REFERENCE, TINY_CONFIG, write_model_dir
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

CLASS_NAME = "InternLMXComposer2ForCausalLM"
PLORA_NAMES = ("wqkv", "wo", "w1", "w2", "w3")
PAD_ID = 2
SHIPPED_CONFIG = json.loads((ROOT / "config.json").read_text())
PUBLISHED_CONFIG = json.loads((REFERENCE / "published_config.json").read_text())
# The tiny CLIP of conftest: 56 px tiles of 14 px patches -> 4 x 4 patches -> 2 x 2 tokens after the 2x2 merge.
TOKENS_PER_SIDE = TINY_CONFIG["vision_config"]["image_size"] // TINY_CONFIG["vision_config"]["patch_size"] // 2


# ---- helpers and fixtures ----


def build_and_save(path, config_dict, seed=0):
    """Write our code and `config_dict` into `path`, build a random model the user's way and save it there."""
    write_model_dir(path, config_dict)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(path)
    return model


def load(path, **kwargs):
    """The saved model in fp32 and eval mode, loaded through remote code."""
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **kwargs)
    return model.eval()


def cache_of(model, output):
    """The KV cache of a model output, under the field name our remote code uses on this transformers version."""
    return output[sys.modules[type(model.model).__module__].CACHE_FIELD]


def text_ids(batch, length, seed=1):
    """Random text ids that are neither the pad/EOS id nor the image placeholder."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(PAD_ID + 1, TINY_CONFIG["image_token_id"], (batch, length), generator=generator)


def max_diff(a, b):
    return (a - b).abs().max().item()


def plora_modules(model):
    """{qualified name: module} of every Partial LoRA linear (names end in wqkv, wo, w1, w2 or w3)."""
    plora_class = type(model.model.layers[0].attention.wqkv)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, plora_class) and name.rsplit(".", 1)[-1] in PLORA_NAMES
    }


def embeds_with_image(model, ids, image_positions, seed=2):
    """Token embeddings of `ids` with random "image features" at `image_positions`, and the image mask."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    image_mask = torch.zeros(ids.shape, dtype=torch.bool)
    image_mask[:, image_positions] = True
    features = torch.randn(int(image_mask.sum()), embeds.shape[-1], generator=generator)
    embeds = embeds.clone()
    embeds[image_mask] = features
    return embeds, image_mask


def tiny_pixels(num_tiles, seed=3):
    size = TINY_CONFIG["vision_config"]["image_size"]
    return torch.randn(num_tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


def num_image_tokens(rows, cols, t=TOKENS_PER_SIDE):
    """docs/model.md section 5: global t x (t + 1), one separator, local (t * rows) x (t * cols + 1)."""
    return t * (t + 1) + 1 + t * rows * (t * cols + 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model): the tiny model built with seed 0 and saved once for the whole module."""
    path = tmp_path_factory.mktemp("saved") / "tiny_saved"
    return path, build_and_save(path, TINY_CONFIG)


@pytest.fixture
def model(saved):
    """A fresh fp32 eval copy of the saved tiny model (tests may modify it)."""
    return load(saved[0])


@pytest.fixture(scope="module")
def meta_7b(tmp_path_factory):
    """The shipped 7B config.json, instantiated on the meta device through remote code."""
    path = write_model_dir(tmp_path_factory.mktemp("meta") / "ixc_7b", SHIPPED_CONFIG)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=True)


# ---- loading ----


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
def test_auto_classes_load_our_model(saved, auto_class):
    config = AutoConfig.from_pretrained(saved[0], trust_remote_code=True)
    model = auto_class.from_pretrained(saved[0], trust_remote_code=True)
    assert type(config).__name__ == "InternLMXcomposer2Config"
    assert type(model).__name__ == CLASS_NAME
    assert model.config.hidden_size == TINY_CONFIG["hidden_size"]
    assert len(model.model.layers) == TINY_CONFIG["num_hidden_layers"]


def test_save_load_roundtrip_is_bit_exact(saved):
    path, built = saved
    reloaded = load(path)
    built_state, reloaded_state = built.state_dict(), reloaded.state_dict()
    assert built_state.keys() == reloaded_state.keys()
    assert [name for name in built_state if not torch.equal(built_state[name], reloaded_state[name])] == []
    ids = text_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(built.eval()(ids).logits, reloaded(ids).logits)


def test_shipped_config_has_published_names_shapes_and_size(meta_7b):
    lines = (REFERENCE / "checkpoint_keys.tsv").read_text().splitlines()
    assert lines[0].startswith("#")
    expected = {}
    for line in lines[1:]:
        name, shape = line.split("\t")
        expected[name] = tuple(int(size) for size in shape.split(","))
    ours = {name: tuple(tensor.shape) for name, tensor in meta_7b.state_dict().items()}
    assert sorted(set(ours) ^ set(expected)) == []
    assert {name: shape for name, shape in ours.items() if shape != expected[name]} == {}
    assert len(ours) == 942
    assert sum(p.numel() for p in meta_7b.parameters()) == 8_597_499_904


def test_published_config_loads(tmp_path):
    path = write_model_dir(tmp_path / "published", PUBLISHED_CONFIG)
    assert json.loads((path / "config.json").read_text()) == PUBLISHED_CONFIG  # its own auto_map, untouched
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)

    # transformers 5 moves generation fields (max_length) to the generation config; the rest stays on the config.
    skipped = {"attn_implementation", "auto_map", "torch_dtype", "rope_scaling", "max_length"}
    for key, value in PUBLISHED_CONFIG.items():
        if key not in skipped:
            assert getattr(config, key) == value, key
    assert getattr(config, "rope_scaling", None) is None
    assert config.dtype == torch.bfloat16

    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert (vision.num_attention_heads, vision.intermediate_size, vision.hidden_act) == (16, 4096, "quick_gelu")
    assert config.plora_ranks == {"wqkv": 8, "wo": 256, "w1": 256, "w2": 256, "w3": 256}
    assert config.plora_alphas == {"wqkv": 16, "wo": 256, "w1": 256, "w2": 256, "w3": 256}


@pytest.mark.skipif(transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed")
def test_published_flash_attention_falls_back_to_sdpa(tmp_path):
    """The file asks for 'flash_attention_2'; without flash-attn the model is built with SDPA instead of failing.
    (transformers 4.57 drops the file's attn_implementation itself; 5.x hands it to our config, which falls back.)"""
    path = write_model_dir(tmp_path / "published_attn", PUBLISHED_CONFIG)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert config._attn_implementation in (None, "sdpa")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert model.config._attn_implementation == "sdpa"


# ---- Partial LoRA ----


def test_plora_with_zero_b_equals_plain_linear(model):
    wqkv = model.model.layers[0].attention.wqkv
    with torch.no_grad():
        wqkv.Plora_B.weight.zero_()
        x = torch.randn(2, 5, wqkv.in_features)
        lora_mask = torch.ones(2, 5, 1)
        assert torch.equal(wqkv(x, lora_mask), F.linear(x, wqkv.weight))


def test_plora_branch_only_on_mask_rows(model):
    wqkv = model.model.layers[0].attention.wqkv
    scale = model.config.plora_alphas["wqkv"] / model.config.plora_ranks["wqkv"]
    rows = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    x = torch.randn(2, 5, wqkv.in_features)
    with torch.no_grad():
        out = wqkv(x, rows[..., None].float())
        plain = F.linear(x, wqkv.weight)
        branch = F.linear(F.linear(x, wqkv.Plora_A.weight), wqkv.Plora_B.weight)
    assert torch.equal(out[~rows], plain[~rows])
    assert max_diff(out[rows], plain[rows] + scale * branch[rows]) <= 1e-6
    assert branch[rows].abs().max() > 1e-3  # the branch is not negligible, so the check above means something


def measured_scales(model):
    """{name: least-squares scale s with PLoRA(x, 1) - W x = s * B A x}, in fp64 for every PLoRA linear."""
    model = model.double().eval()
    scales = {}
    with torch.no_grad():
        for name, module in plora_modules(model).items():
            x = torch.randn(1, 4, module.in_features, dtype=torch.float64)
            delta = module(x, torch.ones(1, 4, 1, dtype=torch.float64)) - F.linear(x, module.weight)
            branch = module.Plora_B(module.Plora_A(x))
            scales[name] = ((delta * branch).sum() / (branch * branch).sum()).item()
    return scales


def test_plora_scales_are_alpha_over_rank(model):
    config = model.config
    scales = measured_scales(model)
    assert len(scales) == len(PLORA_NAMES) * config.num_hidden_layers
    for name, scale in scales.items():
        short = name.rsplit(".", 1)[-1]
        assert scale == pytest.approx(config.plora_alphas[short] / config.plora_ranks[short], rel=1e-9), name


def test_plora_scales_of_the_7b_config(tmp_path):
    """The 7B ranks and alphas on a model with tiny dimensions (rank 256 > width 64 is fine for a linear)."""
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    small = {**SHIPPED_CONFIG, **{key: TINY_CONFIG[key] for key in sizes}}
    small.update(
        num_hidden_layers=1, vision_config=TINY_CONFIG["vision_config"], image_token_id=TINY_CONFIG["image_token_id"]
    )
    path = write_model_dir(tmp_path / "ranks_7b", small)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    scales = {name.rsplit(".", 1)[-1]: scale for name, scale in measured_scales(model).items()}
    expected = {short: config.plora_alphas[short] / config.plora_ranks[short] for short in scales}
    assert expected == {"wqkv": 2.0, "wo": 1.0, "w1": 1.0, "w2": 1.0, "w3": 1.0}
    assert scales == pytest.approx(expected, rel=1e-9)


def test_plora_unused_in_eval_without_image(model):
    ids = text_ids(2, 7)
    with torch.no_grad():
        reference = model(ids).logits
        for module in plora_modules(model).values():
            module.Plora_A.weight.fill_(float("nan"))
            module.Plora_B.weight.fill_(float("nan"))
        assert torch.equal(model(ids).logits, reference)


def test_plora_gets_zero_grad_in_text_only_training(model):
    model.train()
    ids = text_ids(2, 7)
    model(ids, labels=ids).loss.backward()
    lora = {name: p for name, p in model.named_parameters() if ".Plora_" in name}
    assert len(lora) == 2 * len(PLORA_NAMES) * model.config.num_hidden_layers
    assert [name for name, p in lora.items() if p.grad is None] == []
    assert {name: p.grad.abs().max().item() for name, p in lora.items() if p.grad.any()} == {}
    assert model.model.layers[0].attention.wqkv.weight.grad.abs().max() > 0


# ---- attention layout (docs/model.md section 3) ----


def expected_qkv_rows(config):
    """Row indices of wqkv feeding query head q, key head h and value head h, written out per kv group."""
    head_dim = config.hidden_size // config.num_attention_heads
    n_rep = config.num_attention_heads // config.num_key_value_heads
    group = (n_rep + 2) * head_dim
    query, key, value = [], [], []
    for h in range(config.num_key_value_heads):
        for g in range(n_rep):
            query.append(list(range(h * group + g * head_dim, h * group + (g + 1) * head_dim)))
        key.append(list(range(h * group + n_rep * head_dim, h * group + (n_rep + 1) * head_dim)))
        value.append(list(range(h * group + (n_rep + 1) * head_dim, h * group + (n_rep + 2) * head_dim)))
    return torch.tensor(query), torch.tensor(key), torch.tensor(value)


def test_wqkv_row_layout(saved, monkeypatch):
    model = load(saved[0], attn_implementation="eager")
    attention = model.model.layers[0].attention
    batch, seq_len = 1, 3
    # Hand-made wqkv output: row r of token t holds the value 1000 t + r.
    codes = (1000 * torch.arange(seq_len)[:, None] + torch.arange(attention.wqkv.out_features)).float()
    attention.wqkv.register_forward_hook(lambda module, args, output: codes.expand(batch, -1, -1).clone())

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module is attention:
            captured.update(query=query, key=key, value=value)
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None  # (B, T, nh, hd)

    monkeypatch.setattr(sys.modules[type(attention).__module__], "eager_attention_forward", capture)
    with torch.no_grad():  # position 0 everywhere: RoPE is the identity (cos 1, sin 0)
        model(text_ids(batch, seq_len), position_ids=torch.zeros(batch, seq_len, dtype=torch.long))

    query_rows, key_rows, value_rows = expected_qkv_rows(model.config)
    token = 1000 * torch.arange(seq_len)[None, :, None].float()  # (1, T, 1)
    assert captured["query"].shape == (batch, model.config.num_attention_heads, seq_len, query_rows.shape[1])
    assert torch.equal(captured["query"][0], token + query_rows[:, None, :].float())  # (nh, T, hd)
    assert torch.equal(captured["key"][0], token + key_rows[:, None, :].float())  # (n_kv, T, hd)
    assert torch.equal(captured["value"][0], token + value_rows[:, None, :].float())


def test_wo_reads_heads_in_query_order(saved, monkeypatch):
    model = load(saved[0], attn_implementation="eager")
    attention = model.model.layers[0].attention
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def head_codes(module, query, key, value, attention_mask, **kwargs):
        # Output of query head q, channel d: q * head_dim + d, for every token.
        codes = torch.arange(config.num_attention_heads * head_dim).float().view(config.num_attention_heads, head_dim)
        return codes.expand(query.shape[0], query.shape[2], -1, -1).clone(), None  # (B, T, nh, hd)

    seen = {}
    attention.wo.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    monkeypatch.setattr(sys.modules[type(attention).__module__], "eager_attention_forward", head_codes)
    with torch.no_grad():
        model(text_ids(1, 2))
    assert torch.equal(seen["x"], torch.arange(config.num_attention_heads * head_dim).float().expand(1, 2, -1))


# ---- attention backends, cache, padding ----


@pytest.mark.parametrize("with_image", [False, True])
def test_eager_equals_sdpa(saved, with_image):
    eager, sdpa = load(saved[0], attn_implementation="eager"), load(saved[0], attn_implementation="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    ids = text_ids(2, 12)
    embeds, image_mask = embeds_with_image(eager, ids, slice(2, 7))
    if not with_image:
        image_mask = None
    with torch.no_grad():
        eager_logits = eager(inputs_embeds=embeds, image_mask=image_mask).logits
        sdpa_logits = sdpa(inputs_embeds=embeds, image_mask=image_mask).logits
    assert eager_logits.shape == (2, 12, TINY_CONFIG["vocab_size"])
    assert max_diff(eager_logits, sdpa_logits) <= 1e-5


@pytest.mark.parametrize("with_image", [False, True])
def test_cached_decoding_equals_full_forward(model, with_image):
    ids, prefill = text_ids(2, 10), 5
    embeds, image_mask = embeds_with_image(model, ids, slice(1, 4))
    if not with_image:
        image_mask = None
    with torch.no_grad():
        full = model(inputs_embeds=embeds, image_mask=image_mask).logits
        out = model(
            inputs_embeds=embeds[:, :prefill],
            image_mask=None if image_mask is None else image_mask[:, :prefill],
            use_cache=True,
        )
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache_of(model, out), use_cache=True)
            steps.append(out.logits)
    assert cache_of(model, out).get_seq_length() == ids.shape[1]
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


def left_pad(sequences):
    """Left-padded ids, attention mask and position ids of a list of 1-D id tensors."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD_ID)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence) :] = sequence
        attention_mask[row, length - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return ids, attention_mask, position_ids


def test_left_padded_batch_equals_single_sequences(model):
    sequences = [text_ids(1, 5, seed=4)[0], text_ids(1, 9, seed=5)[0]]
    ids, attention_mask, position_ids = left_pad(sequences)
    with torch.no_grad():
        batch = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits
        for row, sequence in enumerate(sequences):
            alone = model(sequence[None]).logits[0]
            assert max_diff(batch[row, ids.shape[1] - len(sequence) :], alone) <= 1e-5


def test_left_padded_generate_equals_single_generate(model):
    sequences = [text_ids(1, 5, seed=4)[0], text_ids(1, 9, seed=5)[0]]
    ids, attention_mask, _ = left_pad(sequences)
    # min_new_tokens keeps a random model from stopping early on EOS in one run and not the other.
    settings = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD_ID)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=attention_mask, **settings)
        alone = [
            model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **settings)
            for s in sequences
        ]
    assert batch.shape == (2, ids.shape[1] + 5)
    for row, single in enumerate(alone):
        assert batch[row, ids.shape[1] :].tolist() == single[0, len(sequences[row]) :].tolist()


def test_logits_to_keep_one_is_last_row(model):
    ids = text_ids(2, 8)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, TINY_CONFIG["vocab_size"])
    assert max_diff(last, full[:, -1:]) <= 1e-6


# ---- image inputs ----


def test_image_mask_leaves_earlier_positions_alone(model):
    ids, first_image = text_ids(2, 10), 4
    embeds, image_mask = embeds_with_image(model, ids, slice(first_image, 8))
    with torch.no_grad():
        with_image = model(inputs_embeds=embeds, image_mask=image_mask).logits
        text_only = model(inputs_embeds=embeds).logits
    assert max_diff(with_image[:, :first_image], text_only[:, :first_image]) <= 1e-6


def test_image_mask_changes_logits_from_first_image_position(model):
    ids, first_image = text_ids(2, 10), 4
    embeds, image_mask = embeds_with_image(model, ids, slice(first_image, 8))
    with torch.no_grad():
        with_image = model(inputs_embeds=embeds, image_mask=image_mask).logits
        all_false = model(inputs_embeds=embeds, image_mask=torch.zeros_like(image_mask)).logits
    per_position = (with_image - all_false).abs().amax(dim=-1)  # (B, T)
    assert per_position[:, first_image:].min() > 1e-5  # float noise is below 1e-6, the branch adds >= 4e-4 here
    assert per_position[:, :first_image].max() <= 1e-6


def test_all_false_image_mask_equals_no_mask(model):
    ids = text_ids(2, 10)
    with torch.no_grad():
        all_false = model(ids, image_mask=torch.zeros(ids.shape, dtype=torch.bool)).logits
        no_mask = model(ids).logits
    assert torch.equal(all_false, no_mask)


def image_prompt(image_token_id, counts):
    """One prompt per image: text, `counts[i]` placeholders, text; right-padded to one length. (B, T)"""
    before, after = text_ids(1, 3, seed=6)[0], text_ids(1, 2, seed=7)[0]
    rows = [torch.cat([before, torch.full((n,), image_token_id), after]) for n in counts]
    length = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (0, length - len(r)), value=PAD_ID) for r in rows])


def test_pixel_values_equal_scattered_image_features(model):
    image_grids = torch.tensor([[1, 2], [1, 1]])
    pixel_values = tiny_pixels(3 + 2)  # per image: the global view, then rows * cols crops
    counts = [num_image_tokens(1, 2), num_image_tokens(1, 1)]
    assert counts == [17, 13]
    ids = image_prompt(model.config.image_token_id, counts)
    with torch.no_grad():
        features = model.get_image_features(pixel_values, image_grids)
        assert [tuple(f.shape) for f in features] == [(n, TINY_CONFIG["hidden_size"]) for n in counts]
        image_mask = ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[image_mask] = torch.cat(features)  # row-major: image 0 fills row 0, image 1 fills row 1
        by_hand = model(inputs_embeds=embeds, image_mask=image_mask).logits
        from_pixels = model(ids, pixel_values=pixel_values, image_grids=image_grids).logits
    assert max_diff(from_pixels, by_hand) <= 1e-6


def test_wrong_placeholder_count_raises(model):
    given, needed = num_image_tokens(1, 2) - 1, num_image_tokens(1, 2)  # 16 placeholders for 17 image tokens
    ids = image_prompt(model.config.image_token_id, [given])
    with pytest.raises(ValueError, match=rf"\b{given}\b.*\b{needed}\b|\b{needed}\b.*\b{given}\b"):
        model(ids, pixel_values=tiny_pixels(3), image_grids=torch.tensor([[1, 2]]))


# ---- training ----


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_same_loss_and_grads(tmp_path):
    path = tmp_path / "no_dropout"
    build_and_save(path, {**TINY_CONFIG, "plora_dropout": 0.0})
    image_grids = torch.tensor([[1, 2]])
    ids = image_prompt(TINY_CONFIG["image_token_id"], [num_image_tokens(1, 2)])
    labels = ids.masked_fill(ids == TINY_CONFIG["image_token_id"], -100)

    results = []
    for checkpointing in (False, True):
        model = load(path).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        # A submodule's pre-hook: transformers 5 keeps the layer's own hooks outside the checkpoint, and torch may
        # stop a recompute early, before the hooks that run after a submodule returns.
        model.model.layers[0].attention.register_forward_pre_hook(lambda *args: calls.append(1))
        loss = model(ids, pixel_values=tiny_pixels(3), image_grids=image_grids, labels=labels).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, len(calls)))

    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls, calls_ckpt) == (1, 2)  # checkpointing really recomputes the layer in backward
    assert abs(loss.item() - loss_ckpt.item()) <= 1e-6
    assert grads.keys() == grads_ckpt.keys()
    assert any(".Plora_" in name for name in grads)
    assert max(max_diff(grads[name], grads_ckpt[name]) for name in grads) <= 1e-6


# ---- offline ----


def test_loads_and_runs_without_network(saved, tmp_path, no_network):
    path = write_model_dir(tmp_path / "offline_fresh", TINY_CONFIG)
    for name in ("model.safetensors", "generation_config.json"):
        (path / name).write_bytes((saved[0] / name).read_bytes())
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(config).__name__ == "InternLMXcomposer2Config" and type(model).__name__ == CLASS_NAME
    ids = text_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load(saved[0])(ids).logits)


@pytest.mark.parametrize(
    "pixels, grids, message",
    [
        (torch.zeros(3, 56, 56), [[1, 1]], r"pixel_values must be a \(num_tiles, 3, 56, 56\) tensor, got \(3, 56, 56\)"),
        (torch.zeros(2, 3, 64, 64), [[1, 1]], r"got \(2, 3, 64, 64\)"),
        (torch.zeros(2, 3, 56, 56, dtype=torch.uint8), [[1, 1]], "must be floating point"),
        (torch.zeros(2, 3, 56, 56), [1, 1], r"image_grids must be a \(num_images, 2\) tensor"),
        (torch.zeros(3, 3, 56, 56), [[1, 1]], r"image_grids \[\[1, 1\]\] need 2 tiles .* but pixel_values has 3"),
        (torch.zeros(1, 3, 56, 56), [[0, 1]], "need 1 tiles"),
    ],
)
def test_hand_built_pixel_inputs_of_the_wrong_shape_raise(saved, pixels, grids, message):
    model = load(saved[0])
    with pytest.raises(ValueError, match=message):
        model.get_image_features(pixels, torch.tensor(grids))


def test_pixel_values_on_another_device_raise(saved):
    model = load(saved[0]).to("meta")
    with pytest.raises(ValueError, match="pixel_values are on cpu but the model is on meta"):
        model.get_image_features(torch.zeros(2, 3, 56, 56), torch.tensor([[1, 1]]))
