"""The model as native transformers vision-language models are used: Auto classes, pipeline("image-text-to-text"),
a multimodal `base_model`, TRL's SFTTrainer and DPOTrainer with images, the standard processor arguments, the chat
template file, attention weights and tokenizer flags that survive saving."""

import json
import math
import shutil

import pytest
import sentencepiece as spm
import torch
import transformers
from conftest import ROOT, TINY_CONFIG, write_model_dir, write_processor_dir
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    pipeline,
)

RED, BLUE = Image.new("RGB", (60, 40), (200, 30, 30)), Image.new("RGB", (40, 70), (30, 30, 200))
NO_SYSTEM = {"role": "system", "content": [{"type": "text", "text": ""}]}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, sp_model_file):
    """A tiny Hub-style folder: code, config, weights, tokenizer, processor files and chat_template.jinja."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    config = {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id}
    folder = write_model_dir(tmp_path_factory.mktemp("ecosystem") / "tiny", config)
    write_processor_dir(folder, sp_model_file, image_token_id)
    shutil.copy(ROOT / "chat_template.jinja", folder / "chat_template.jinja")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    RED.save(folder / "red.png")
    return folder


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return AutoProcessor.from_pretrained(vlm_dir, trust_remote_code=True)


@pytest.fixture
def model(vlm_dir):
    return AutoModelForCausalLM.from_pretrained(vlm_dir, trust_remote_code=True)


def image_inputs(processor):
    return processor(processor.build_prompt("<ImageHere>What colour?", meta_instruction=""), images=RED)


# ---- Auto classes and the pipeline ----


def test_auto_classes_load_the_same_model(vlm_dir, model):
    classes = [AutoModelForImageTextToText]
    if hasattr(transformers, "AutoModelForMultimodalLM"):
        classes.append(transformers.AutoModelForMultimodalLM)
    reference = model.state_dict()
    for auto_class in classes:
        loaded = auto_class.from_pretrained(vlm_dir, trust_remote_code=True)
        assert type(loaded).__name__ == "InternLMXComposer2ForCausalLM"
        assert loaded.state_dict().keys() == reference.keys()
        assert max((loaded.state_dict()[name] - reference[name]).abs().max().item() for name in reference) == 0


class ForceReply(LogitsProcessor):
    """Make generation write `ids`, one per step, whatever the random weights say."""

    def __init__(self, prompt_length, ids):
        self.prompt_length, self.ids = prompt_length, ids

    def __call__(self, input_ids, scores):
        step = min(input_ids.shape[1] - self.prompt_length, len(self.ids) - 1)
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.ids[step]] = 0
        return forced


@pytest.mark.parametrize("image_item", ["path", "url", "image"])
def test_pipeline_replies_are_clean_for_chat_messages(vlm_dir, processor, image_item):
    pipe = pipeline("image-text-to-text", model=str(vlm_dir), trust_remote_code=True)
    value = RED if image_item == "image" else str(vlm_dir / "red.png")
    content = [{"type": "image", image_item: value}, {"type": "text", "text": "Colour?"}]
    messages = [NO_SYSTEM, {"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt_length = processor(prompt, images=RED)["input_ids"].shape[1]
    tokenizer = processor.tokenizer
    # The reply, the turn-end marker, then something generation must not show.
    reply = tokenizer("Red.", add_special_tokens=False)["input_ids"]
    after = tokenizer("[UNUSED_TOKEN_145]\nmore", add_special_tokens=False)["input_ids"]
    force = LogitsProcessorList([ForceReply(prompt_length, reply + after)])
    out = pipe(text=messages, max_new_tokens=len(reply + after), generate_kwargs={"logits_processor": force})
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": "Red."}


def test_pipeline_replies_are_clean_for_images_and_text(vlm_dir, processor):
    pipe = pipeline("image-text-to-text", model=str(vlm_dir), trust_remote_code=True)
    prompt = processor.build_prompt("<ImageHere>Colour?", meta_instruction="")
    prompt_length = processor(prompt, images=RED)["input_ids"].shape[1]
    ids = processor.tokenizer("Red.[UNUSED_TOKEN_145]\nmore", add_special_tokens=False)["input_ids"]
    force = LogitsProcessorList([ForceReply(prompt_length, ids)])
    out = pipe(images=str(vlm_dir / "red.png"), text=prompt, max_new_tokens=len(ids), return_full_text=False,
               generate_kwargs={"logits_processor": force})  # fmt: skip
    assert out[0]["generated_text"] == "Red."


# ---- The multimodal base model ----


def test_base_model_returns_the_multimodal_hidden_states(model, processor):
    inputs = image_inputs(processor)
    assert model.base_model is model.model
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
        full = model(**inputs, output_hidden_states=True)
        placeholder_embeds = model.get_input_embeddings()(inputs["input_ids"])  # the images' positions as text
        text_only = model.base_model(inputs_embeds=placeholder_embeds, attention_mask=inputs["attention_mask"])
    assert hidden.shape == (1, inputs["input_ids"].shape[1], model.config.hidden_size)
    assert (hidden - full.hidden_states[-1]).abs().max().item() == 0
    assert (model.output(hidden) - full.logits).abs().max().item() == 0
    image_positions = inputs["input_ids"][0] == model.config.image_token_id
    assert (hidden - text_only.last_hidden_state)[0, image_positions].abs().max().item() > 1e-3


def test_decoder_refuses_image_arguments_it_cannot_use(model, processor):
    inputs = image_inputs(processor)
    with pytest.raises(ValueError, match=r"\['image_grid_thw'\], which this model does not use"):
        model.base_model(input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grids"])
    with pytest.raises(ValueError, match="image_grids were given without pixel_values"):
        model.base_model(input_ids=inputs["input_ids"], image_grids=inputs["image_grids"])
    with pytest.raises(ValueError, match="image placeholder ids .* but no pixel_values"):
        model.base_model(input_ids=inputs["input_ids"])  # the placeholders would be read as an image
    with pytest.raises(ValueError, match="image placeholder ids .* but no pixel_values"):
        model.base_model(input_ids=inputs["input_ids"], im_mask=inputs["input_ids"] == model.config.image_token_id)
    decoder_class = type(model.model)
    decoder = decoder_class(model.config)  # a decoder without the vision side
    with pytest.raises(ValueError, match="no vision side to encode pixel_values"):
        decoder(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grids=inputs["image_grids"])


def test_an_empty_cache_does_not_skip_the_input_checks(model, processor):
    from transformers import DynamicCache

    inputs = image_inputs(processor)
    with pytest.raises(ValueError, match="image placeholder ids .* but no pixel_values"):
        model(input_ids=inputs["input_ids"], past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[1, model.config.vocab_size]]), past_key_values=DynamicCache())


def test_checkpoint_names_save_and_load_unchanged(model, tmp_path):
    names = set(model.state_dict())
    top_level = {"model", "output", "vit", "vision_proj", "plora_glb_GN", "plora_sub_GN"}
    assert {name.split(".")[0] for name in names} == top_level
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) == names
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert max((reloaded.state_dict()[name] - model.state_dict()[name]).abs().max().item() for name in names) == 0


# ---- TRL ----


def sft_dataset():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "messages": [
                [NO_SYSTEM, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
                [NO_SYSTEM, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Blue, a tall one."}]}],
            ],  # fmt: skip
            "images": [[RED], [BLUE]],
        }
    )


def assert_vision_and_plora_gradients(model):
    vision = max(parameter.grad.abs().max().item() for parameter in model.vit.parameters())
    projector = max(parameter.grad.abs().max().item() for parameter in model.vision_proj.parameters())
    plora = max(layer.attention.wqkv.Plora_A.weight.grad.abs().max().item() for layer in model.model.layers)
    assert min(vision, projector, plora) > 0


def one_cpu_step(tmp_path):
    """TRL config arguments of one fp32 step of batch 2 on the CPU, saving and reporting nothing."""
    return dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                bf16=False, save_strategy="no")  # fmt: skip


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sft_trainer_trains_with_images(model, processor, tmp_path, assistant_only_loss):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **one_cpu_step(tmp_path),
        max_length=None,
        assistant_only_loss=assistant_only_loss,
        learning_rate=1e-2,
    )
    dataset = sft_dataset()
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    except ValueError as error:
        if "Assistant-only loss for vision datasets requires transformers" not in str(error):
            raise
        pytest.skip(f"TRL refuses assistant_only_loss with images on this transformers: {error}")
    batch = trainer.data_collator([dataset[0], dataset[1]])
    image_token_id = model.config.image_token_id
    # Every image reaches the model: placeholders for all tiles' tokens, and the tiles themselves.
    assert batch["image_grids"].shape == (2, 2)
    assert int((batch["input_ids"] == image_token_id).sum()) > 0
    if assistant_only_loss:
        # Exactly the answers and their turn-end markers are trained.
        expected = [processor.tokenizer(answer + "[UNUSED_TOKEN_145]", add_special_tokens=False)["input_ids"]
                    for answer in ("Red.", "Blue, a tall one.")]  # fmt: skip
        assert [row[row != -100].tolist() for row in batch["labels"]] == expected

    model.train()
    torch.manual_seed(0)  # the same Partial LoRA dropout masks in both forwards
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    own = model(**batch).loss
    assert abs(loss.item() - own.item()) < 1e-5
    loss.backward()
    assert_vision_and_plora_gradients(model)

    before = model.vit.state_dict()["vision_tower.vision_model.embeddings.patch_embedding.weight"].clone()
    model.zero_grad()
    trainer.train()
    after = model.vit.state_dict()["vision_tower.vision_model.embeddings.patch_embedding.weight"]
    assert (after - before).abs().max().item() > 0


def test_dpo_trainer_trains_with_images(vlm_dir, model, processor, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def user(text):
        return [NO_SYSTEM, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def answer(text):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    dataset = Dataset.from_dict(
        {
            "prompt": [user("What colour?"), user("And this?")],
            "chosen": [answer("Red."), answer("Blue.")],
            "rejected": [answer("Green."), answer("A dog.")],
            "images": [[RED], [BLUE]],
        }
    )
    reference = AutoModelForCausalLM.from_pretrained(vlm_dir, trust_remote_code=True)
    args = DPOConfig(**one_cpu_step(tmp_path))
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    # Chosen then rejected rows, each with its prompt's image; completions carry no BOS of their own.
    assert batch["image_grids"].shape == (4, 2)
    completions = batch["input_ids"][batch["completion_mask"] == 1].tolist()
    assert processor.tokenizer.bos_token_id not in completions

    model.train()
    # Policy and reference are equal, so the loss is -log sigmoid(0) = log 2.
    loss = trainer.compute_loss(model, dict(batch))
    assert abs(loss.item() - math.log(2)) < 1e-5
    loss.backward()
    assert_vision_and_plora_gradients(model)

    # TRL's log-probabilities (its fused head over `base_model`) equal the model's own.
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_grids")}
    with torch.no_grad():
        fused = model(**inputs, labels=labels, use_cache=False, fused_lm_head=True).log_probs
        logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    own = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    assert (fused.sum(1) - own.sum(1)).abs().max().item() < 1e-4


# ---- Processor arguments ----


def test_padding_arguments(processor):
    prompts = [processor.build_prompt(query, meta_instruction="") for query in ("Hi", "A longer question here")]
    lengths = [len(processor(prompt)["input_ids"][0]) for prompt in prompts]
    longest = processor(prompts, padding="longest", padding_side="right")
    assert longest["input_ids"].shape == (2, max(lengths))
    assert longest["attention_mask"].sum(1).tolist() == lengths
    assert longest["attention_mask"][0, : lengths[0]].tolist() == [1] * lengths[0]
    padded = processor(prompts, padding="max_length", max_length=64)
    assert padded["input_ids"].shape == (2, 64)
    assert padded["attention_mask"][0, -lengths[0] :].sum().item() == lengths[0]
    multiple = processor(prompts, padding=True, pad_to_multiple_of=16)
    assert multiple["input_ids"].shape == (2, -(-max(lengths) // 16) * 16)
    assert multiple["attention_mask"].sum(1).tolist() == lengths
    with pytest.raises(ValueError, match=r"padding=False; pass padding=True"):
        processor(prompts, padding=False)
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        processor(prompts, padding="max_length")


def test_truncation_never_cuts(processor):
    prompt = processor.build_prompt("<ImageHere>What colour?", meta_instruction="")
    full = processor(prompt, images=RED, hd_num=4)
    length = full["input_ids"].shape[1]
    same = processor(prompt, images=RED, hd_num=4, truncation=True, max_length=length)
    assert same["input_ids"].tolist() == full["input_ids"].tolist()
    smaller = processor(prompt, images=RED, hd_num=1)["input_ids"].shape[1]
    assert smaller < length
    message = rf"The prompt is {length} ids long, more than max_length={length - 1}.*; hd_num=\d fits"
    with pytest.raises(ValueError, match=message):
        processor(prompt, images=RED, hd_num=4, truncation=True, max_length=length - 1)


def test_add_special_tokens_false_means_no_bos(processor):
    bos = processor.tokenizer.bos_token_id
    text_prompt = processor.build_prompt("Hi", meta_instruction="")
    with_bos = processor(text_prompt)["input_ids"][0].tolist()
    without = processor(text_prompt, add_special_tokens=False)["input_ids"][0].tolist()
    assert with_bos[:2] == [bos, bos] and with_bos[2:] == without and bos not in without
    image_prompt = processor.build_prompt("<ImageHere>What colour?", meta_instruction="")
    with_bos = processor(image_prompt, images=RED)["input_ids"][0].tolist()
    without = processor(image_prompt, images=RED, add_special_tokens=False)["input_ids"][0].tolist()
    assert with_bos.count(bos) == 2 and [token for token in with_bos if token != bos] == without


def test_mm_token_type_ids_mark_image_positions(processor):
    prompts = [processor.build_prompt(query, meta_instruction="") for query in ("<ImageHere>What colour?", "Hi")]
    out = processor(prompts, images=[[RED], []], return_mm_token_type_ids=True)
    expected = (out["input_ids"] == processor.image_token_id).long()
    assert out["mm_token_type_ids"].tolist() == expected.tolist()
    assert out["mm_token_type_ids"].sum(1).tolist() == [expected[0].sum().item(), 0]


def test_positional_images_then_text_and_hd_num_in_images_kwargs(processor, recwarn):
    prompt = processor.build_prompt("<ImageHere>What colour?", meta_instruction="")
    reference = processor(prompt, images=RED, hd_num=1)
    native = processor(RED, prompt, images_kwargs={"hd_num": 1})
    assert native["input_ids"].tolist() == reference["input_ids"].tolist()
    assert native["image_grids"].tolist() == reference["image_grids"].tolist() == [[1, 1]]
    assert (native["pixel_values"] - reference["pixel_values"]).abs().max().item() == 0
    assert not [warning for warning in recwarn if "hd_num" in str(warning.message)]


def test_offsets_cover_the_prompt_text(processor):
    prompt = processor.build_prompt("<ImageHere>What colour?", meta_instruction="")
    out = processor(prompt, images=RED, return_offsets_mapping=True)
    ids, offsets = out["input_ids"][0].tolist(), out["offset_mapping"][0].tolist()
    text_pieces = [prompt[start:end] for token, (start, end) in zip(ids, offsets) if start < end]
    assert "".join(text_pieces) == prompt.replace("<ImageHere>", "")
    image_offsets = {tuple(span) for token, span in zip(ids, offsets) if token == processor.image_token_id}
    assert image_offsets == {(prompt.index("<ImageHere>"),) * 2}


def test_an_image_path_without_text_is_not_read_as_the_prompt(processor):
    with pytest.raises(ValueError, match="text must be"):
        processor(text=None, images="photo.png")


def test_offsets_never_go_back(processor):
    """Offset starts are sorted, BOS after an image included: transformers 4.57 finds the assistant tokens by
    bisecting them, and a BOS span at (0, 0) in the middle of the sequence put user turns into the mask."""
    prompt = processor.build_prompt("Look: <ImageHere> and <ImageHere>, which is red?", meta_instruction="")
    out = processor(prompt, images=[RED, BLUE], return_offsets_mapping=True)
    starts = [start for start, _ in out["offset_mapping"][0].tolist()]
    assert out["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 3
    assert starts == sorted(starts)


def test_assistant_mask_with_images_covers_only_the_answers(processor):
    messages = [
        NO_SYSTEM,
        {"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": BLUE}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    masked = [token for token, keep in zip(ids, mask) if keep]
    answers = processor.tokenizer("Red.[UNUSED_TOKEN_145]Blue.[UNUSED_TOKEN_145]", add_special_tokens=False)
    assert masked == answers["input_ids"]


# ---- Chat template files ----


def test_chat_template_file_is_the_one_definition(processor):
    import sys

    module = sys.modules[type(processor).__module__]
    assert (ROOT / "chat_template.jinja").read_text(encoding="utf-8") == module.CHAT_TEMPLATE, (
        "chat_template.jinja is stale; regenerate it with `make chat-template`."
    )
    assert processor.chat_template == module.CHAT_TEMPLATE


def test_tokenizer_has_the_text_template(vlm_dir, processor):
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == processor.apply_chat_template(messages)
    turns = "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nHello.[UNUSED_TOKEN_145]\n"
    assert text.endswith(turns)


def test_generation_markers_cover_answer_and_turn_end(vlm_dir):
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir, trust_remote_code=True)
    roles_and_texts = [("system", ""), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]
    messages = [{"role": role, "content": text} for role, text in roles_and_texts]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [token for token, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert masked == tokenizer("Hello.[UNUSED_TOKEN_145]", add_special_tokens=False)["input_ids"]


# ---- Small gaps ----


def test_output_attentions_under_eager(vlm_dir, processor):
    model = AutoModelForCausalLM.from_pretrained(vlm_dir, trust_remote_code=True, attn_implementation="eager")
    inputs = image_inputs(processor)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, length, length)
    assert (out.attentions[0].sum(-1) - 1).abs().max().item() < 1e-5
    assert out.attentions[0][0, 0].triu(1).abs().max().item() == 0  # causal
    sdpa = AutoModelForCausalLM.from_pretrained(vlm_dir, trust_remote_code=True, attn_implementation="sdpa")
    with pytest.raises(ValueError, match='output_attentions=True needs eager attention.*attn_implementation="eager"'):
        sdpa(**inputs, output_attentions=True)


@pytest.mark.parametrize("fast", [False, True])
def test_add_bos_and_eos_token_survive_save_and_load(vlm_dir, tmp_path, fast):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    name = "tokenization_internlm2_fast.InternLM2TokenizerFast" if fast else "tokenization_internlm2.InternLM2Tokenizer"
    tokenizer_class = get_class_from_dynamic_module(name, vlm_dir)
    tokenizer = tokenizer_class.from_pretrained(vlm_dir, add_bos_token=False, add_eos_token=True)
    ids = tokenizer("Hello")["input_ids"]
    assert ids[0] != tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False
    reloaded = tokenizer_class.from_pretrained(tmp_path)
    assert (reloaded.add_bos_token, reloaded.add_eos_token) == (False, True)
    assert reloaded("Hello")["input_ids"] == ids
