"""Code written for the original: the evaluation frameworks' sequence of calls (VLMEvalKit, lmms-eval) gives the ids of
our processor + generate, Partial LoRA reaches prompt image positions only, and chat's repetition penalty counts the
ids the original counted."""

import math

import pytest
import torch
from PIL import Image
from test_chat import chat_dir, model, processor, tokenizer  # noqa: F401 - the tiny Hub-like model folder and its parts

TEXT = "[UNUSED_TOKEN_146]user\nDescribe the image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def frameworks_hd_transform(image, hd_num, tile):
    """VLMEvalKit's and lmms-eval's own `HD_transform` (torchvision's resize of a PIL image is PIL bilinear, `pad` is
    white), with their 336 as `tile` so it fits the tiny tower."""
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = scale * tile
    new_height = int(new_width / ratio)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    target = math.ceil(new_height / tile) * tile
    padded = Image.new("RGB", (new_width, target), (255, 255, 255))
    padded.paste(image, (0, int((target - new_height) / 2)))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def frameworks_embeds(model, text, image_path):
    """VLMEvalKit's `model_gen` up to `generate`: BOS, the image (resized and padded by the caller, at
    `model.hd_num`), then the text without BOS."""
    embeds, im_mask = [], []
    bos = model.encode_text("", add_special_tokens=True)
    embeds.append(bos)
    im_mask.append(torch.zeros(bos.shape[:2]))
    tile = model.config.vision_config.image_size
    image = frameworks_hd_transform(Image.open(image_path).convert("RGB"), model.hd_num, tile)
    image_embeds = model.encode_img(model.vis_processor(image).unsqueeze(0))
    embeds.append(image_embeds)
    im_mask.append(torch.ones(image_embeds.shape[:2]))
    text_embeds = model.encode_text(text, add_special_tokens=False)
    embeds.append(text_embeds)
    im_mask.append(torch.zeros(text_embeds.shape[:2]))
    return torch.cat(embeds, dim=1), torch.cat(im_mask, dim=1).bool()


def processor_inputs(model, processor, text, image_path, hd_num):
    """The same layout through our image processor and placeholder ids."""
    images = processor.image_processor(str(image_path), hd_num=hd_num)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size // 2
    rows, cols = images["image_grids"][0].tolist()
    num_tokens = side * side * (rows * cols + 1) + 1 + side * (rows + 1)
    text_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [processor.tokenizer.bos_token_id] + [model.config.image_token_id] * num_tokens + text_ids
    return {"input_ids": torch.tensor([ids]), **images}


@pytest.fixture
def client_model(model, tokenizer):
    """The model as the frameworks set it up: `model.tokenizer` assigned; `hd_num` restored after the test."""
    model.tokenizer = tokenizer
    yield model
    model.tokenizer = None
    model.hd_num = 25


def test_frameworks_call_sequence_gives_the_processor_path_ids(client_model, processor, chat_dir):
    model = client_model
    for image, hd_num in [("doc.png", 6), ("tall.png", 4), ("doc.png", 12)]:  # a different hd_num per call
        model.hd_num = hd_num
        embeds, im_mask = frameworks_embeds(model, TEXT, chat_dir / image)
        reference = processor_inputs(model, processor, TEXT, chat_dir / image, hd_num)
        assert torch.equal(im_mask, reference["input_ids"] == model.config.image_token_id)
        options = dict(num_beams=3, do_sample=False, temperature=1.0, repetition_penalty=1.0, max_new_tokens=6)
        ours = model.generate(inputs_embeds=embeds, im_mask=im_mask, min_new_tokens=6, **options)
        expected = model.generate(**reference, min_new_tokens=6, **options)
        # transformers returns only the new tokens for `inputs_embeds`: no prompt ids and no leading BOS to strip.
        assert ours.shape == (1, 6)
        assert ours.tolist() == expected[:, reference["input_ids"].shape[1] :].tolist()


