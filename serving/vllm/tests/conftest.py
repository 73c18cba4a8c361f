"""Fixtures of the vLLM plugin tests: one tiny model folder per session, the HF model and processor on it, and the
reference answer (`processor` + greedy `generate`) that vLLM must reproduce id for id."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# In-process engine, 1 GiB of KV cache, throwaway caches, no network; set before vLLM and transformers are imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm_cache_"))
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="ixc_modules_"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model_dir  # noqa: E402

TOP_K = 3
# Logprobs of the same fp32 function computed by different kernels (vLLM's CPU GEMM and attention vs torch's).
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("ixc") / "tiny")


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)


@pytest.fixture(scope="session")
def stop_ids(processor):
    return [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")]


@pytest.fixture(scope="session")
def reference(hf_model, processor, stop_ids):
    """`reference(prompt, images, hd_num, max_new_tokens)` -> (prompt ids, greedy new ids, per-step logprobs)."""

    @torch.no_grad()
    def run(prompt, images=None, hd_num=None, max_new_tokens=6):
        inputs = processor(prompt, images=images, hd_num=hd_num)
        output = hf_model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        new_ids = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [torch.log_softmax(scores[0].float(), dim=-1) for scores in output.scores]
        return inputs["input_ids"][0].tolist(), new_ids, logprobs

    return run


def assert_same_answer(vllm_output, expected):
    """vLLM's prompt ids, greedy ids and top-k logprobs equal the reference's."""
    prompt_ids, new_ids, logprobs = expected
    assert vllm_output.prompt_token_ids == prompt_ids
    completion = vllm_output.outputs[0]
    assert list(completion.token_ids) == new_ids
    for step, (theirs, ours) in enumerate(zip(completion.logprobs, logprobs)):
        assert sorted(theirs) == sorted(ours.topk(TOP_K).indices.tolist()), f"top-{TOP_K} ids differ at step {step}"
        worst = max(abs(value.logprob - ours[token].item()) for token, value in theirs.items())
        assert worst < LOGPROB_TOLERANCE, f"logprob differs by {worst} at step {step}"
