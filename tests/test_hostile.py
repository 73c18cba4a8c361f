"""Hostile inputs and everyday mistakes at every entry point (docs/limits-and-errors.md). Each table row is one case: the call, the
exception type, and a pattern that must name the problem and the fix. Nothing may answer silently wrong, run an
external program, build gigabytes before refusing, or print a traceback for a user's mistake.

`test_the_suite_has_over_100_hostile_cases` counts the rows.
"""

import json
import math
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import ROOT, SP_CORPUS, TINY_CONFIG, load_file, write_model_dir, write_processor_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

S, E, PLACEHOLDER = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_140]"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456789\n"
QUERY = "<ImageHere>Describe the image."
IGNORE = -100

finetune = load_file("scripts/finetune.py")
finetune_data = load_file("scripts/finetune_data.py")
verify = load_file("scripts/verify_checkpoint.py")
chat_script = load_file("scripts/chat.py")
merge_lora = load_file("scripts/merge_lora.py")
cli = load_file("scripts/cli.py")


# ---- fixtures ----


@pytest.fixture(scope="module")
def sp(sp_model_file):
    return spm.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sp_model_file, sp):
    """A tiny model folder as a user gets it: code, config, weights, tokenizer, processor files and two images."""
    image_token_id = sp.piece_to_id(PLACEHOLDER)
    config = {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id}
    path = write_model_dir(tmp_path_factory.mktemp("hostile") / "tiny", config)
    write_processor_dir(path, sp_model_file, image_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(path, trust_remote_code=True), trust_remote_code=True
    )
    model.save_pretrained(path)
    Image.new("RGB", (100, 60), (200, 30, 30)).save(path / "doc.png")
    return path


@pytest.fixture(scope="module")
def ctx(folder, tmp_path_factory, sp_model_file):
    """Everything the table rows use: the model, tokenizer, processor, one good image batch, and bad files."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    files = tmp_path_factory.mktemp("bad_files")
    image = Image.new("RGB", (40, 30), (10, 200, 10))
    image.save(files / "eps.png", format="EPS")  # PostScript named .png: decoding it would run Ghostscript
    image.save(files / "ppm.png", format="PPM")
    (files / "lfs.png").write_bytes(LFS_POINTER)
    (files / "notes.png").write_text("not an image\n")
    inputs = processor(processor.build_prompt(QUERY), images=[str(folder / "doc.png")], hd_num=2)
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, processor=processor, folder=folder, files=files, inputs=dict(inputs),
        other_tokenizer=other_tokenizer(tmp_path_factory.mktemp("other"), sp_model_file, markers=True),
        plain_tokenizer=other_tokenizer(tmp_path_factory.mktemp("plain"), sp_model_file, markers=False),
    )  # fmt: skip


def other_tokenizer(folder, sp_model_file, markers):
    """An InternLM2 tokenizer of another vocabulary: with the chat markers (another model's), or without them (not
    an InternLM2 vocabulary at all)."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=350,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        user_defined_symbols=[f"[UNUSED_TOKEN_{index}]" for index in range(140, 147)] if markers else [],
    )  # fmt: skip
    (folder / "other.model").write_bytes(model.getvalue())
    write_processor_dir(folder, folder / "other.model", image_token_id=5)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(autouse=True)
