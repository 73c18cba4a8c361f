"""Tests for tokenization_internlm2.py and processing_internlm_xcomposer2.py: ids, prompt strings, image expansion.

A tiny sentencepiece model is trained here (fixed corpus and options, so its ids are reproducible); every expected id
is built by hand from that model with `sentencepiece` itself, every expected string is written out from docs/model.md section 6.
"""

import json
import sys

import numpy as np
import pytest
import sentencepiece as spm
from conftest import ROOT, write_processor_dir
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

TURN_START = "[UNUSED_TOKEN_146]"
TURN_END = "[UNUSED_TOKEN_145]"
RESERVED_IMAGE_PIECE = "[UNUSED_TOKEN_140]"  # the 7B model's image_token_id 92537 is this piece
# docs/model.md section 6, verbatim.
DEFAULT_SYSTEM = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by Shanghai "
    "AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on the "
    "provided image."
)
TILE = 56  # the tiny CLIP of conftest: 56 / 14 = 4 patches, 2 tokens per tile side after the 2x2 merge
TOKENS_PER_SIDE = 2

def count_for_grid(rows, cols):
    """docs/model.md section 5, step 6, at 2 tokens per tile side."""
    t = TOKENS_PER_SIDE
    return t * t * (rows * cols + 1) + 1 + t * (rows + 1)


def turn(role, text):
    return f"{TURN_START}{role}\n{text}{TURN_END}\n"


# ---- fixtures: a tiny sentencepiece model and a processor folder laid out like the Hub repository ----


@pytest.fixture(scope="module")
def sp(sp_model_file):
    return spm.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.fixture(scope="module")
def image_token_id(sp):
    return sp.piece_to_id(RESERVED_IMAGE_PIECE)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory, sp_model_file, image_token_id):
    return write_processor_dir(tmp_path_factory.mktemp("ixc_processor"), sp_model_file, image_token_id)


@pytest.fixture(scope="module")
def processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def tokenizer(processor_dir):
    return AutoTokenizer.from_pretrained(processor_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def image_module(processor):
    """The image processor's module as remote code loaded it: the one token-count function lives there."""
    return sys.modules[type(processor.image_processor).__module__]


def image(width, height):
    return Image.new("RGB", (width, height), (120, 30, 200))


# ---- tokenizer ----

TEXTS = [
    "Hello world!",
    "The image shows a city street at night.",
    "  two leading spaces and 中文 bytes",
    f"{TURN_START}user\nWhat is in the picture?{TURN_END}\n{TURN_START}assistant\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_sentencepiece_ids_after_bos(tokenizer, sp, text):
    assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)


def test_turn_markers_are_single_vocabulary_pieces(tokenizer, sp):
    for marker in (TURN_START, TURN_END):
        assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [sp.piece_to_id(marker)]
        assert tokenizer.convert_tokens_to_ids(marker) == sp.piece_to_id(marker)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_decode_keeps_special_tokens_as_published(tokenizer, sp):
    # The published decoding puts one space before a run of special tokens: " <s>text".
    ids = [sp.bos_id(), sp.bos_id()] + sp.encode(TEXTS[3])
    assert tokenizer.decode(ids) == " <s><s>" + TEXTS[3]


def test_special_tokens(tokenizer, sp):
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        sp.unk_id(),
        sp.bos_id(),
        sp.eos_id(),
    )
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == tokenizer.vocab_size == sp.get_piece_size()


def test_autotokenizer_loads_remote_class_and_round_trips(processor_dir, tmp_path, no_network):
    tokenizer = AutoTokenizer.from_pretrained(processor_dir, trust_remote_code=True)
    assert type(tokenizer).__name__ == "InternLM2TokenizerFast"  # the fast class of auto_map, converted on load
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(reloaded).__name__ == "InternLM2TokenizerFast"
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id


def test_shipped_tokenizer_config_registers_no_added_tokens():
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    for key in ("added_tokens_decoder", "additional_special_tokens", "extra_special_tokens"):
        assert key not in config