def test_encode_img_gives_the_processor_features_bit_for_bit(client_model, processor, chat_dir):
    model = client_model
    tile = model.config.vision_config.image_size
    for name, hd_num in [("doc.png", 6), ("tall.png", 9)]:
        path = chat_dir / name
        inputs = processor.image_processor(str(path), hd_num=hd_num)
        expected = model.get_image_features(inputs["pixel_values"], inputs["image_grids"])[0]
        padded = frameworks_hd_transform(Image.open(path).convert("RGB"), hd_num, tile)
        pixels = model.vis_processor(padded)
        assert pixels.shape == (3, padded.height, padded.width) and pixels.dtype == torch.float32
        features = model.encode_img(pixels.unsqueeze(0))
        assert features.shape == (1, expected.shape[0], model.config.hidden_size)
        assert torch.equal(features[0], expected)
        assert torch.equal(model.encode_img(str(path), hd_num=hd_num)[0], expected)
        model.hd_num = hd_num  # the default of a path or PIL image, and of build_processor
        assert torch.equal(model.encode_img(Image.open(path))[0], expected)
        assert model.build_processor(model.tokenizer).image_processor.hd_num == model.config.hd_num == hd_num
        features, attention_mask, labels = model.img2emb(pixels.unsqueeze(0))
        assert torch.equal(features[0], expected)
        assert attention_mask.tolist() == [[1] * len(expected)] and labels.tolist() == [[-100] * len(expected)]


def test_decode_steps_get_no_partial_lora(client_model, chat_dir, monkeypatch):
    model = client_model
    model.hd_num = 6
    embeds, im_mask = frameworks_embeds(model, TEXT, chat_dir / "doc.png")
    seen = []
    decoder_forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda **kw: seen.append(kw.get("image_mask")) or decoder_forward(**kw))
    model.generate(inputs_embeds=embeds, im_mask=im_mask, num_beams=3, **GREEDY)
    assert len(seen) == 6
    assert torch.equal(seen[0], im_mask.repeat_interleave(3, dim=0))  # the prefill: every beam row
    assert seen[1:] == [None] * 5

    # The logits of greedy decoding equal a full forward in which generated tokens are text positions, and
    # differ from one in which they got the branch.
    monkeypatch.undo()
    out = model.generate(inputs_embeds=embeds, im_mask=im_mask, output_logits=True, return_dict_in_generate=True,
                         **GREEDY)  # fmt: skip
    generated = out.sequences[0]
    full = torch.cat([embeds, model.get_input_embeddings()(generated[None, :-1])], dim=1)
    step_logits = torch.cat(out.logits)  # (6, vocab)
    for as_image, close in [(False, True), (True, False)]:
        tail = torch.full((1, len(generated) - 1), as_image)
        logits = model(inputs_embeds=full, image_mask=torch.cat([im_mask, tail], dim=1)).logits
        logits = logits[0, embeds.shape[1] - 1 :]  # the logits that chose each generated token
        difference = (logits[1:] - step_logits[1:]).abs().max().item()
        assert (difference < 1e-5) == close, difference
        assert (logits[0] - step_logits[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}, {}])
def test_im_mask_and_image_mask_spellings_give_the_same_ids(client_model, processor, chat_dir, options):
    model = client_model
    model.hd_num = 6
    embeds, im_mask = frameworks_embeds(model, TEXT, chat_dir / "doc.png")
    reference = processor_inputs(model, processor, TEXT, chat_dir / "doc.png", 6)
    expected = model.generate(**reference, **GREEDY, **options)[:, reference["input_ids"].shape[1] :]
    for spelling in ("im_mask", "image_mask"):
        ids = model.generate(inputs_embeds=embeds, **{spelling: im_mask}, **GREEDY, **options)
        assert ids.tolist() == expected.tolist(), spelling
    assert expected.shape[0] == options.get("num_return_sequences", 1)


