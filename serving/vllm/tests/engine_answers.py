"""Answer a fixed mixed batch with vLLM in a fresh process and write the answers as JSON (for the compiled and tensor
parallel tests, which each need their own engine and workers).

    python engine_answers.py MODEL_DIR OUT.json '{"tensor_parallel_size": 2}'
"""

import json
import os
import sys
from pathlib import Path

from PIL import Image

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def batch(model_dir: Path):
    """The mixed batch: (prompt, images) pairs, text only, one image, and two images."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    wide, tall = (Image.open(model_dir / name).convert("RGB") for name in ("wide.png", "tall.png"))
    return [
        (processor.build_prompt("Hello world! Describe a cat.", meta_instruction=""), []),
        (processor.build_prompt("Here is a photo.<ImageHere>Describe it in detail.", meta_instruction=""), [wide]),
        (processor.build_prompt("<ImageHere>Compare it with<ImageHere>this.", meta_instruction=""), [wide, tall]),
    ]


def main(model_dir: Path, out: Path, options: dict):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir), trust_remote_code=True, tokenizer_mode="internlm_xcomposer2", dtype="float32",
        enable_prefix_caching=False, max_model_len=512, max_num_batched_tokens=32, seed=0, **options,
    )  # fmt: skip
    requests = [{"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}
                for prompt, images in batch(model_dir)]  # fmt: skip
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=6, logprobs=3))
    answers = [
        {
            "prompt_token_ids": output.prompt_token_ids,
            "token_ids": list(output.outputs[0].token_ids),
            "logprobs": [
                {str(token): value.logprob for token, value in step.items()} for step in output.outputs[0].logprobs
            ],
        }
        for output in outputs
    ]
    out.write_text(json.dumps(answers))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
