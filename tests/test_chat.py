"""The original chat API on a tiny model: the published usage lines run unchanged, and chat, stream_chat and
batch_chat are exactly processor + generate."""

import shutil
import threading

import pytest
import sentencepiece as spm
import torch
from conftest import TINY_CONFIG, write_model_dir, write_processor_dir
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    StoppingCriteria,
)

QUERY = "<ImageHere>Describe the image."


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, sp_model_file):
    """A tiny model folder laid out like the Hub repo: code, config, weights, tokenizer and processor files."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    config = {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id}
    folder = write_model_dir(tmp_path_factory.mktemp("chat") / "tiny", config)
    write_processor_dir(folder, sp_model_file, image_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(folder)
    Image.new("RGB", (200, 120), (200, 30, 30)).save(folder / "doc.png")
    Image.new("RGB", (90, 160), (30, 30, 200)).save(folder / "tall.png")
    return folder


@pytest.fixture(scope="module")
def quiet_dir(chat_dir, tmp_path_factory):
    """The tiny folder with weights edited so the model ends its reply at once: every token embeds to the same
    vector e, the layers add nothing (zero output projections) and only the EOS row of the head is non-zero (e),
    so EOS wins at every text position. The published usage lines (1024 new tokens, 3 beams) then run in seconds."""
    folder = tmp_path_factory.mktemp("quiet") / "tiny"
    shutil.copytree(chat_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        e = torch.randn(model.config.hidden_size)
        model.model.tok_embeddings.weight.copy_(e)
        for layer in model.model.layers:
            for linear in (layer.attention.wo, layer.feed_forward.w2):
                linear.weight.zero_()
                linear.Plora_B.weight.zero_()
        model.output.weight.zero_()
        model.output.weight[model.config.eos_token_id] = e
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(chat_dir):
    return AutoModelForCausalLM.from_pretrained(chat_dir, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def tokenizer(chat_dir):
    return AutoTokenizer.from_pretrained(chat_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)


def reference_reply(model, processor, tokenizer, prompt, images, hd_num, **generate_kwargs):
    """What chat() must do, spelled out: processor, generate, decode, cut at the turn end."""
    inputs = processor(prompt, images=images, hd_num=hd_num)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")]
    output = model.generate(**inputs, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    new_ids = output[0, inputs["input_ids"].shape[1] :]
    return processor.postprocess(tokenizer.decode(new_ids, skip_special_tokens=True)), new_ids


def test_published_usage_lines_run_unchanged(quiet_dir, processor, monkeypatch):
    monkeypatch.chdir(quiet_dir)
    path = str(quiet_dir)
    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    response, history = model.chat(tokenizer, query='<ImageHere>Describe the image.', image='doc.png', hd_num=55, history=[], do_sample=False, num_beams=3)  # fmt: skip

    prompt = processor.build_prompt(QUERY)
    expected, _ = reference_reply(
        model, processor, tokenizer, prompt, ["doc.png"], 55, do_sample=False, num_beams=3,
        max_new_tokens=1024, repetition_penalty=1.005,
    )  # fmt: skip
    assert isinstance(response, str) and response == expected
    assert history == [(QUERY, response)]


def test_second_turn_builds_the_exact_next_prompt(model, tokenizer, processor, chat_dir, monkeypatch):
    image = str(chat_dir / "doc.png")
    reply, history = model.chat(tokenizer, QUERY, image=image, do_sample=False, max_new_tokens=4, hd_num=6)
    seen = {}
    original_generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    model.chat(tokenizer, "And the colour?", image=image, history=history, do_sample=False, max_new_tokens=4, hd_num=6)
    expected = processor(processor.build_prompt("And the colour?", [(QUERY, reply)]), images=[image], hd_num=6)
    assert torch.equal(seen["input_ids"], expected["input_ids"])
    assert torch.equal(seen["image_grids"], expected["image_grids"])
    assert torch.equal(seen["pixel_values"], expected["pixel_values"])


def test_text_only_chat_starts_with_two_bos(model, tokenizer, monkeypatch):
    seen = {}
    original_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or original_generate(**kw))
    reply, _ = model.chat(tokenizer, "Hello world!", do_sample=False, max_new_tokens=3)
    assert seen["input_ids"][0, :2].tolist() == [tokenizer.bos_token_id] * 2
    assert "pixel_values" not in seen and isinstance(reply, str)


def test_stream_chat_yields_the_reply_chat_returns(model, tokenizer, chat_dir):
    image = str(chat_dir / "doc.png")
    reply, _ = model.chat(tokenizer, QUERY, image=image, do_sample=False, max_new_tokens=8, min_new_tokens=8, hd_num=4)
    pieces = list(model.stream_chat(tokenizer, QUERY, image=image, do_sample=False, max_new_tokens=8, min_new_tokens=8, hd_num=4))
    assert pieces[-1] == reply
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))


def test_closing_a_stream_stops_the_generation(model, tokenizer, chat_dir):
    """A reader that goes away (close(), a break, a web client leaving) stops the worker at the next token, instead of
    leaving it to generate all of max_new_tokens unread; the caller's own stopping criteria still apply."""
    steps = []
    hook = model.register_forward_hook(lambda *args: steps.append(threading.current_thread()))
    try:
        stream = model.stream_chat(tokenizer, QUERY, image=str(chat_dir / "doc.png"), do_sample=False, hd_num=4,
                                   max_new_tokens=500, min_new_tokens=500)  # fmt: skip
        next(stream)
        stream.close()
        after_close = len(steps)
        threading.Event().wait(0.5)
        workers = set(steps)
        assert len(workers) == 1 and not next(iter(workers)).is_alive()
        assert len(steps) == after_close < 250, f"{len(steps)} forward passes for a stream read once"

        steps.clear()
        class AtOnce(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.ones(input_ids.shape[0], dtype=torch.bool)

        pieces = list(model.stream_chat(tokenizer, QUERY, image=str(chat_dir / "doc.png"), do_sample=False, hd_num=4,
                                        max_new_tokens=50, min_new_tokens=50, stopping_criteria=[AtOnce()]))  # fmt: skip
        assert len(steps) == 1 and pieces  # the prefill's one token, then the caller's stop
    finally:
        hook.remove()


def test_stream_chat_raises_errors_instead_of_hanging(model, tokenizer, chat_dir):
    stream = model.stream_chat(tokenizer, "<ImageHere><ImageHere>Two images?", image=str(chat_dir / "doc.png"))
    outcome = []

    def consume():  # in a thread, so that a regression fails this test instead of hanging the suite
        try:
            list(stream)
        except ValueError as error:
            outcome.append(str(error))

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "stream_chat hung after chat() failed"
    assert len(outcome) == 1 and "contains 2 <ImageHere> but 1 images" in outcome[0]


def test_batch_chat_equals_one_by_one(model, tokenizer, chat_dir):
    queries = [QUERY, "Hello world! What is in the picture?", "<ImageHere>How many people are there?"]
    images = [str(chat_dir / "doc.png"), None, str(chat_dir / "tall.png")]
    together = model.batch_chat(tokenizer, queries, images, hd_num=4, max_new_tokens=6, min_new_tokens=6)
    alone = [
        model.chat(tokenizer, query, image=image, hd_num=4, do_sample=False, max_new_tokens=6, min_new_tokens=6)[0]
        for query, image in zip(queries, images)
    ]
    assert together == alone


def test_prompt_longer_than_max_sequence_length_names_the_hd_num_that_fits(model, tokenizer, chat_dir, processor):
    image = str(chat_dir / "doc.png")
    prompt_at = {hd: processor(processor.build_prompt(QUERY), images=[image], hd_num=hd)["input_ids"].shape[1] for hd in (4, 9)}
    assert prompt_at[9] > prompt_at[4]
    max_new_tokens = 2
    original = model.config.max_sequence_length
    model.config.max_sequence_length = prompt_at[4] + max_new_tokens
    try:
        with pytest.raises(ValueError, match=rf"{prompt_at[9]} ids long.*hd_num=[45678] fits"):
            model.chat(tokenizer, QUERY, image=image, hd_num=9, max_new_tokens=max_new_tokens, do_sample=False)
        reply, _ = model.chat(tokenizer, QUERY, image=image, hd_num=4, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        model.config.max_sequence_length = original
    assert isinstance(reply, str)


def generate_new(model, inputs, **kwargs):
    prompt_length = inputs["input_ids"].shape[1]
    return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kwargs)[:, prompt_length:]


@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}])
def test_beam_search_with_images_in_a_batch_equals_per_sample(model, processor, chat_dir, options):
    """Two prompts whose images have different grids (2 x 3 and 3 x 2): each row keeps its own images."""
    prompts = [processor.build_prompt(QUERY), processor.build_prompt("<ImageHere>How many people are there?")]
    images = [[str(chat_dir / "doc.png")], [str(chat_dir / "tall.png")]]
    batch = processor(prompts, images=images, hd_num=6)
    assert batch["image_grids"].tolist() == [[2, 3], [3, 2]]
    alone = [generate_new(model, processor(p, images=i, hd_num=6), **options) for p, i in zip(prompts, images)]
    assert torch.equal(generate_new(model, batch, **options), torch.cat(alone))


