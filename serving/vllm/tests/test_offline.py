"""`LLM(model=PATH)` with the plugin equals our processor + greedy `generate`: prompt ids, greedy ids and top-k
logprobs, for text, one image, several images, a mixed batch and prefill chunks that split an image run; bad
requests raise and leave the engine serving. One in-process engine serves every case."""

import pytest
from conftest import assert_same_answer
from PIL import Image

CHUNK = 32  # max_num_batched_tokens: every image prompt is prefilled in several chunks


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from vllm import LLM

    return LLM(
        model=str(tiny_dir), trust_remote_code=True, tokenizer_mode="internlm_xcomposer2", dtype="float32",
        enforce_eager=True, enable_prefix_caching=False, max_model_len=512, max_num_batched_tokens=CHUNK, seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=6, logprobs=3)


@pytest.fixture(scope="module")
def images(tiny_dir):
    return Image.open(tiny_dir / "wide.png").convert("RGB"), Image.open(tiny_dir / "tall.png").convert("RGB")


def request(prompt, images=(), hd_num=None):
    request = {"prompt": prompt}
    if images:
        request["multi_modal_data"] = {"image": list(images)}
    if hd_num is not None:
        request["mm_processor_kwargs"] = {"hd_num": hd_num}
    return request


def image_runs(ids, image_token_id):
    """(start, end) of each run of placeholder ids."""
    runs, start = [], None
    for index, token in enumerate([*ids, None]):
        if token == image_token_id and start is None:
            start = index
        elif token != image_token_id and start is not None:
            runs.append((start, index))
            start = None
    return runs


def test_text_only_prompt_has_two_bos_and_same_answer(llm, greedy, processor, reference):
    prompt = processor.build_prompt("Hello world! Describe a cat.", meta_instruction="")
    expected = reference(prompt)
    assert expected[0][:2] == [1, 1]
    assert_same_answer(llm.generate([request(prompt)], greedy)[0], expected)


def test_one_image_with_chunked_prefill_splitting_its_run(llm, greedy, processor, reference, images, hf_model):
    prompt = processor.build_prompt("Here is a photo.<ImageHere>Describe it in detail please.", meta_instruction="")
    expected = reference(prompt, [images[0]])
    (start, end), = image_runs(expected[0], hf_model.config.image_token_id)
    assert start < CHUNK < end, "the image run must cross a prefill chunk boundary"
    assert_same_answer(llm.generate([request(prompt, [images[0]])], greedy)[0], expected)


def test_several_images_in_one_prompt_with_hd_num_per_request(llm, greedy, processor, reference, images):
    prompt = processor.build_prompt("<ImageHere>Compare it with<ImageHere>the second picture.", meta_instruction="")
    small = reference(prompt, list(images), hd_num=1)
    large = reference(prompt, list(images), hd_num=4)
    assert len(small[0]) < len(large[0])
    outputs = llm.generate([request(prompt, images, hd_num=1), request(prompt, images, hd_num=4)], greedy)
    assert_same_answer(outputs[0], small)
    assert_same_answer(outputs[1], large)


def test_mixed_batch(llm, greedy, processor, reference, images):
    cases = [
        (processor.build_prompt("What is in the picture?", meta_instruction=""), ()),
        (processor.build_prompt("<ImageHere>How many people are there?", meta_instruction=""), images[1:]),
        (processor.build_prompt("A question about the image.", history=[("Hi", "Hello!")], meta_instruction=""), ()),
        (processor.build_prompt("<ImageHere><ImageHere>Two images.", meta_instruction=""), images),
    ]
    outputs = llm.generate([request(prompt, own) for prompt, own in cases], greedy)
    for output, (prompt, own) in zip(outputs, cases):
        assert_same_answer(output, reference(prompt, list(own) or None))


def test_default_system_prompt_and_stop_on_turn_end(llm, processor, reference, images, stop_ids):
    from vllm import SamplingParams

    prompt = processor.build_prompt("<ImageHere>Describe the image.")
    expected = reference(prompt, [images[0]], max_new_tokens=40)
    output = llm.generate([request(prompt, [images[0]])], SamplingParams(temperature=0, max_tokens=40, logprobs=3))
    assert_same_answer(output[0], expected)
    if len(expected[1]) < 40:  # the reply ended on a stop id, which vLLM reports as the finish reason
        assert expected[1][-1] in stop_ids and output[0].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mm_processor_kwargs": {"hd_num": 0}}, "hd_num must be between 1"),
        ({"mm_processor_kwargs": {"hd_num": "many"}}, "hd_num must be an integer"),
        ({"prompt": "[UNUSED_TOKEN_140] sneaks in <ImageHere>"}, "reserved for image positions"),
        # 267 image tokens: more than the engine ever schedules for one image (its encoder budget).
        ({"mm_processor_kwargs": {"hd_num": 60}}, "exceeds the pre-allocated encoder cache size"),
        ({"prompt": "<ImageHere>" + "Describe the image. " * 120}, "maximum context length"),
    ],
)
def test_bad_request_raises_and_engine_keeps_serving(llm, greedy, processor, reference, images, bad, message):
    from vllm.exceptions import VLLMValidationError

    prompt = processor.build_prompt("<ImageHere>Describe the image.", meta_instruction="")
    with pytest.raises((ValueError, VLLMValidationError), match=message):
        llm.generate([{**request(prompt, [images[1]]), **bad}], greedy)
    assert_same_answer(llm.generate([request(prompt, [images[1]])], greedy)[0], reference(prompt, [images[1]]))


def test_chat_applies_the_chat_template(llm, greedy, processor, reference, images):
    messages = [
        {"role": "user", "content": [{"type": "image_pil", "image_pil": images[0]}, {"type": "text", "text": "Hi!"}]}
    ]
    expected = reference(processor.build_prompt("<ImageHere>Hi!"), [images[0]])  # default system text, default hd_num
    assert_same_answer(llm.chat(messages, greedy)[0], expected)


def test_engine_without_the_tokenizer_mode_refuses_to_start(tiny_dir):
    from vllm import LLM

    with pytest.raises(ValueError, match="--tokenizer-mode internlm_xcomposer2"):
        LLM(model=str(tiny_dir), trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=512)