def test_published_added_tokens_never_give_ids_outside_the_vocabulary(tmp_path, sp_model_file, sp, image_token_id):
    # The published tokenizer_config registers six tokens just past the vocabulary (92544-92549 for the 7B model).
    names = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
    size = sp.get_piece_size()
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(size + index): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
        for index, name in enumerate(names)
    }
    config["additional_special_tokens"] = names
    folder = write_processor_dir(tmp_path / "old_config", sp_model_file, image_token_id, tokenizer_config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert len(tokenizer) == size
    text = "<|im_start|>user\nHi<|im_end|>\n<|plugin|>"
    assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)


# ---- prompt strings (docs/model.md section 6, written out by hand) ----


def test_prompt_with_default_system(processor):
    expected = (
        f"{TURN_START}system\n{DEFAULT_SYSTEM}{TURN_END}\n"
        f"{TURN_START}user\n<ImageHere>Describe the image.{TURN_END}\n"
        f"{TURN_START}assistant\n"
    )
    assert processor.build_prompt("<ImageHere>Describe the image.") == expected


def test_prompt_with_system_override(processor):
    expected = (
        "[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nHello[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\n"
    )
    assert processor.build_prompt("Hello", meta_instruction="Be brief.") == expected


@pytest.mark.parametrize("meta_instruction", ["", None])
def test_prompt_without_system(processor, meta_instruction):
    expected = "[UNUSED_TOKEN_146]user\nHello[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    assert processor.build_prompt("Hello", meta_instruction=meta_instruction) == expected


def test_prompt_with_two_history_turns(processor):
    history = [("<ImageHere>What is it?", "A cat."), ("What colour?", "Purple.")]
    expected = (
        "[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\n<ImageHere>What is it?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\nA cat.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nWhat colour?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\nPurple.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nIs it asleep?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\n"
    )
    assert processor.build_prompt("Is it asleep?", history=history, meta_instruction="Be brief.") == expected


def test_chat_template_matches_build_prompt(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                     {"type": "text", "text": " with it."}]},
    ]
    expected = processor.build_prompt("Compare <ImageHere> with it.", history=[("<ImageHere>What is it?", "A cat.")])
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    expected = processor.build_prompt(
        "Compare <ImageHere> with it.", history=[("<ImageHere>What is it?", "A cat.")], meta_instruction="Be brief."
    )
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == expected


def test_chat_template_tokenize_matches_processor_call(processor):
    picture = image(112, 56)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = processor(processor.build_prompt("<ImageHere>What?"), images=picture)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grids"):
        assert out[key].equal(expected[key])


# ---- prompt ids (built by hand: BOS per text segment, image_token_id x count per image) ----


def test_ids_one_image_and_question(processor, sp, image_token_id):
    prompt = processor.build_prompt("<ImageHere>Describe the image.", meta_instruction="Be brief.")
    before = turn("system", "Be brief.") + f"{TURN_START}user\n"
    after = f"Describe the image.{TURN_END}\n{TURN_START}assistant\n"
    # 112 x 56 at hd_num 2: scale 2 -> one row of two tiles.
    out = processor(prompt, images=image(112, 56), hd_num=2)
    assert out["image_grids"].tolist() == [[1, 2]]
    bos = sp.bos_id()
    expected = [bos] + sp.encode(before) + [image_token_id] * count_for_grid(1, 2) + [bos] + sp.encode(after)
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert tuple(out["pixel_values"].shape) == (3, 3, TILE, TILE)


def test_ids_text_only_start_with_two_bos(processor, sp):
    prompt = processor.build_prompt("Hello there")
    out = processor(prompt)
    assert out["input_ids"].tolist() == [[sp.bos_id(), sp.bos_id()] + sp.encode(prompt)]
    assert set(out.keys()) == {"input_ids", "attention_mask"}


def test_ids_with_history(processor, sp, image_token_id):
    history = [("What is it?", "A cat.")]
    prompt = processor.build_prompt("<ImageHere>And this one?", history=history, meta_instruction="")
    before = turn("user", "What is it?") + turn("assistant", "A cat.") + f"{TURN_START}user\n"
    after = f"And this one?{TURN_END}\n{TURN_START}assistant\n"
    out = processor(prompt, images=image(56, 56), hd_num=1)
    assert out["image_grids"].tolist() == [[1, 1]]
    bos = sp.bos_id()
    expected = [bos] + sp.encode(before) + [image_token_id] * count_for_grid(1, 1) + [bos] + sp.encode(after)
    assert out["input_ids"].tolist() == [expected]