def no_ghostscript(monkeypatch):
    """Fail any test that makes Pillow run Ghostscript (or any other program)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"an external program was started: {args[:1]}")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)


def case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


COUNTED = []  # the number of rows of every table, for the count test


def table(*rows):
    COUNTED.append(len(rows))
    return list(rows)


# ---- 1. hand-built tensors for generate and forward ----


def edit(**changes):
    """A function of the good inputs: `changes` maps a name to a function of the good inputs, or to None to drop it."""

    def apply(inputs):
        inputs = dict(inputs)
        for name, change in changes.items():
            if change is None:
                inputs.pop(name)
            else:
                inputs[name] = change(inputs)
        return inputs

    return apply


def with_id(value, position=-1):
    def change(inputs):
        ids = inputs["input_ids"].clone()
        ids[0, position] = value
        return ids

    return change


NO_IMAGE = {"pixel_values": None, "image_grids": None}
# fmt: off
TENSOR_CASES = table(
    case("ids-1d", edit(input_ids=lambda x: x["input_ids"][0]), ValueError, r"input_ids must be 2-D.*input_ids\[None\]"),
    case("ids-3d", edit(input_ids=lambda x: x["input_ids"][None]), ValueError, r"input_ids must be 2-D"),
    case("ids-float", edit(input_ids=lambda x: x["input_ids"].float()), ValueError, r"integer token ids.*\.long\(\)"),
    case("ids-half", edit(input_ids=lambda x: x["input_ids"].half()), ValueError, r"integer token ids"),
    case("ids-bool", edit(input_ids=lambda x: x["input_ids"] > 0), ValueError, r"integer token ids"),
    case("ids-list", edit(input_ids=lambda x: x["input_ids"].tolist()), TypeError, r"input_ids must be a torch tensor"),
    case("ids-numpy", edit(input_ids=lambda x: x["input_ids"].numpy()), TypeError, r"input_ids must be a torch tensor"),
    case("ids-empty-length", edit(input_ids=lambda x: x["input_ids"][:, :0], attention_mask=None, **NO_IMAGE),
         ValueError, r"input_ids is empty"),
    case("ids-empty-batch", edit(input_ids=lambda x: x["input_ids"][:0], attention_mask=None, **NO_IMAGE),
         ValueError, r"input_ids is empty"),
    case("ids-vocab-size", edit(input_ids=with_id(TINY_CONFIG["vocab_size"] * 1000)), ValueError,
         r"outside the vocabulary \[0, \d+\).*AutoTokenizer"),
    case("ids-huge", edit(input_ids=with_id(10**12)), ValueError, r"outside the vocabulary"),
    case("ids-negative", edit(input_ids=with_id(-1)), ValueError, r"outside the vocabulary.*\[-1\]"),
    case("ids-negative-first", edit(input_ids=with_id(-100, 0)), ValueError, r"outside the vocabulary"),
    case("mask-short", edit(attention_mask=lambda x: x["attention_mask"][:, 1:]), ValueError,
         r"attention_mask must have the shape of input_ids"),
    case("mask-long", edit(attention_mask=lambda x: torch.cat([x["attention_mask"]] * 2, 1)), ValueError,
         r"attention_mask must have the shape"),
    case("mask-batch", edit(attention_mask=lambda x: torch.cat([x["attention_mask"]] * 2)), ValueError,
         r"attention_mask must have the shape"),
    case("mask-1d", edit(attention_mask=lambda x: x["attention_mask"][0]), ValueError, r"attention_mask must have"),
    case("mask-list", edit(attention_mask=lambda x: x["attention_mask"].tolist()), ValueError,
         r"attention_mask must have"),
    case("placeholders-without-pixels", edit(**NO_IMAGE), ValueError, r"placeholder ids .* no pixel_values.*processor"),
    case("placeholders-without-anything", edit(attention_mask=None, **NO_IMAGE), ValueError, r"no pixel_values"),
    case("grids-float", edit(image_grids=lambda x: x["image_grids"].float()), ValueError,
         r"image_grids must hold integer"),
    case("grids-bool", edit(image_grids=lambda x: x["image_grids"] > 0), ValueError, r"image_grids must hold integer"),
    case("grids-1d", edit(image_grids=lambda x: x["image_grids"][0]), ValueError, r"image_grids must be a \(num_images, 2\)"),
    case("grids-list", edit(image_grids=lambda x: x["image_grids"].tolist()), ValueError, r"image_grids must be a"),
    case("grids-too-big", edit(image_grids=lambda x: x["image_grids"] * 2), ValueError, r"need \d+ tiles"),
    case("grids-zero", edit(image_grids=lambda x: x["image_grids"] * 0), ValueError, r"need \d+ tiles"),
    case("grids-missing", edit(image_grids=None), ValueError, r"pixel_values need .*image_grids"),
    case("pixels-nan", edit(pixel_values=lambda x: x["pixel_values"].index_fill(0, torch.tensor([0]), math.nan)),
         ValueError, r"NaN or infinite"),
    case("pixels-one-nan", edit(pixel_values=lambda x: x["pixel_values"].clone().index_put_(
        (torch.tensor([1]), torch.tensor([2]), torch.tensor([3]), torch.tensor([4])), torch.tensor(math.nan))),
         ValueError, r"NaN or infinite"),  # fmt: skip
    case("pixels-inf", edit(pixel_values=lambda x: x["pixel_values"] / 0), ValueError, r"NaN or infinite"),
    case("pixels-uint8", edit(pixel_values=lambda x: x["pixel_values"].to(torch.uint8)), ValueError, r"floating point"),
    case("pixels-wrong-size", edit(pixel_values=lambda x: x["pixel_values"][..., :10, :10]), ValueError,
         r"pixel_values must be a \(num_tiles, 3"),
    case("pixels-3d", edit(pixel_values=lambda x: x["pixel_values"][0]), ValueError, r"pixel_values must be a"),
    case("pixels-list", edit(pixel_values=lambda x: [x["pixel_values"]]), ValueError, r"pixel_values must be a"),
    case("pixels-too-few", edit(pixel_values=lambda x: x["pixel_values"][1:]), ValueError, r"need \d+ tiles"),
)
# fmt: on


@pytest.mark.parametrize("entry", ["generate", "forward"])
@pytest.mark.parametrize(("build", "error", "match"), TENSOR_CASES)
def test_hand_built_tensors_are_refused_with_the_fix(ctx, entry, build, error, match):
    inputs = build(ctx.inputs)
    with pytest.raises(error, match=match):
        if entry == "generate":
            ctx.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            ctx.model(**inputs)


# fmt: off
MAX_NEW_TOKENS_CASES = table(
    case("zero", 0, ValueError, r"max_new_tokens must be a positive integer"),
    case("negative", -5, ValueError, r"max_new_tokens must be a positive integer"),
    case("float", 2.5, ValueError, r"max_new_tokens must be a positive integer"),
    case("string", "8", ValueError, r"max_new_tokens must be a positive integer"),
    case("bool", True, ValueError, r"max_new_tokens must be a positive integer"),
    case("beyond-context", 10**9, ValueError, r"max_new_tokens=1000000000 .*config\.max_sequence_length"),
    case("context", 16384, ValueError, r"max_new_tokens=16384 leaves no room"),
    case("prompt-plus", 16380, ValueError, r"max_new_tokens=16380 and a prompt of \d+ ids .*max_new_tokens=\d+ or less"),
)
# fmt: on


@pytest.mark.parametrize(("max_new_tokens", "error", "match"), MAX_NEW_TOKENS_CASES)
def test_generate_names_max_new_tokens(ctx, max_new_tokens, error, match):
    with pytest.raises(error, match=match):
        ctx.model.generate(**ctx.inputs, max_new_tokens=max_new_tokens)


def test_checks_cost_no_host_sync_per_decode_step(ctx, monkeypatch):
    """The checks (with their one host read) run once, at generate's entry: the forwards of the steps skip them."""
    decoder = type(ctx.model.model)
    module = sys.modules[decoder.__module__]
    check = decoder._check_inputs
    skipped = []

    def recording(self, *args, **kwargs):
        skipped.append(module.INPUTS_CHECKED.get())
        return check(self, *args, **kwargs)

    monkeypatch.setattr(decoder, "_check_inputs", recording)
    output = ctx.model.generate(**ctx.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.shape[1] == ctx.inputs["input_ids"].shape[1] + 5
    assert skipped == [False] + [True] * 5  # checked at the entry; the prefill and 4 decode steps skip


def test_good_inputs_still_generate_and_train(ctx):
    output = ctx.model.generate(**ctx.inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape == (1, ctx.inputs["input_ids"].shape[1] + 3)
    labels = ctx.inputs["input_ids"].clone()
    loss = ctx.model(**ctx.inputs, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0


# ---- 2. chat, stream_chat and batch_chat arguments ----


def chat_args(**changes):
    """Keyword arguments of a good chat call (a text query, greedy, 2 new tokens) with `changes`; a value that is a
    function is called with the context."""

    def build(ctx):
        args = {"tokenizer": ctx.tokenizer, "query": "Hello!", "max_new_tokens": 2, "do_sample": False}
        args.update({name: value(ctx) if callable(value) else value for name, value in changes.items()})
        return args

    return build


def bad_file(name):
    return lambda ctx: str(ctx.files / name)


# fmt: off
CHAT_CASES = table(
    case("history-none", chat_args(history=None), TypeError, r"history must be a list of \(query, reply\) pairs.*history=\[\]"),
    case("history-str", chat_args(history="Hi"), TypeError, r"history must be a list.*got str"),
    case("history-bytes", chat_args(history=b"Hi"), TypeError, r"history must be a list"),
    case("history-dict", chat_args(history={"Hi": "Hello"}), TypeError, r"history must be a list"),
    case("history-of-str", chat_args(history=["Hi", "Hello"]), ValueError, r"history\[0\] must be a \(query, reply\) pair"),
    case("history-triple", chat_args(history=[("a", "b", "c")]), ValueError, r"history\[0\] must be a \(query, reply\)"),
    case("history-single", chat_args(history=[("a",)]), ValueError, r"history\[0\] must be"),
    case("history-second-bad", chat_args(history=[("a", "b"), ("c",)]), ValueError, r"history\[1\] must be"),
    case("history-none-reply", chat_args(history=[("a", None)]), TypeError, r"history\[0\]\[1\] \(a reply\) must be a str"),
    case("history-bytes-query", chat_args(history=[(b"a", "b")]), TypeError, r"history\[0\]\[0\].*decode"),
    case("history-surrogate", chat_args(history=[("a\ud800", "b")]), ValueError, r"history\[0\]\[0\].*lone surrogate"),
    case("query-bytes", chat_args(query=b"Hello"), TypeError, r"query must be a str, got bytes.*decode\('utf-8'\)"),
    case("query-bytearray", chat_args(query=bytearray(b"Hi")), TypeError, r"query must be a str.*decode"),
    case("query-none", chat_args(query=None), TypeError, r"query must be a str, got NoneType"),
    case("query-int", chat_args(query=42), TypeError, r"query must be a str"),
    case("query-list", chat_args(query=["Hello"]), TypeError, r"query must be a str"),
    case("query-surrogate", chat_args(query="bad \udc80 text"), ValueError, r"query contains a lone surrogate.*index 4"),
    case("query-high-surrogate", chat_args(query="\ud83d"), ValueError, r"lone surrogate"),
    case("query-empty", chat_args(query=""), ValueError, r"query is empty"),
    case("query-blank", chat_args(query=" \n\t"), ValueError, r"query is empty"),
    case("meta-bytes", chat_args(meta_instruction=b"x"), TypeError, r"meta_instruction must be a str"),
    case("meta-surrogate", chat_args(meta_instruction="x\udfff"), ValueError, r"meta_instruction .*lone surrogate"),
    case("meta-int", chat_args(meta_instruction=5), TypeError, r"meta_instruction must be a str"),
    case("max-new-zero", chat_args(max_new_tokens=0), ValueError, r"max_new_tokens must be a positive integer"),
    case("max-new-negative", chat_args(max_new_tokens=-1), ValueError, r"max_new_tokens must be a positive"),
    case("max-new-str", chat_args(max_new_tokens="1024"), ValueError, r"max_new_tokens must be a positive"),
    case("max-new-float", chat_args(max_new_tokens=2.5), ValueError, r"max_new_tokens must be a positive"),
    case("max-new-huge", chat_args(max_new_tokens=10**9), ValueError, r"max_new_tokens=1000000000 leaves no room"),
    case("max-new-context", chat_args(max_new_tokens=16384), ValueError, r"max_new_tokens=16384 .*max_sequence_length"),
    case("hd-num-zero", chat_args(hd_num=0), ValueError, r"hd_num must be between 1 and 1000"),
    case("hd-num-negative", chat_args(hd_num=-3), ValueError, r"hd_num must be between"),
    case("hd-num-1001", chat_args(hd_num=1001), ValueError, r"hd_num must be between 1 and 1000"),
    case("hd-num-float", chat_args(hd_num=2.5), ValueError, r"hd_num must be an integer"),
    case("hd-num-str", chat_args(hd_num="25"), ValueError, r"hd_num must be an integer"),
    case("hd-num-bool", chat_args(hd_num=True), ValueError, r"hd_num must be an integer"),
    case("tokenizer-processor", chat_args(tokenizer=lambda ctx: ctx.processor), TypeError, r"processor.*pass processor\.tokenizer"),
    case("tokenizer-image-processor", chat_args(tokenizer=lambda ctx: ctx.processor.image_processor), TypeError,
         r"tokenizer must be the model's InternLM2 tokenizer, got InternLMXComposer2ImageProcessor"),
    case("tokenizer-none", chat_args(tokenizer=None), TypeError, r"tokenizer must be the model's InternLM2 tokenizer.*AutoTokenizer"),
    case("tokenizer-str", chat_args(tokenizer="internlm"), TypeError, r"tokenizer must be.*AutoTokenizer\.from_pretrained"),
    case("tokenizer-other-vocab", chat_args(tokenizer=lambda ctx: ctx.other_tokenizer), ValueError,
         r"tokenizer has 350 ids but the model has \d+ \(config\.vocab_size\).*AutoTokenizer"),
    case("tokenizer-not-internlm", chat_args(tokenizer=lambda ctx: ctx.plain_tokenizer), ValueError,
         r"not an InternLM2 tokenizer: it lacks \[UNUSED_TOKEN_146\], \[UNUSED_TOKEN_145\].*AutoTokenizer"),
    case("image-missing", chat_args(query=QUERY, image=bad_file("missing.png")), FileNotFoundError, r"Image file not found"),
    case("image-directory", chat_args(query=QUERY, image=lambda ctx: str(ctx.files)), IsADirectoryError, r"is a directory"),
    case("image-text", chat_args(query=QUERY, image=bad_file("notes.png")), ValueError, r"does not recognise its format"),
    case("image-eps", chat_args(query=QUERY, image=bad_file("eps.png")), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("image-ppm", chat_args(query=QUERY, image=bad_file("ppm.png")), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("image-lfs-pointer", chat_args(query=QUERY, image=bad_file("lfs.png")), ValueError, r"Git LFS pointer.*git lfs pull"),
    case("image-float-array", chat_args(query=QUERY, image=np.zeros((20, 20, 3))), ValueError, r"uint8 pixels"),
    case("image-batched-array", chat_args(query=QUERY, image=np.zeros((2, 20, 20, 3), np.uint8)), ValueError,
         r"must be \(H, W\)"),
    case("image-dict", chat_args(query=QUERY, image={"path": "doc.png"}), ValueError, r"Unsupported image type dict"),
    case("image-two-placeholders", chat_args(query="<ImageHere><ImageHere>Hi", image=lambda ctx: str(ctx.folder / "doc.png")),
         ValueError, r"contains 2 <ImageHere> but 1 images"),
)
# fmt: on


@pytest.mark.parametrize(("build", "error", "match"), CHAT_CASES)
def test_chat_refuses_with_the_fix(ctx, build, error, match):
    with pytest.raises(error, match=match):
        ctx.model.chat(**build(ctx))


STREAM_CASES = [param for param in CHAT_CASES if param.id.split("-")[0] in ("history", "query", "tokenizer", "max")]
COUNTED.append(len(STREAM_CASES))


@pytest.mark.parametrize(("build", "error", "match"), STREAM_CASES)
def test_stream_chat_raises_the_same_errors(ctx, build, error, match):
    with pytest.raises(error, match=match):
        list(ctx.model.stream_chat(**build(ctx)))


def batch_args(queries, images=None, **changes):
    def build(ctx):
        args = {"tokenizer": ctx.tokenizer, "queries": queries, "images": images, "max_new_tokens": 2}
        args.update({name: value(ctx) if callable(value) else value for name, value in changes.items()})
        return args

    return build


# fmt: off
BATCH_CASES = table(
    case("queries-str", batch_args("Hello"), TypeError, r"queries must be a non-empty list.*pass \[query\], or use chat"),
    case("queries-bytes", batch_args(b"Hello"), TypeError, r"queries must be a non-empty list"),
    case("queries-none", batch_args(None), TypeError, r"queries must be a non-empty list"),
    case("queries-empty", batch_args([]), TypeError, r"queries must be a non-empty list"),
    case("queries-dict", batch_args({"q": "Hi"}), TypeError, r"queries must be a non-empty list"),
    case("images-str", batch_args(["<ImageHere>Hi"], "doc.png"), TypeError, r"images must be a list with one entry per query"),
    case("images-too-few", batch_args(["Hi", "Ho"], [None]), ValueError, r"2 queries but 1 image entries"),
    case("tokenizer-processor", batch_args(["Hi"], tokenizer=lambda ctx: ctx.processor), TypeError, r"processor\.tokenizer"),
    case("tokenizer-other", batch_args(["Hi"], tokenizer=lambda ctx: ctx.other_tokenizer), ValueError, r"another model"),
    case("hd-num-zero", batch_args(["Hi"], hd_num=0), ValueError, r"hd_num must be between"),
    case("max-new-huge", batch_args(["Hi"], max_new_tokens=10**6), ValueError, r"max_new_tokens=1000000 leaves no room"),
    case("meta-bytes", batch_args(["Hi"], meta_instruction=b"x"), TypeError, r"meta_instruction must be a str"),
)
# fmt: on


@pytest.mark.parametrize(("build", "error", "match"), BATCH_CASES)
def test_batch_chat_refuses_with_the_fix(ctx, build, error, match):
    with pytest.raises(error, match=match):
        ctx.model.batch_chat(**build(ctx))


@pytest.mark.parametrize("bad", [b"Hello", None, "x\ud800", ""], ids=["bytes", "none", "surrogate", "empty"])
def test_batch_chat_answers_the_others_when_one_query_is_bad(ctx, bad):
    with pytest.raises(ValueError) as caught:
        ctx.model.batch_chat(ctx.tokenizer, ["Hello!", bad], max_new_tokens=2, min_new_tokens=2)
    assert type(caught.value).__name__ == "BatchChatError" and sorted(caught.value.errors) == [1]
    assert "query" in str(caught.value.errors[1])
    assert caught.value.replies[1] is None and isinstance(caught.value.replies[0], str)


COUNTED.append(4)


def call_processor(*args, **kwargs):
    return lambda ctx: ctx.processor(*args, **kwargs)


# fmt: off
PROCESSOR_CASES = table(
    case("text-surrogate", call_processor("Hi \udc80"), ValueError, r"text\[0\] contains a lone surrogate"),
    case("batch-surrogate", call_processor(["Hi", "x\ud800"]), ValueError, r"text\[1\] contains a lone surrogate"),
    case("text-bytes", call_processor(b"Hi"), ValueError, r"text must be a prompt string"),
    case("text-empty-list", call_processor([]), ValueError, r"text must be a prompt string"),
    case("hd-num-1001", call_processor("Hi", hd_num=1001), ValueError, r"hd_num must be between 1 and 1000"),
    case("placeholder-piece", call_processor(f"{PLACEHOLDER}Hi"), ValueError, r"reserved for image positions"),
    case("too-few-images", call_processor("<ImageHere><ImageHere>", images=[Image.new("RGB", (9, 9))]), ValueError,
         r"contains 2 <ImageHere> but 1 images"),
    case("too-long", call_processor("<ImageHere>Hi", images=[Image.new("RGB", (900, 900))], hd_num=25, max_length=50),
         ValueError, r"more than max_length=50 \(its 1 image\(s\) take \d+\); hd_num=\d+ fits"),
)
# fmt: on


@pytest.mark.parametrize(("build", "error", "match"), PROCESSOR_CASES)
def test_the_processor_refuses_with_the_fix(ctx, build, error, match):
    with pytest.raises(error, match=match):
        build(ctx)


# ---- 3. training conversations: refused, or labels provably right ----


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# fmt: off
TRAINING_CASES = table(
    case("two-user-turns", turns(("user", "Hi"), ("user", "Hello?"), ("assistant", "Yes.")), ValueError,
         r"Turn 1 .* user turn where a assistant turn belongs.*Merge consecutive"),
    case("two-answers", turns(("user", "Hi"), ("assistant", "Yes."), ("assistant", "No."), ("user", "x"),
                              ("assistant", "y")), ValueError, r"Turn 2 .* assistant turn where a user turn belongs"),
    case("starts-with-answer", turns(("assistant", "Yes."), ("user", "Hi")), ValueError, r"Turn 0 .*where a user turn"),
    case("ends-with-question", turns(("user", "Hi"), ("assistant", "Yes."), ("user", "And?")), ValueError,
         r"ends with a user turn \(turn 2\)"),
    case("only-question", turns(("user", "Hi")), ValueError, r"ends with a user turn"),
    case("empty", [], ValueError, r"non-empty list of turns"),
    case("none", None, ValueError, r"non-empty list of turns"),
    case("system-role", turns(("system", "Be nice."), ("user", "Hi"), ("assistant", "Yes.")), ValueError,
         r"Turn 0 .*role 'user' or 'assistant'"),
    case("no-role", [{"content": "Hi"}, {"role": "assistant", "content": "x"}], ValueError, r"Turn 0 .*needs a role"),
    case("turn-str", ["Hi", "Yes"], ValueError, r"Turn 0 .*needs a role"),
    case("content-none", turns(("user", None), ("assistant", "x")), TypeError, r"content of turn 0 must be a str"),
    case("content-bytes", turns(("user", "Hi"), ("assistant", b"x")), TypeError, r"content of turn 1 must be a str.*decode"),
    case("content-int", turns(("user", 3), ("assistant", "x")), TypeError, r"content of turn 0 must be a str"),
    case("content-surrogate", turns(("user", "Hi\udc80"), ("assistant", "x")), ValueError, r"turn 0 contains a lone surrogate"),
    case("eos-in-question", turns(("user", "What is </s> in HTML?"), ("assistant", "Strike.")), ValueError,
         r"Turn 0 \(user\) contains '</s>', which tokenises to the reserved id 2.*Remove or rewrite"),
    case("bos-in-question", turns(("user", "<s>Hi"), ("assistant", "Yes.")), ValueError, r"Turn 0 \(user\) contains '<s>'"),
    case("eos-in-answer", turns(("user", "Hi"), ("assistant", "Yes.</s>")), ValueError, r"Turn 1 \(assistant\) contains '</s>'"),
    case("unk-in-answer", turns(("user", "Hi"), ("assistant", "<unk>")), ValueError, r"contains '<unk>'"),
    case("turn-end-in-question", turns(("user", f"Hi{E}"), ("assistant", "Yes.")), ValueError,
         r"contains '\[UNUSED_TOKEN_145\]'.*turn marker"),
    case("turn-start-in-answer", turns(("user", "Hi"), ("assistant", f"{S}user\nmore")), ValueError,
         r"Turn 1 .*contains '\[UNUSED_TOKEN_146\]'"),
    case("placeholder-piece", turns(("user", f"{PLACEHOLDER}Hi"), ("assistant", "Yes.")), ValueError,
         r"contains '\[UNUSED_TOKEN_140\]'.*image placeholder"),
)
# fmt: on


@pytest.mark.parametrize("method", ["training_example", "training_length"])
@pytest.mark.parametrize(("messages", "error", "match"), TRAINING_CASES)
def test_training_conversations_that_would_mistrain_are_refused(ctx, method, messages, error, match):
    with pytest.raises(error, match=match):
        getattr(ctx.processor, method)(messages)


TEXT = st.text(alphabet="ab </s>[]UNTOKE_1456<>\n?.", min_size=1, max_size=12)
RESERVED = ("<s>", "</s>", "<unk>", S, E, PLACEHOLDER)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(
    pairs=st.lists(
        st.tuples(st.one_of(TEXT, st.sampled_from(RESERVED).map(lambda piece: f"x{piece}y")), TEXT),
        min_size=1, max_size=3,
    )
)  # fmt: skip
def test_labels_train_exactly_the_answers_or_the_example_is_refused(ctx, sp, pairs):
    """Random conversations, some with reserved pieces inside: either the example is refused, exactly when a
    stripped content contains a reserved piece, or its ids and labels equal ones built piece by piece from raw
    sentencepiece, with exactly the answers, their turn-end markers, the final newline and EOS trained."""
    pairs = [(question.strip() or "q", answer.strip() or "a") for question, answer in pairs]
    messages = turns(*[(role, text) for pair in pairs for role, text in zip(("user", "assistant"), pair)])
    if any(piece in text for pair in pairs for text in pair for piece in RESERVED):
        with pytest.raises(ValueError, match="reserved id"):
            ctx.processor.training_example(messages)
        return
    parts = [("<s>", False)]
    for index, (question, answer) in enumerate(pairs):
        parts += [("\n", False)] * (index > 0)
        parts += [(S + "user\n" + question, False), (E, False), ("\n" + S + "assistant\n", False)]
        parts += [(answer, True), (E, True)]
    parts += [("\n", True), ("</s>", True)]
    ids, labels = [], []
    for piece, trained in parts:
        piece_ids = {"<s>": [sp.bos_id()], "</s>": [sp.eos_id()]}.get(piece) or sp.encode(piece)
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    example = ctx.processor.training_example(messages)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels


# ---- 4. files: only the listed image formats, no external program, Git LFS pointers named ----


def eps_file(path):
    Image.new("RGB", (30, 20), (255, 0, 0)).save(path, format="EPS")
    return path


def saved_as(fmt, **options):
    def write(path):
        Image.new("RGB", (30, 20), (0, 0, 255)).save(path, format=fmt, **options)
        return path

    return write


# fmt: off
IMAGE_FILE_CASES = table(
    case("eps-named-png", lambda d: eps_file(d / "photo.png"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("eps", lambda d: eps_file(d / "photo.eps"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("ppm", lambda d: saved_as("PPM")(d / "photo.ppm"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("ico", lambda d: saved_as("ICO")(d / "photo.ico"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("pcx", lambda d: saved_as("PCX")(d / "photo.pcx"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("tga", lambda d: saved_as("TGA")(d / "photo.tga"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("sgi", lambda d: saved_as("SGI")(d / "photo.sgi"), ValueError, r"PNG, JPEG, WebP, GIF, TIFF or BMP"),
    case("lfs-pointer", lambda d: (d / "photo.png").write_bytes(LFS_POINTER) and d / "photo.png", ValueError,
         r"'.*photo\.png' is a Git LFS pointer file, not the image.*git lfs install && git lfs pull"),
    case("lazy-eps-image", lambda d: Image.open(eps_file(d / "photo.eps")), ValueError,
         r"Refusing to decode .* EPS image.*Ghostscript"),
    case("lazy-ppm-image", lambda d: Image.open(saved_as("PPM")(d / "photo.ppm")), ValueError, r"PPM image"),
)
# fmt: on


@pytest.mark.parametrize(("make", "error", "match"), IMAGE_FILE_CASES)
def test_image_files_outside_the_listed_formats_are_refused(ctx, tmp_path, make, error, match):
    """No Ghostscript or other program runs (the autouse `no_ghostscript` fixture fails the test if one would)."""
    with pytest.raises(error, match=match):
        ctx.processor.image_processor(make(tmp_path))


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("GIF", {}), ("TIFF", {}), ("BMP", {}), ("MPO", {})],
)
def test_the_listed_formats_still_read(ctx, tmp_path, fmt, options):
    path = saved_as(fmt, **options)(tmp_path / f"ok.{fmt.lower()}")
    assert ctx.processor.image_processor(path, hd_num=1)["image_grids"].tolist() == [[1, 1]]


def test_an_image_of_another_format_already_in_memory_is_accepted(ctx, tmp_path):
    image = Image.open(saved_as("PPM")(tmp_path / "ok.ppm"))
    image.load()  # decoded by the caller, who chose to trust the file
    assert ctx.processor.image_processor(image, hd_num=1)["image_grids"].tolist() == [[1, 1]]


def copy_folder(folder, destination):
    import shutil

    return shutil.copytree(folder, destination, ignore=shutil.ignore_patterns("*.png"))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_weights_that_are_git_lfs_pointers_are_named(folder, tmp_path, name):
    clone = copy_folder(folder, tmp_path / "clone")
    (clone / "model.safetensors").unlink()
    (clone / name).write_bytes(LFS_POINTER)
    with pytest.raises(ValueError, match=rf"{name} in '.*clone' are Git LFS pointer files.*git lfs pull"):
        AutoModelForCausalLM.from_pretrained(clone, trust_remote_code=True)


def test_a_tokenizer_model_that_is_a_git_lfs_pointer_is_named(folder, tmp_path):
    clone = copy_folder(folder, tmp_path / "clone")
    (clone / "tokenizer.model").write_bytes(LFS_POINTER)
    # transformers 4.57 without protobuf turns any error of a tokenizer's __init__ into an ImportError about protobuf
    # (its `except` clause imports it); ours is then the exception it was handling.
    with pytest.raises((ValueError, ImportError)) as caught:
        AutoTokenizer.from_pretrained(clone, trust_remote_code=True)
    error = caught.value if isinstance(caught.value, ValueError) else caught.value.__context__
    assert re.search(r"tokenizer\.model' is a Git LFS pointer file, not the sentencepiece model", str(error))


COUNTED.append(3)


# ---- 5. data files: the file and the line, every image decoded before training ----


def write_data(folder, samples=None, text=None, raw=None, name="data.json"):
    path = folder / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text if text is not None else json.dumps(samples))
    return path


def sample(images=(), question="<ImageHere>What is it?", answer="A square."):
    return {"id": "s1", "image": list(images), "conversations": [
        {"from": "user", "value": question}, {"from": "assistant", "value": answer}]}  # fmt: skip


def good_image(folder, name="ok.png"):
    Image.new("RGB", (60, 40), (0, 120, 0)).save(folder / name)
    return name


def truncated_image(folder, name="cut.png"):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(folder / name)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return name


# fmt: off
DATA_CASES = table(
    case("bad-json", lambda d: write_data(d, text='[\n {"id": 1,\n  "image": }\n]'), ValueError,
         r"data\.json:3:12: not valid JSON: Expecting value"),
    case("json-trailing-comma", lambda d: write_data(d, text='[{"id": 1},\n]'), ValueError, r"data\.json:2:1: not valid JSON"),
    case("json-not-utf8", lambda d: write_data(d, raw=b'[\n{"id": "caf\xe9"}]'), ValueError,
         r"data\.json:2: the file is not UTF-8 text \(byte 0xe9"),
    case("json-object", lambda d: write_data(d, {"id": 1}), ValueError, r"non-empty JSON list of samples, got dict"),
    case("json-empty-list", lambda d: write_data(d, []), ValueError, r"non-empty JSON list"),
    case("json-lfs-pointer", lambda d: write_data(d, raw=LFS_POINTER), ValueError, r"data\.json:1:1: not valid JSON"),
    case("txt-not-utf8", lambda d: write_data(d, raw=b"a.json 1\n\xff\xfe 2\n", name="data.txt"), ValueError,
         r"data\.txt:2: the file is not UTF-8"),
    case("txt-huge-count", lambda d: write_data(d, text="data.json 1e12\n", name="data.txt"), ValueError,
         r"data\.txt:1: .*count in \(0, 10000\] thousand"),
    case("txt-nan-count", lambda d: write_data(d, text="data.json nan\n", name="data.txt"), ValueError, r"data\.txt:1:"),
    case("txt-inf-count", lambda d: write_data(d, text="# mix\ndata.json inf\n", name="data.txt"), ValueError, r"data\.txt:2:"),
    case("txt-negative-count", lambda d: write_data(d, text="data.json -1\n", name="data.txt"), ValueError, r"data\.txt:1:"),
    case("txt-tiny-count", lambda d: write_data(d, text="data.json 0.0001\n", name="data.txt"), ValueError, r"data\.txt:1:"),
    case("txt-hd-num-zero", lambda d: write_data(d, text="data.json 1 0\n", name="data.txt"), ValueError,
         r"data\.txt:1: .*hd_num in 1-1000"),
    case("txt-hd-num-huge", lambda d: write_data(d, text="data.json 1 5000\n", name="data.txt"), ValueError, r"data\.txt:1:"),
    case("txt-missing-source", lambda d: write_data(d, text="\nabsent.json 1\n", name="data.txt"), FileNotFoundError,
         r"data\.txt:2: no data file at .*absent\.json"),
)
# fmt: on


@pytest.mark.parametrize(("make", "error", "match"), DATA_CASES)
def test_bad_data_files_name_the_file_and_the_line(ctx, tmp_path, make, error, match):
    write_data(tmp_path, [sample()])  # the source a data.txt names, where the case does not replace it
    path = make(tmp_path)
    with pytest.raises(error, match=match):
        sources = finetune_data.read_sources(path)
        finetune_data.ConversationDataset(ctx.processor, sources, max_length=4096, hd_num=2)


# fmt: off
SAMPLE_CASES = table(
    case("truncated-image", lambda d: [sample([truncated_image(d)])], ValueError,
         r"sample 0 \(id 's1'\) of .*: Cannot decode image file '.*cut\.png'"),
    case("eps-image", lambda d: [sample([eps_file(d / "e.png").name])], ValueError, r"sample 0 .*PNG, JPEG, WebP"),
    case("lfs-image", lambda d: [sample([(d / "l.png").write_bytes(LFS_POINTER) and "l.png"])], ValueError,
         r"sample 0 .*Git LFS pointer"),
    case("directory-image", lambda d: [sample([(d / "sub").mkdir() or "sub"])], FileNotFoundError, r"sample 0 .*does not exist"),
    case("image-int", lambda d: [sample([7])], ValueError, r"sample 0 .*'image' must be a path or a list of paths"),
    case("image-empty-name", lambda d: [sample([""])], ValueError, r"'image' must be a path"),
    case("second-sample-bad", lambda d: [sample([good_image(d)]), sample([truncated_image(d)])], ValueError,
         r"sample 1 \(id 's1'\)"),
    case("eos-in-text", lambda d: [sample(question="Hi </s>")], ValueError, r"sample 0 .*contains '</s>'"),
    case("two-user-turns", lambda d: [{"id": "x", "conversations": [{"from": "user", "value": "a"},
                                                                     {"from": "user", "value": "b"}]}],
         ValueError, r"sample 0 \(id 'x'\).*Turn 1"),  # fmt: skip
)
# fmt: on


@pytest.mark.parametrize(("make", "error", "match"), SAMPLE_CASES)
def test_every_image_and_turn_is_checked_before_training(ctx, tmp_path, make, error, match):
    path = write_data(tmp_path, make(tmp_path))
    with pytest.raises(error, match=match):
        finetune_data.ConversationDataset(ctx.processor, finetune_data.read_sources(path), max_length=4096, hd_num=2)


def test_an_image_over_the_pixel_limit_stops_the_dataset_build(ctx, tmp_path, monkeypatch):
    name = good_image(tmp_path)  # 60 x 40 = 2400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # below twice the limit Pillow itself only warns
    path = write_data(tmp_path, [sample([name])])
    with pytest.raises(ValueError, match=r"sample 0 .*Refusing to decode .* 2400 pixels"):
        finetune_data.ConversationDataset(ctx.processor, finetune_data.read_sources(path), max_length=4096, hd_num=2)


COUNTED.append(1)


# ---- 6. resources: the token budget before any tile ----


def test_hd_num_1000_on_a_large_photo_is_refused_before_any_tile(ctx, monkeypatch):
    """At the real tile size a 4000 x 3000 photo at hd_num 1000 would be ~1000 tiles (1.4 GB of float32); the length
    check must come first."""
    hd = sys.modules[type(ctx.processor.image_processor).__module__]
    processor = type(ctx.processor)(
        hd.InternLMXComposer2ImageProcessor(), ctx.tokenizer, image_token_id=ctx.processor.image_token_id
    )
    monkeypatch.setattr(hd, "_write_tiles", lambda *args: pytest.fail("tiles were built before the length check"))
    photo = Image.new("RGB", (4000, 3000), (90, 90, 90))
    with pytest.raises(ValueError, match=r"more than max_length=16000.*hd_num=\d+ fits"):
        processor(processor.build_prompt(QUERY), images=[photo], hd_num=1000, max_length=16000)


def test_hd_num_1000_in_training_is_refused_before_any_tile(ctx, monkeypatch):
    hd = sys.modules[type(ctx.processor.image_processor).__module__]
    monkeypatch.setattr(hd, "_write_tiles", lambda *args: pytest.fail("tiles were built before the length check"))
    messages = turns(("user", QUERY), ("assistant", "A photo."))
    with pytest.raises(ValueError, match=r"more than max_length=500"):
        ctx.processor.training_example(messages, [Image.new("RGB", (4000, 3000))], hd_num=1000, max_length=500)


def test_chat_at_hd_num_1000_is_refused_before_any_tile(ctx, monkeypatch):
    hd = sys.modules[type(ctx.processor.image_processor).__module__]
    monkeypatch.setattr(hd, "_write_tiles", lambda *args: pytest.fail("tiles were built before the length check"))
    monkeypatch.setattr(ctx.model.config, "max_sequence_length", 600)
    with pytest.raises(ValueError, match=r"more than max_length=598.*hd_num=\d+ fits"):
        ctx.model.chat(ctx.tokenizer, QUERY, image=Image.new("RGB", (4000, 3000)), hd_num=1000, max_new_tokens=2)


COUNTED.append(3)


# ---- 7. scripts: one error line, checks before loading, no foreign code ----


def script_error(main, argv, capsys=None):
    """Run a script's main through `cli.run` as `__main__` does; return the exit message."""
    with pytest.raises(SystemExit) as caught:
        cli.run(lambda: main([str(arg) for arg in argv]))
    return str(caught.value.code)


@pytest.fixture
def data_dir(tmp_path):
    good_image(tmp_path)
    write_data(tmp_path, [sample(["ok.png"])])
    return tmp_path


def no_weights(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


# fmt: off
FINETUNE_CASES = table(
    case("missing-data", lambda f, d: [f, d / "absent.json"], None, r"^error: No data file at .*absent\.json"),
    case("missing-image", lambda f, d: [f, write_data(d, [sample(["gone.png"])], name="g.json")], None,
         r"^error: sample 0 \(id 's1'\) of .*g\.json: image .*gone\.png does not exist"),
    case("absent-model", lambda f, d: [d / "no" / "such" / "folder", d / "data.json"], None,
         r"^error: No model folder at '.*folder'; pass the folder"),
    case("relative-absent-model", lambda f, d: ["./no/such", d / "data.json"], None, r"^error: No model folder at './no/such'"),
    case("model-without-weights", lambda f, d: [no_weights(d), d / "data.json"], None, r"^error: No weights in '.*no_weights'"),
    case("model-is-a-file", lambda f, d: [d / "data.json", d / "data.json"], None, r"^error: '.*data\.json' is a file"),
    case("bad-json", lambda f, d: [f, write_data(d, text="[{]", name="b.json")], None, r"^error: .*b\.json:1:3: not valid JSON"),
)
# fmt: on


@pytest.mark.parametrize(("args", "error", "match"), FINETUNE_CASES)
def test_finetune_prints_one_error_line(folder, data_dir, args, error, match):
    model, data = args(folder, data_dir)
    message = script_error(finetune.main, ["--model_name_or_path", model, "--data_path", data, "--output_dir",
                                           data_dir / "out", "--report_to", "none", "--use_cpu", "True"])  # fmt: skip
    assert len(message.splitlines()) == 1
    assert re.search(match, message), message


def published_folder(folder, tmp_path, weights=True):
    clone = copy_folder(folder, tmp_path / "published")
    if not weights:
        (clone / "model.safetensors").unlink()
    return clone


# fmt: off
VERIFY_CASES = table(
    case("absent-folder", lambda f, t: [t / "absent"], None, r"^error: No folder at '.*absent'"),
    case("no-weights", lambda f, t: [no_weights(t)], None, r"^error: No checkpoint in .*no_weights: expected"),
    case("already-safetensors", lambda f, t: [published_folder(f, t), "--to-safetensors", t / "st"], None,
         r"^error: .*already holds safetensors weights \(model\.safetensors\); there is nothing to convert"),
    case("lfs-pointers", lambda f, t: [(published_folder(f, t) / "model.safetensors").write_bytes(LFS_POINTER)
                                       and t / "published"], None, r"^error: model\.safetensors in .* Git LFS pointer"),
    case("config-folder-without-config", lambda f, t: [published_folder(f, t), "--config", t], None,
         r"^error: No config\.json in"),
)
# fmt: on


@pytest.mark.parametrize(("args", "error", "match"), VERIFY_CASES)
def test_verify_checkpoint_prints_one_error_line(folder, tmp_path, args, error, match):
    message = script_error(verify.main, args(folder, tmp_path))
    assert len(message.splitlines()) == 1
    assert re.search(match, message), message


def test_verify_checkpoint_never_runs_the_checked_folders_code(folder, tmp_path, capsys):
    """A checked folder whose modeling file would write a marker when imported: the check still passes against our
    code, the marker is never written, and the report says the folder's code was not run."""
    clone = copy_folder(folder, tmp_path / "foreign")
    marker = tmp_path / "ran"
    for name in ("modeling_internlm_xcomposer2.py", "configuration_internlm_xcomposer2.py"):
        code = (clone / name).read_text()
        (clone / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code)
    assert verify.main([str(clone)]) == 0
    assert not marker.exists()
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("note:"))
    assert "not run, the folder's own code:" in note
    assert "configuration_internlm_xcomposer2.py" in note and "modeling_internlm_xcomposer2.py" in note
    assert out.strip().splitlines()[-1].startswith("OK: all")


# fmt: off
CHAT_SCRIPT_CASES = table(
    case("hd-num-zero", lambda f, t: ["--hd-num", "0"], None, r"^error: hd_num must be between 1 and 1000, got 0"),
    case("hd-num-1001", lambda f, t: ["--hd-num", "1001"], None, r"^error: hd_num must be between"),
    case("absent-model", lambda f, t: ["--model", t / "absent" / "model"], None, r"^error: No model folder at"),
    case("model-without-weights", lambda f, t: ["--model", no_weights(t)], None, r"^error: No weights in"),
    case("missing-image", lambda f, t: ["--model", f, "--image", t / "absent.png"], None, r"^error: Image file not found"),
    case("eps-image", lambda f, t: ["--model", f, "--image", eps_file(t / "x.png")], None, r"^error: .*PNG, JPEG"),
)
# fmt: on


@pytest.mark.parametrize(("args", "error", "match"), CHAT_SCRIPT_CASES)
def test_chat_script_checks_its_arguments_before_building_a_model(folder, tmp_path, monkeypatch, args, error, match):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(chat_script, "build_tiny_model_dir", refuse)
    monkeypatch.setattr(chat_script.AutoModel, "from_pretrained", refuse)
    message = script_error(chat_script.main, args(folder, tmp_path))
    assert len(message.splitlines()) == 1
    assert re.search(match, message), message


def test_merge_lora_prints_one_error_line(folder, tmp_path):
    message = script_error(
        merge_lora.main, ["--base", tmp_path / "no" / "base", "--adapter", folder, "--output", tmp_path]
    )
    assert message.startswith("error: No base model folder at")
    message = script_error(merge_lora.main, ["--base", folder, "--adapter", tmp_path, "--output", tmp_path / "out"])
    assert message.startswith("error: No adapter_config.json in")


COUNTED.append(2)


def test_the_tiny_demo_model_keeps_the_shipped_stop_ids(tmp_path):
    """chat.py's tiny folder stops on </s> and the turn end, as the shipped generation_config.json does, numbered by
    the tiny vocabulary; save_pretrained alone would keep only the config's </s>."""
    folder = chat_script.build_tiny_model_dir(tmp_path)
    written = json.loads((folder / "generation_config.json").read_text())
    shipped = json.loads((ROOT / "generation_config.json").read_text())
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert written["eos_token_id"] == [pieces.eos_id(), pieces.piece_to_id(E)] != [pieces.eos_id()]
    assert len(written["eos_token_id"]) == len(shipped["eos_token_id"])
    assert written["max_new_tokens"] == shipped["max_new_tokens"] and written["pad_token_id"] == pieces.eos_id()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert model.generation_config.eos_token_id == written["eos_token_id"]


def test_a_script_run_prints_no_traceback(folder, tmp_path, monkeypatch):
    """The whole process, as a user runs it: exit status 1, one `error:` line on stderr, no traceback, and no
    bitsandbytes `kernels` line."""
    monkeypatch.undo()  # the real subprocess module
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model_name_or_path", str(folder),
               "--data_path", str(tmp_path / "absent.json"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: No data file at {tmp_path / 'absent.json'}; pass a JSON "
                                                  "list of samples or a data.txt mixing file."]  # fmt: skip


COUNTED.append(1)


# ---- 8. noise and the recipe ----


def training_fields():
    import dataclasses

    return {field.name for field in dataclasses.fields(finetune.TrainingArguments)}


def test_renamed_options_are_translated_for_the_installed_transformers():
    fields = training_fields()
    argv = ["--warmup_ratio", "0.01", "--gradient_checkpointing", "--gradient_checkpointing_kwargs={}", "--bf16"]
    translated = finetune.translate_options(argv)
    new_checkpointing = "activation_checkpointing" in fields
    assert translated[0] == ("--warmup_ratio" if "warmup_ratio" in fields else "--warmup_steps")
    assert translated[2] == ("--activation_checkpointing" if new_checkpointing else "--gradient_checkpointing")
    assert translated[3].startswith(
        "--activation_checkpointing_kwargs=" if new_checkpointing else "--gradient_checkpointing_kwargs="
    )
    assert translated[1] == "0.01" and translated[4] == "--bf16"
    assert all(argument.lstrip("-").split("=")[0] in fields for argument in translated if argument.startswith("--"))


def test_no_pinned_memory_without_an_accelerator():
    args = finetune.TrainingArguments(output_dir="unused", report_to="none")
    assert args.dataloader_pin_memory is True
    finetune.prepare_training_args(args)
    assert args.dataloader_pin_memory is torch.accelerator.is_available()


def recipe_argv(model, data, output):
    """The LoRA command of docs/fine-tuning.md, word for word, with the paths of this test."""
    text = (ROOT / "docs" / "fine-tuning.md").read_text()
    block = text.split("```bash\npython scripts/finetune.py", 1)[1].split("```")[0]
    command = block.split("\npython scripts/merge_lora.py")[0].replace("\\\n", " ")
    replace = {"MODEL": str(model), "data.txt": str(data), "out/lora": str(output)}
    return [replace.get(word, word) for word in command.split()]


def test_the_lora_recipe_runs_as_written_without_warnings(folder, data_dir, tmp_path, recwarn, caplog):
    argv = recipe_argv(folder, data_dir / "data.json", tmp_path / "lora")
    assert "--warmup_ratio" in argv and "--gradient_checkpointing" in argv and "--use_lora" in argv
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        trainer = finetune.main(argv + ["--use_cpu", "True", "--max_steps", "1"])
    assert trainer.state.global_step == 1
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    noise = [str(w.message) for w in recwarn if "checkpointing" in str(w.message) or "pin_memory" in str(w.message)]
    noise += [r.getMessage() for r in caplog.records if "pin_memory" in r.getMessage() or "warmup" in r.getMessage()]
    assert noise == []


# ---- the count ----


def test_the_suite_has_over_100_hostile_cases():
    # Tensor cases run through generate and forward, training cases through training_example and training_length.
    total = sum(COUNTED) + len(TENSOR_CASES) + len(TRAINING_CASES)
    assert total >= 100, total