def test_forward_takes_im_mask_as_image_mask(client_model, chat_dir):
    """ms-swift's 4KHD template calls `model(inputs_embeds=..., im_mask=..., labels=...)`: the mask must reach the
    Partial LoRA branches, on the whole model and on its base model, not vanish into `**kwargs`."""
    model = client_model
    embeds, im_mask = frameworks_embeds(model, TEXT, chat_dir / "doc.png")
    with torch.no_grad():
        spelled = model(inputs_embeds=embeds, im_mask=im_mask).logits
        ours = model(inputs_embeds=embeds, image_mask=im_mask).logits
        unmasked = model(inputs_embeds=embeds).logits
        base = model.base_model(inputs_embeds=embeds, im_mask=im_mask).last_hidden_state
    assert (spelled - ours).abs().max().item() == 0
    assert (model.output(base) - ours).abs().max().item() == 0
    assert (spelled - unmasked).abs().max().item() > 1e-4


def test_a_mask_of_the_wrong_shape_is_refused(client_model, chat_dir):
    embeds, im_mask = frameworks_embeds(client_model, TEXT, chat_dir / "doc.png")
    with pytest.raises(ValueError, match=r"im_mask\) has shape \(1, \d+\) but the prompt is \(1, \d+\)"):
        client_model.generate(inputs_embeds=embeds, im_mask=im_mask[:, 1:], **GREEDY)
    with pytest.raises(ValueError, match="Pass the image mask once"):
        client_model.generate(inputs_embeds=embeds, im_mask=im_mask, image_mask=im_mask, **GREEDY)


def test_text_only_inputs_embeds_generation_equals_input_ids(client_model, processor):
    model = client_model
    inputs = processor(processor.build_prompt("Hello world! What is in the picture?"))
    expected = model.generate(**inputs, **GREEDY)[:, inputs["input_ids"].shape[1] :]
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    assert model.generate(inputs_embeds=embeds, **GREEDY).tolist() == expected.tolist()
    no_image = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    assert model.generate(inputs_embeds=embeds, im_mask=no_image, **GREEDY).tolist() == expected.tolist()
    assert torch.equal(model.build_inputs(processor.tokenizer, "Hello world! What is in the picture?")["input_ids"],
                       inputs["input_ids"])  # fmt: skip


def test_lmms_eval_defaults_and_decode_behave_as_the_original(client_model, tokenizer, chat_dir):
    """lmms-eval passes temperature=0 with do_sample=False (the original ignored it: greedy) and decodes with
    `add_special_tokens=False`."""
    model = client_model
    model.hd_num = 6
    embeds, im_mask = frameworks_embeds(model, TEXT, chat_dir / "doc.png")
    greedy = model.generate(inputs_embeds=embeds, im_mask=im_mask, **GREEDY)
    lmms_eval = model.generate(inputs_embeds=embeds, im_mask=im_mask, temperature=0, num_beams=1,
                               repetition_penalty=1.0, **GREEDY)  # fmt: skip
    assert lmms_eval.tolist() == greedy.tolist()
    assert model.tokenizer.decode(lmms_eval[0], add_special_tokens=False) == tokenizer.decode(greedy[0])
    image = str(chat_dir / "doc.png")
    chat_zero, _ = model.chat(tokenizer, "Describe it.", image=image, hd_num=4, temperature=0, **GREEDY)
    assert chat_zero == model.chat(tokenizer, "Describe it.", image=image, hd_num=4, **GREEDY)[0]


def test_interleav_wrap_chat_gives_the_chat_prompt(client_model, tokenizer, processor, chat_dir):
    model = client_model
    query, image = "<ImageHere>Describe the image.", str(chat_dir / "tall.png")
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, query, model.encode_img(image, hd_num=6), [], "")
    reference = processor(processor.build_prompt(query, meta_instruction=""), images=[image], hd_num=6)
    assert torch.equal(im_mask, reference["input_ids"] == model.config.image_token_id)
    expected = model.generate(**reference, **GREEDY)[:, reference["input_ids"].shape[1] :]
    assert model.generate(**inputs, im_mask=im_mask, **GREEDY).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="1 <ImageHere> but 2 images"):
        model.interleav_wrap_chat(tokenizer, query, torch.cat([model.encode_img(image, hd_num=6)] * 2), [], "")