def test_ids_two_images_in_one_prompt(processor, sp, image_token_id):
    prompt = processor.build_prompt("<ImageHere> and <ImageHere> differ how?", meta_instruction="")
    first, middle, last = prompt.split("<ImageHere>")
    # 56 x 112 at hd_num 2 is portrait: two rows of one tile.
    out = processor(prompt, images=[image(112, 56), image(56, 112)], hd_num=2)
    assert out["image_grids"].tolist() == [[1, 2], [2, 1]]
    bos = sp.bos_id()
    expected = (
        [bos] + sp.encode(first) + [image_token_id] * count_for_grid(1, 2)
        + [bos] + sp.encode(middle) + [image_token_id] * count_for_grid(2, 1)
        + [bos] + sp.encode(last)
    )
    assert out["input_ids"].tolist() == [expected]
    assert tuple(out["pixel_values"].shape) == (6, 3, TILE, TILE)


@pytest.mark.parametrize("size", [(200, 100), (100, 300)])
@pytest.mark.parametrize("hd_num", [1, 4, 9])
def test_placeholder_count_is_num_image_tokens_of_the_grid(processor, image_module, image_token_id, size, hd_num):
    out = processor(processor.build_prompt("<ImageHere>Describe."), images=image(*size), hd_num=hd_num)
    (rows, cols), = out["image_grids"].tolist()
    expected = image_module.num_image_tokens(rows, cols, image_module.tokens_per_side(TILE, 14))
    assert int((out["input_ids"] == image_token_id).sum()) == expected == count_for_grid(rows, cols)
    assert rows * cols <= hd_num
    assert out["pixel_values"].shape[0] == rows * cols + 1


# ---- image placement and errors ----


def test_one_image_too_many_raises_with_both_numbers(processor):
    prompt = processor.build_prompt("<ImageHere>Describe.")
    with pytest.raises(ValueError, match=r"contains 1 <ImageHere> but 2 images"):
        processor(prompt, images=[image(56, 56), image(56, 56)])


def test_one_image_too_few_raises_with_both_numbers(processor):
    prompt = processor.build_prompt("<ImageHere> or <ImageHere>?")
    with pytest.raises(ValueError, match=r"contains 2 <ImageHere> but 1 images"):
        processor(prompt, images=[image(56, 56)])


def test_placeholder_without_image_raises(processor):
    with pytest.raises(ValueError, match=r"contains 1 <ImageHere> but 0 images"):
        processor(processor.build_prompt("<ImageHere>Describe."))


def test_no_placeholder_puts_the_image_at_the_start_of_the_query(processor):
    history = [("Hi", "Hello.")]
    picture = image(56, 112)
    implicit = processor(processor.build_prompt("Describe.", history=history), images=picture, hd_num=2)
    explicit = processor(processor.build_prompt("<ImageHere>Describe.", history=history), images=picture, hd_num=2)
    assert implicit["input_ids"].tolist() == explicit["input_ids"].tolist()
    assert implicit["pixel_values"].equal(explicit["pixel_values"])


def test_reserved_image_piece_in_text_raises(processor):
    with pytest.raises(ValueError, match=r"\[UNUSED_TOKEN_140\].*reserved for image positions"):
        processor(processor.build_prompt(f"What is {RESERVED_IMAGE_PIECE}?"))


@pytest.mark.parametrize("which", ["past the vocabulary", "eos"])
def test_image_token_id_must_be_an_ordinary_vocabulary_id(processor_dir, sp, which):
    bad_id = sp.get_piece_size() if which == "past the vocabulary" else sp.eos_id()
    with pytest.raises(ValueError, match=rf"image_token_id={bad_id} is not an ordinary id of the tokenizer"):
        AutoProcessor.from_pretrained(processor_dir, trust_remote_code=True, image_token_id=bad_id)


# ---- batches ----


