"""Deployment on tiny models: offloading and device maps, dtypes and autocast, bitsandbytes 4-bit and 8-bit
loading with Partial LoRA intact, and static-cache generation, each compared with the plain fp32 model.

The bitsandbytes tests need `bitsandbytes` (its CPU build runs them); the CUDA tests need a GPU.
"""

import importlib.metadata
import re

import pytest
import torch
from conftest import TINY_CONFIG, write_processor_dir
from PIL import Image
from test_modeling import (
    PAD_ID,
    build_and_save,
    image_prompt,
    load,
    max_diff,
    num_image_tokens,
    text_ids,
    tiny_pixels,
)
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

IMAGE_GRIDS = torch.tensor([[1, 2]])
# accelerate's own device maps name the two top-level vectors (parameters, not modules), then it warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def image_inputs(batch=1):
    """A prompt with one 1 x 2 image per row: ids, pixel tiles and grids."""
    ids = image_prompt(TINY_CONFIG["image_token_id"], [num_image_tokens(1, 2)] * batch)
    return {"input_ids": ids, "pixel_values": tiny_pixels(3 * batch), "image_grids": IMAGE_GRIDS.repeat(batch, 1)}


def on(device, inputs):
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def greedy(model, inputs, steps=5, **kwargs):
    """The `steps` new ids of greedy generation (min_new_tokens: a random model must not stop early on EOS)."""
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=PAD_ID)
    with torch.no_grad():
        output = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), **settings, **kwargs)
    return output[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "tiny"
    build_and_save(path, TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(saved):
    """The plain fp32 model, with its logits and greedy ids for one image prompt."""
    model = load(saved)
    inputs = image_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, logits, greedy(model, inputs)


# ---- device maps and offloading ----

# Layers split between the CPU and the disk (accelerate's offload), the decoder and the vision tower alike.
EXPLICIT_MAP = {
    "plora_glb_GN": "cpu",
    "plora_sub_GN": "cpu",
    "model.tok_embeddings": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "output": "disk",
    "vit.vision_tower.vision_model.embeddings": "disk",
    "vit.vision_tower.vision_model.pre_layrnorm": "cpu",
    "vit.vision_tower.vision_model.encoder.layers.0": "disk",
    "vit.vision_tower.vision_model.encoder.layers.1": "cpu",
    "vision_proj": "disk",
}
# Inside a decoder layer or a CLIP layer: what `_no_split_modules` must keep out of a device map.
INSIDE_A_LAYER = re.compile(r"(^model\.layers|\.encoder\.layers)\.\d+\.")


def total_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.9])  # each splits elsewhere: decoder layer 0 or 1, CLIP layer 0
def test_auto_device_map_never_splits_a_layer(saved, reference, tmp_path, fraction):
    budget = int(fraction * total_bytes(reference[0]))
    model = load(saved, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert [name for name in model.hf_device_map if INSIDE_A_LAYER.search(name)] == []


@pytest.mark.parametrize("device_map", ["auto", EXPLICIT_MAP], ids=["auto", "explicit"])
def test_offloaded_model_equals_plain_model(saved, reference, tmp_path, device_map):
    plain, logits, ids = reference
    memory = {"max_memory": {"cpu": int(0.7 * total_bytes(plain))}} if device_map == "auto" else {}
    model = load(saved, device_map=device_map, offload_folder=tmp_path, **memory)
    assert "disk" in model.hf_device_map.values()
    with torch.no_grad():
        assert max_diff(model(**image_inputs()).logits, logits) == 0
    assert torch.equal(greedy(model, image_inputs()), ids)


# ---- dtypes and autocast ----


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 0), (torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_loading_in_each_dtype_by_either_argument(saved, reference, dtype, tolerance, argument):
    """`torch_dtype` is the name transformers 4.57 documents, `dtype` the one 5.x does; both load the same model."""
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True, **{argument: dtype}).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = image_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == dtype
    assert max_diff(logits.float(), reference[1]) <= tolerance


def test_bf16_autocast_over_fp32_weights(reference):
    """Logits stay within bf16 rounding of fp32, and `generate` runs the same prefill. (The greedy ids themselves
    may differ from fp32: a random model's top logits are closer than bf16 rounding.)"""
    model, logits, _ = reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            autocast_logits = model(**image_inputs()).logits
        autocast_ids = greedy(model, image_inputs())
    assert autocast_logits.dtype == torch.bfloat16
    assert max_diff(autocast_logits.float(), logits) <= 1e-2
    assert autocast_ids[0, 0] == autocast_logits[0, -1].argmax()