def test_cached_greedy_equals_uncached_greedy_with_images(model, processor, chat_dir):
    inputs = processor(processor.build_prompt(QUERY), images=[str(chat_dir / "doc.png")], hd_num=6)
    assert torch.equal(generate_new(model, inputs, use_cache=True), generate_new(model, inputs, use_cache=False))


def test_batch_chat_answers_the_good_requests_and_names_the_failed_ones(model, tokenizer, chat_dir):
    queries = ["<ImageHere>What is it?", "<ImageHere>And this?", "", "Hello!"]
    images = [chat_dir / "doc.png", chat_dir / "missing.png", None, None]
    options = dict(hd_num=4, max_new_tokens=5, min_new_tokens=5)
    with pytest.raises(Exception) as caught:
        model.batch_chat(tokenizer, queries, images, **options)
    error = caught.value
    assert type(error).__name__ == "BatchChatError" and isinstance(error, ValueError)
    assert sorted(error.errors) == [1, 2]
    assert isinstance(error.errors[1], FileNotFoundError) and "missing.png" in str(error.errors[1])
    assert "query is empty" in str(error.errors[2])
    assert "request 1: FileNotFoundError" in str(error) and "request 2: ValueError" in str(error)
    expected = model.batch_chat(tokenizer, [queries[0], queries[3]], [images[0], None], **options)
    assert error.replies == [expected[0], None, None, expected[1]]
    assert all(reply for reply in expected)


def test_chat_refuses_an_empty_query_without_an_image_and_a_bad_hd_num(model, tokenizer, chat_dir):
    for query in ("", "   \n"):
        with pytest.raises(ValueError, match="query is empty"):
            model.chat(tokenizer, query)
    reply, _ = model.chat(tokenizer, "", image=chat_dir / "doc.png", hd_num=4, max_new_tokens=3, do_sample=False)
    assert isinstance(reply, str)
    for hd_num in (0, -1, 2.5):
        with pytest.raises(ValueError, match="hd_num must be"):
            model.chat(tokenizer, "Hello!", hd_num=hd_num, max_new_tokens=3)
