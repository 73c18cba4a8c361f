"""The tokenizer mode `internlm_xcomposer2`: prompt text tokenised by the model folder's processor rule.

vLLM tokenises a whole prompt in one call, but the model was trained with BOS before every text segment around an
image (and two BOS on a text-only prompt). This mode gives exactly the processor's ids, with one placeholder id per
`<ImageHere>` that the multimodal processor then expands to the image's token run.
"""

import copy

from transformers import AutoConfig, BatchEncoding
from vllm.tokenizers.hf import CachedHfTokenizer
from vllm.tokenizers.protocol import TokenizerLike

from .remote_code import remote_module

TOKENIZER_MODE = "internlm_xcomposer2"


class PromptRuleTokenizer:
    """Marker base of the tokenizers `with_prompt_rule` makes (their class also derives from the HF tokenizer's)."""


def with_prompt_rule(tokenizer, model_path: str, trust_remote_code: bool = True):
    """A copy of the HF `tokenizer` whose `encode` and `__call__` on one prompt string give the processor's ids.

    BOS is part of this model's prompt format, so `add_special_tokens` does not change the ids (vLLM's chat path
    passes `False` and its completion path `True`; both must read the prompt as the model was trained). Prompts are
    never truncated: a prompt too long for the context fails vLLM's own length check.
    """
    processing = remote_module(model_path, "processing_internlm_xcomposer2")
    image_processor = remote_module(model_path, "image_processing_4khd").InternLMXComposer2ImageProcessor
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    processor = processing.InternLMXComposer2Processor(
        image_processor.from_pretrained(model_path), tokenizer, image_token_id=config.image_token_id
    )

    def prompt_ids(text: str) -> list[int]:
        # One placeholder per image: the multimodal processor expands it once the image's grid is known.
        return processor._prompt_ids(text, [1] * text.count(processing.IMAGE_TOKEN))

    class Tokenizer(tokenizer.__class__, PromptRuleTokenizer):
        def encode(self, text, *args, **kwargs):
            if isinstance(text, str):
                return prompt_ids(text)
            return super().encode(text, *args, **kwargs)

        def __call__(self, text=None, *args, **kwargs):
            if isinstance(text, str):
                ids = prompt_ids(text)
                return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})
            return super().__call__(text, *args, **kwargs)

        def __reduce__(self):
            return with_prompt_rule, (tokenizer, model_path, trust_remote_code)

    Tokenizer.__name__ = f"PromptRule{tokenizer.__class__.__name__}"
    wrapped = copy.copy(tokenizer)
    wrapped.__class__ = Tokenizer
    return wrapped


class InternLMXComposer2Tokenizer(TokenizerLike):
    """Entry of the tokenizer mode: the model folder's HF tokenizer, through `with_prompt_rule`."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, trust_remote_code=False, **kwargs):
        tokenizer = CachedHfTokenizer.from_pretrained(
            path_or_repo_id, *args, trust_remote_code=trust_remote_code, **kwargs
        )
        return with_prompt_rule(tokenizer, str(path_or_repo_id), trust_remote_code)