def test_batch_is_left_padded_with_masks_and_rows_equal_single_prompts(processor, tokenizer):
    prompts = [
        processor.build_prompt("<ImageHere>Describe the image in detail, please.", meta_instruction=""),
        processor.build_prompt("Hi"),
    ]
    images = [image(200, 100)]
    batch = processor(prompts, images=images, hd_num=4)
    singles = [processor(prompts[0], images=images, hd_num=4), processor(prompts[1])]
    length = batch["input_ids"].shape[1]
    assert length == max(single["input_ids"].shape[1] for single in singles)
    for row, single in enumerate(singles):
        ids = single["input_ids"][0].tolist()
        pad = length - len(ids)
        assert batch["input_ids"][row].tolist() == [tokenizer.pad_token_id] * pad + ids
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    assert batch["pixel_values"].equal(singles[0]["pixel_values"])
    assert batch["image_grids"].tolist() == singles[0]["image_grids"].tolist()


def test_batch_images_flat_or_per_prompt_agree(processor):
    prompts = [processor.build_prompt("<ImageHere>One?"), processor.build_prompt("<ImageHere><ImageHere>Two?")]
    images = [image(56, 56), image(112, 56), image(56, 112)]
    flat = processor(prompts, images=images, hd_num=2)
    nested = processor(prompts, images=[images[:1], images[1:]], hd_num=2)
    assert flat["input_ids"].tolist() == nested["input_ids"].tolist()
    assert flat["image_grids"].tolist() == [[1, 1], [1, 2], [2, 1]]


def test_right_padding(processor, tokenizer):
    prompts = [processor.build_prompt("Hi"), processor.build_prompt("A longer question than the other one")]
    batch = processor(prompts, padding_side="right", return_tensors="np")
    short = processor(prompts[0])["input_ids"][0].tolist()
    pad = batch["input_ids"].shape[1] - len(short)
    assert isinstance(batch["input_ids"], np.ndarray)
    assert batch["input_ids"][0].tolist() == short + [tokenizer.pad_token_id] * pad
    assert batch["attention_mask"][0].tolist() == [1] * len(short) + [0] * pad


# ---- decoding ----


def test_decode_and_postprocess_cut_the_reply_at_turn_end(processor, sp):
    reply = sp.encode(f"A purple square.{TURN_END}\n{TURN_START}user\n") + [sp.eos_id()]
    text = processor.decode(reply, skip_special_tokens=True)
    assert text == f"A purple square.{TURN_END}\n{TURN_START}user\n"
    assert processor.postprocess(text) == "A purple square."
    assert processor.postprocess(processor.batch_decode([reply, reply], skip_special_tokens=True)) == [
        "A purple square.",
        "A purple square.",
    ]


# ---- loading ----


def test_auto_processor_loads_offline_and_round_trips(processor_dir, tmp_path, image_token_id, no_network):
    processor = AutoProcessor.from_pretrained(processor_dir, trust_remote_code=True)
    assert type(processor).__name__ == "InternLMXComposer2Processor"
    assert type(processor.tokenizer).__name__ == "InternLM2TokenizerFast"
    assert type(processor.image_processor).__name__ == "InternLMXComposer2ImageProcessor"
    assert processor.image_token_id == image_token_id
    assert processor.image_token == "<ImageHere>"

    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(reloaded).__name__ == "InternLMXComposer2Processor"
    assert reloaded.image_token_id == image_token_id
    prompts = [processor.build_prompt("<ImageHere>Describe."), processor.build_prompt("Hi")]
    before = processor(prompts, images=[image(200, 100)], hd_num=4)
    after = reloaded(prompts, images=[image(200, 100)], hd_num=4)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grids"):
        assert after[key].equal(before[key])
    assert reloaded.build_prompt("Hi") == processor.build_prompt("Hi")


def test_shipped_processor_config():
    config = json.loads((ROOT / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_internlm_xcomposer2.InternLMXComposer2Processor"
    assert config["image_token_id"] == json.loads((ROOT / "config.json").read_text())["image_token_id"]
    image_config = json.loads((ROOT / "preprocessor_config.json").read_text())
    assert image_config["auto_map"]["AutoProcessor"] == config["auto_map"]["AutoProcessor"]