def test_model_card_fp16_autocast_over_bf16_weights_in_the_llm(saved, reference):
    """The model card's setting on the decoder, image positions and Partial LoRA included: it runs and stays within
    fp16 rounding of fp32. (CPU autocast has no fp32 LayerNorm, so the CLIP tower needs CUDA for this setting.)"""
    model = load(saved).to(torch.bfloat16)
    fp32_model = reference[0]
    ids = text_ids(1, 12)
    image_mask = torch.zeros(ids.shape, dtype=torch.bool)
    image_mask[:, 3:9] = True
    with torch.no_grad():
        embeds = fp32_model.get_input_embeddings()(ids)
        expected = fp32_model(inputs_embeds=embeds, image_mask=image_mask).logits
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(inputs_embeds=embeds.to(torch.bfloat16), image_mask=image_mask).logits
    assert logits.dtype == torch.float16
    assert max_diff(logits.float(), expected) <= 5e-3


def test_fp16_image_features_are_not_rounded_to_bf16(saved, monkeypatch):
    """Under the model card's autocast the projector returns fp16 features for a bf16 model; like the original's
    concatenation, the decoder input takes their common dtype (fp32) so the features keep every fp16 bit."""
    model = load(saved).to(torch.bfloat16)
    inputs = image_inputs()
    features = torch.randn(num_image_tokens(1, 2), model.config.hidden_size).to(torch.float16)
    features[0, 0] = 1 + 2**-10  # exact in fp16, rounds to 1 in bf16
    monkeypatch.setattr(model, "get_image_features", lambda pixel_values, image_grids: [features])
    seen = {}
    # The decoder embeds the images itself (it is the multimodal base model): read the first layer's input.
    hook = lambda module, args, kwargs: seen.update(embeds=args[0], image_mask=kwargs["lora_mask"][..., 0] == 1)  # noqa: E731
    model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model(**inputs)
    embeds, image_mask = seen["embeds"], seen["image_mask"]
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds[image_mask], features.float())
    text = model.get_input_embeddings()(inputs["input_ids"])[~image_mask]
    assert torch.equal(embeds[~image_mask], text.float())


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, sp_model_file):
    """A tiny model folder with tokenizer and processor files, and two images of different grids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    folder = tmp_path_factory.mktemp("deploy_chat") / "tiny"
    build_and_save(folder, {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id})
    write_processor_dir(folder, sp_model_file, image_token_id)
    Image.new("RGB", (200, 120), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (90, 160), (30, 30, 200)).save(folder / "tall.png")
    return folder


def test_stream_chat_runs_under_the_callers_autocast(chat_dir):
    """stream_chat generates in a worker thread, and autocast is per thread: the caller's must reach it."""
    model = load(chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir, trust_remote_code=True)
    seen = []

    def record_autocast(*args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    model.model.register_forward_pre_hook(record_autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        replies = list(model.stream_chat(tokenizer, "<ImageHere>Hi", image=str(chat_dir / "wide.png"), hd_num=2,
                                         do_sample=False, max_new_tokens=3, min_new_tokens=3))  # fmt: skip
    assert replies and seen == [torch.bfloat16] * 3


# ---- static cache ----


def test_static_cache_greedy_equals_dynamic_with_images_in_a_padded_batch(chat_dir):
    model = load(chat_dir)
    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    prompts = [processor.build_prompt("<ImageHere>Describe the image."), processor.build_prompt("<ImageHere>Hi")]
    inputs = processor(prompts, images=[[str(chat_dir / "wide.png")], [str(chat_dir / "tall.png")]], hd_num=6)
    assert inputs["image_grids"].tolist() == [[2, 3], [3, 2]] and (inputs["attention_mask"] == 0).any()
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **settings)
        static = model.generate(**inputs, cache_implementation="static", **settings)
    assert static.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(static, dynamic)


# ---- bitsandbytes ----


def bnb_config(bits, **kwargs):
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  **kwargs)  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, **kwargs)


@pytest.mark.parametrize(
    "user_skip,expected",
    [
        (None, ["vit", "vision_proj", "output"]),
        (["output"], ["output"]),
        (["wo", "vit"], ["wo", "vit"]),
    ],
)
def test_bitsandbytes_skip_list(saved, monkeypatch, user_skip, expected):
    """What transformers is asked to leave alone: the vision side and the head by default, and always the Partial
    LoRA linears (built quantised by the model) with their branches. Needs no bitsandbytes on transformers 5."""
    captured = {}

    def record(cls, *args, quantization_config=None, **kwargs):
        captured["config"] = quantization_config

    try:
        given = bnb_config(4, llm_int8_skip_modules=user_skip)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("transformers 4.57 builds a BitsAndBytesConfig only when bitsandbytes is installed")
    model_class = type(load(saved))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(record))
    model_class.from_pretrained(saved, quantization_config=given)
    plora = ["wqkv", "wo", "w1", "w2", "w3", "Plora_A", "Plora_B"]
    assert captured["config"].llm_int8_skip_modules == expected + [name for name in plora if name not in expected]
    assert given.llm_int8_skip_modules == user_skip  # the caller's object is not modified


