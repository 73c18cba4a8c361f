"""The fast tokenizer equals the slow one: ids, special tokens, decoding and saved files, over a corpus with CJK,
whitespace runs, byte fallback and the chat markers; plus what only the fast one gives (offsets, word ids)."""

import io
import json
import shutil

import pytest
import sentencepiece as spm
from conftest import ROOT, SP_CORPUS, write_processor_dir
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

CORPUS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "中文 测试：上海人工智能实验室，浦语·灵笔。",
    "a    b\t\tc\n\n  d   ",
    "  leading spaces",
    "trailing spaces  ",
    "emoji 😀, ümlaut, Ωmega and ｆｕｌｌｗｉｄｔｈ",  # byte fallback: no pieces of the tiny model
    "[UNUSED_TOKEN_146]user\nWhat is it?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nA cat.[UNUSED_TOKEN_145]\n",
    "x[UNUSED_TOKEN_146]y[UNUSED_TOKEN_145]",
    "</s>after eos<s>after bos<unk>after unk",
    "don't stop . ok , n't 's",
    "",
    " ",
    "1234567890 3.14159",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sp_model_file):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    return write_processor_dir(tmp_path_factory.mktemp("fast"), sp_model_file, sp.piece_to_id("[UNUSED_TOKEN_140]"))


def load(folder, name):
    return get_class_from_dynamic_module(f"{name}", folder).from_pretrained(folder)


@pytest.fixture(scope="module")
def slow(tokenizer_dir):
    return load(tokenizer_dir, "tokenization_internlm2.InternLM2Tokenizer")


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)


def test_auto_tokenizer_gives_the_fast_class(fast, slow):
    assert type(fast).__name__ == "InternLM2TokenizerFast" and fast.is_fast
    assert type(slow).__name__ == "InternLM2Tokenizer" and not slow.is_fast
    assert fast.vocab_size == slow.vocab_size == len(fast)
    assert fast.get_vocab() == slow.get_vocab()


@pytest.mark.parametrize("text", CORPUS)
def test_ids_and_decoding_equal_the_slow_tokenizer(fast, slow, text):
    ids = slow(text)["input_ids"]
    assert fast(text)["input_ids"] == ids
    assert fast(text, add_special_tokens=False)["input_ids"] == slow(text, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(ids, skip_special_tokens=skip)
    assert fast.convert_ids_to_tokens(ids) == slow.convert_ids_to_tokens(ids)


def test_batches_pads_and_special_tokens_equal_the_slow_tokenizer(fast, slow):
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(fast, f"{name}_token") == getattr(slow, f"{name}_token")
        assert getattr(fast, f"{name}_token_id") == getattr(slow, f"{name}_token_id")
    assert fast.all_special_ids == slow.all_special_ids
    batch_fast = fast(CORPUS[:4], padding=True)
    batch_slow = slow(CORPUS[:4], padding=True)
    assert batch_fast["input_ids"] == batch_slow["input_ids"]
    assert batch_fast["attention_mask"] == batch_slow["attention_mask"]
    assert fast.batch_decode(batch_fast["input_ids"]) == slow.batch_decode(batch_slow["input_ids"])
    # Byte fallback: the emoji is four byte pieces, and they decode back to it.
    emoji = fast("😀", add_special_tokens=False)["input_ids"]
    assert fast.convert_ids_to_tokens(emoji) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert fast.decode(emoji) == "😀"


def test_chat_markers_are_one_id_each(fast, slow):
    for marker in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
        index = slow.convert_tokens_to_ids(marker)
        assert fast(marker, add_special_tokens=False)["input_ids"] == [index]
        assert fast.convert_tokens_to_ids(marker) == index


def test_offsets_and_word_ids(fast):
    text = "What is in the picture? 中文"
    encoding = fast(text, return_offsets_mapping=True)
    spans = encoding["offset_mapping"]
    assert spans[0] == (0, 0)  # BOS
    # The byte-fallback pieces of one character share its span.
    assert "".join(text[start:end] for start, end in dict.fromkeys(spans)) == text
    assert encoding.word_ids()[0] is None and all(index is not None for index in encoding.word_ids()[1:])


def test_save_writes_tokenizer_json_and_reloads_equal(fast, slow, tmp_path):
    fast.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer.model").is_file()
    for name in ["tokenization_internlm2.py", "tokenization_internlm2_fast.py", "image_processing_4khd.py"]:
        shutil.copy(ROOT / name, tmp_path / name)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    slow_reloaded = load(tmp_path, "tokenization_internlm2.InternLM2Tokenizer")  # the slow one still loads
    for text in CORPUS:
        assert reloaded(text)["input_ids"] == slow_reloaded(text)["input_ids"] == slow(text)["input_ids"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"] == [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]


def test_published_added_tokens_are_dropped_as_in_the_slow_tokenizer(tmp_path, sp_model_file):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(sp.get_piece_size() + index): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                           "single_word": False, "special": True}
        for index, name in enumerate(["<|im_start|>", "<|im_end|>"])
    }  # fmt: skip
    folder = write_processor_dir(tmp_path, sp_model_file, sp.piece_to_id("[UNUSED_TOKEN_140]"), tokenizer_config=config)
    fast = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert len(fast) == sp.get_piece_size()
    assert max(fast("<|im_start|>user")["input_ids"]) < sp.get_piece_size()


@pytest.mark.parametrize(
    "options",
    [{}, {"allow_whitespace_only_pieces": True, "split_digits": True, "remove_extra_whitespaces": False}],
    ids=["sentencepiece-defaults", "whitespace-pieces-and-digits"],
)
def test_other_sentencepiece_options_convert_exactly(tmp_path, options):
    """Models with a dummy prefix (sentencepiece's default, NFKC and whitespace clean-up too), whitespace-only pieces
    or split digits, with the chat markers as user-defined pieces: still the slow tokenizer's ids and text."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[f"[UNUSED_TOKEN_{index}]" for index in range(140, 147)], num_threads=1, minloglevel=2,
        **options,
    )  # fmt: skip
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "tokenizer.model").write_bytes(model.getvalue())
    folder = write_processor_dir(tmp_path / "model", tmp_path / "source" / "tokenizer.model", 3)
    slow = load(folder, "tokenization_internlm2.InternLM2Tokenizer")
    fast = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    for text in CORPUS:
        ids = slow(text)["input_ids"]
        assert fast(text)["input_ids"] == ids, text
        assert fast.decode(ids) == slow.decode(ids), text