def test_helpers_fail_with_the_fix(model, chat_dir):
    with pytest.raises(ValueError, match=r"model.tokenizer = AutoTokenizer"):
        model.encode_text("Hello")
    size = model.config.vision_config.image_size
    with pytest.raises(ValueError, match=f"multiples of {size}. HD-transform"):
        model.encode_img(torch.zeros(1, 3, size, size + 4))
    with pytest.raises(ValueError, match=rf"one image as a \(1, 3, H, W\) tensor, got \(2, 3, {size}, {size}\)"):
        model.encode_img(torch.zeros(2, 3, size, size))
    with pytest.raises(ValueError, match="hd_num must be between 1"):
        model.hd_num = 0
    assert model.hd_num == model.config.hd_num == 25


def penalised_by_hand(logits, ids, penalty):
    """transformers' repetition penalty on one row of logits, for the ids in `ids`, one id at a time."""
    expected = logits.clone()
    for token in set(ids):
        value = expected[token].item()
        expected[token] = value * penalty if value < 0 else value / penalty
    return expected


def generation_steps(model, tokenizer, monkeypatch, run):
    """Call `run()` (chat or batch_chat) with a spy on `generate`; return the prompt ids and attention mask, the
    generated ids, the logits of every step with the stop ids at -inf (as `min_new_tokens` sets them) and the scores
    after every logits processor."""
    seen = {}
    original_generate = model.generate
    stop_ids = torch.tensor([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")])

    def spy(**kwargs):
        out = original_generate(**kwargs, output_logits=True, output_scores=True, return_dict_in_generate=True)
        steps_masked = kwargs.get("min_new_tokens", 0)
        logits = [step.index_fill(1, stop_ids, -math.inf) if index < steps_masked else step
                  for index, step in enumerate(out.logits)]  # fmt: skip
        seen.update(prompt=kwargs["input_ids"], attention_mask=kwargs["attention_mask"], ids=out.sequences)
        seen.update(logits=logits, scores=out.scores)
        return out.sequences

    monkeypatch.setattr(model, "generate", spy)
    run()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("penalty", [1.005, 1.5])
def test_image_chat_penalises_only_the_reply(model, tokenizer, chat_dir, monkeypatch, penalty):
    image = str(chat_dir / "doc.png")
    seen = generation_steps(model, tokenizer, monkeypatch, lambda: model.chat(
        tokenizer, "<ImageHere>Describe the image.", image=image, hd_num=4, repetition_penalty=penalty, **GREEDY
    ))  # fmt: skip
    prompt = seen["prompt"][0].tolist()
    reply = seen["ids"][0, len(prompt) :].tolist()
    assert torch.equal(seen["scores"][0], seen["logits"][0])  # step 0: nothing generated yet, nothing penalised
    # Counting the prompt (with its placeholder ids) as well would change many step-0 logits.
    with_prompt = penalised_by_hand(seen["logits"][0][0], prompt, penalty)
    assert (with_prompt != seen["logits"][0][0]).sum() >= 5
    for step in range(1, 6):
        expected = penalised_by_hand(seen["logits"][step][0], reply[:step], penalty)
        assert torch.equal(seen["scores"][step][0], expected), step


def test_text_chat_penalises_the_prompt_too(model, tokenizer, monkeypatch):
    penalty = 1.5
    seen = generation_steps(model, tokenizer, monkeypatch, lambda: model.chat(
        tokenizer, "Hello world!", repetition_penalty=penalty, **GREEDY
    ))  # fmt: skip
    prompt = seen["prompt"][0].tolist()
    reply = seen["ids"][0, len(prompt) :].tolist()
    for step in range(6):
        expected = penalised_by_hand(seen["logits"][step][0], prompt + reply[:step], penalty)
        assert torch.equal(seen["scores"][step][0], expected), step
    assert (seen["scores"][0] != seen["logits"][0]).sum() >= len(set(prompt)) - 1


def test_batch_chat_penalises_each_row_as_chat_and_never_the_padding(model, tokenizer, chat_dir, monkeypatch):
    """Row by row as chat counts; the left padding (the EOS id, not masked: no min_new_tokens) never counts."""
    penalty = 1.5
    queries = ["<ImageHere>Describe the image.", "Hello world! What is in the picture?", "Hi"]
    images = [str(chat_dir / "doc.png"), None, None]
    seen = generation_steps(model, tokenizer, monkeypatch, lambda: model.batch_chat(
        tokenizer, queries, images, hd_num=4, max_new_tokens=1, repetition_penalty=penalty
    ))  # fmt: skip
    pad_id = tokenizer.pad_token_id
    assert seen["attention_mask"][2].tolist().count(0) > 0 and seen["logits"][0][2, pad_id] != 0
    for row, image in enumerate(images):
        counted = [] if image else seen["prompt"][row][seen["attention_mask"][row] == 1].tolist()
        assert pad_id not in counted
        expected = penalised_by_hand(seen["logits"][0][row], counted, penalty)
        assert torch.equal(seen["scores"][0][row], expected), row


def test_penalty_rows_follow_beam_expansion(model, processor, chat_dir):
    """Beam search repeats each prompt row in place; every copy counts what its prompt row counts."""
    inputs = processor([processor.build_prompt("<ImageHere>Hi"), processor.build_prompt("Hi")],
                       images=[[str(chat_dir / "doc.png")], []], hd_num=4)  # fmt: skip
    penalty = model._original_penalty({"repetition_penalty": 1.5}, inputs)
    assert penalty["repetition_penalty"] == 1.0
    beams = 3
    reply = torch.tensor([[5, 6], [7, 7], [8, 9], [10, 11], [5, 12], [13, 14]])  # two tokens per beam row
    rows = torch.cat([inputs["input_ids"].repeat_interleave(beams, dim=0), reply], dim=1)
    scores = torch.randn(len(rows), model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    processed = penalty["logits_processor"][-1](rows, scores.clone())
    text_ids = inputs["input_ids"][1][inputs["attention_mask"][1] == 1].tolist()
    for row in range(len(rows)):
        counted = reply[row].tolist() + (text_ids if row >= beams else [])
        assert torch.equal(processed[row], penalised_by_hand(scores[row], counted, 1.5)), row


def test_image_mask_with_input_ids_cached_or_not_equals_embeddings(model, processor):
    """The mask also goes with `input_ids`: the prefill (or, without a cache, every whole-sequence step) gets it."""
    inputs = processor(processor.build_prompt("Hello world! What is in the picture?"))
    image_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    image_mask[:, 3:9] = True  # as if these positions held image features
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    scores = dict(output_logits=True, return_dict_in_generate=True, **GREEDY)
    expected = model.generate(inputs_embeds=embeds, image_mask=image_mask, **scores)
    plain = model.generate(inputs_embeds=embeds, **scores)
    assert (expected.logits[0] - plain.logits[0]).abs().max() > 1e-3  # the mask matters for this prompt
    for use_cache in (True, False):
        out = model.generate(**inputs, image_mask=image_mask, use_cache=use_cache, **scores)
        assert out.sequences[:, inputs["input_ids"].shape[1] :].tolist() == expected.sequences.tolist(), use_cache
        difference = (torch.cat(out.logits) - torch.cat(expected.logits)).abs().max().item()
        assert difference < 1e-5, (use_cache, difference)