@pytest.fixture(scope="module")
def saved_64(tmp_path_factory):
    """bitsandbytes' CPU 4-bit kernels need every input width to be a multiple of its block size, 64."""
    path = tmp_path_factory.mktemp("deploy_bnb") / "tiny"
    build_and_save(path, {**TINY_CONFIG, "intermediate_size": 128})
    return path


def load_quantized(path, bits):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = {"quantization_config": bnb_config(bits), "device_map": device}
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, **quantization)


def dequantized_copy(quantized, path):
    """The bf16 model whose Partial LoRA base weights are the quantised model's, dequantised."""
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                weight = module.weight.data.float() * module.weight.SCB[:, None] / 127
            else:
                continue
            model.get_submodule(name).weight.copy_(weight.to(torch.bfloat16).cpu())
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_keeps_partial_lora(saved_64, bits):
    bnb = pytest.importorskip("bitsandbytes")
    quantized_class = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    model = load_quantized(saved_64, bits)
    plain = load(saved_64)
    plora_names = ("wqkv", "wo", "w1", "w2", "w3")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = sorted(name for name, module in linears.items() if isinstance(module, quantized_class))
    assert quantized == sorted(name for name in linears if name.rsplit(".", 1)[-1] in plora_names)
    assert len(quantized) == 5 * TINY_CONFIG["num_hidden_layers"]
    assert {linears[name].weight.dtype for name in quantized} == {torch.uint8 if bits == 4 else torch.int8}
    unquantized = {name: module.weight.dtype for name, module in linears.items() if name not in quantized}
    assert set(unquantized.values()) == {torch.bfloat16}  # vit, vision_proj, output, every Plora_A and Plora_B
    branches = {name: p for name, p in model.named_parameters() if ".Plora_" in name}
    assert len(branches) == 2 * len(quantized)
    plain_state = plain.state_dict()
    assert [n for n, p in branches.items() if not torch.equal(p.cpu(), plain_state[n].to(torch.bfloat16))] == []

    inputs = on(model.device, image_inputs())
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference = dequantized_copy(model, saved_64)
    with torch.no_grad():
        logits = model(**inputs).logits.float().cpu()
        expected = reference(**on("cpu", inputs)).logits.float()
        # The placeholder rows' embeddings, without image features or branches (as ids the model would refuse them).
        text_only = reference.get_input_embeddings()(inputs["input_ids"].cpu())
        without_branches = reference(inputs_embeds=text_only).logits.float()
    assert max_diff(logits, expected) <= 2e-2
    assert max_diff(logits, without_branches) >= 0.1  # the image and its Partial LoRA branch count


def test_4bit_model_saves_and_reloads_bit_exact(saved_64, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = load_quantized(saved_64, 4)
    # Save before any forward: bitsandbytes' CPU kernels repack the weights in place on first use.
    model.save_pretrained(tmp_path)  # with our code files, as for any remote-code model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16,
                                                    device_map=str(model.device)).eval()  # fmt: skip
    assert type(reloaded.model.layers[0].attention.wqkv).__name__ == "PLoRALinear4bit"
    inputs = on(model.device, image_inputs())
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert max_diff(reloaded(**inputs).logits, model(**inputs).logits) == 0


# ---- on CUDA ----


@cuda
def test_model_card_setting_on_cuda(saved, reference):
    """bf16 weights under fp16 autocast with the vision tower too: CUDA autocast runs CLIP's LayerNorms in fp32."""
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True, dtype=torch.bfloat16,
                                                 device_map="cuda").eval()  # fmt: skip
    inputs = on("cuda", image_inputs())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        logits = model(**inputs).logits
        ids = greedy(model, inputs)
    assert logits.dtype == torch.float16
    assert max_diff(logits.float().cpu(), reference[1]) <= 2e-2
    assert ids[0, 0] == logits[0, -1].argmax()


@cuda
def test_compiled_static_cache_greedy_equals_dynamic_on_cuda(saved):
    """On CUDA, generate compiles the decoding step when the cache is static."""
    model = load(saved, device_map="cuda")
    inputs = on("cuda", image_inputs(batch=2))
    assert torch.equal(greedy(model, inputs, cache_implementation="static"), greedy(model, inputs))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_model_split_over_two_gpus_equals_one_gpu(saved, reference):
    one_gpu = load(saved, device_map="cuda:0")
    two_gpus = load(saved, device_map="auto", max_memory={0: total_bytes(reference[0]) // 2, 1: 10**9})
    assert set(two_gpus.hf_device_map.values()) == {0, 1}
    inputs = on("cuda:0", image_inputs())
    with torch.no_grad():
        assert max_diff(two_gpus(**inputs).logits, one_gpu(**inputs).logits) == 0
    assert torch.equal(greedy(two_gpus, inputs), greedy(one_gpu, inputs))
