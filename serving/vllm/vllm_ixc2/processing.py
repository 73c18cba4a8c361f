"""vLLM's multimodal processing for InternLM-XComposer2-4KHD: images through the model folder's image processor (with
`hd_num` per request), and each image's single placeholder id expanded to the run `num_image_tokens` gives.
"""

from collections.abc import Mapping
from functools import cached_property

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from .remote_code import remote_module
from .tokenizer import TOKENIZER_MODE, PromptRuleTokenizer

IMAGE_TOKEN = "<ImageHere>"


class InternLMXComposer2ProcessingInfo(BaseProcessingInfo):
    @cached_property
    def image_processing(self):
        """The model folder's `image_processing_4khd` module (HD layout and token count)."""
        return remote_module(self.model_id, "image_processing_4khd")

    @cached_property
    def image_processor(self):
        """The model folder's image processor, with its `preprocessor_config.json` (tile size, default hd_num)."""
        return self.image_processing.InternLMXComposer2ImageProcessor.from_pretrained(self.model_id)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def tokens_per_side(self) -> int:
        return self.image_processing.tokens_per_side(self.image_processor.image_size, self.image_processor.patch_size)

    def num_image_tokens(self, rows: int, cols: int) -> int:
        return self.image_processing.num_image_tokens(rows, cols, self.tokens_per_side())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # At the default hd_num the costliest image is a tall strip: hd_num rows of one crop (most crops, most rows).
        return {"image": self.num_image_tokens(self.image_processor.hd_num, 1)}


class InternLMXComposer2DummyInputsBuilder(BaseDummyInputsBuilder[InternLMXComposer2ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        """Tall strips, `hd_num` tiles high: the most image tokens per image at the default hd_num."""
        image_processor = self.info.image_processor
        return {
            "image": self._get_dummy_images(
                width=image_processor.image_size,
                height=image_processor.image_size * image_processor.hd_num,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image") if mm_options else None,
            )
        }


class InternLMXComposer2MultiModalProcessor(BaseMultiModalProcessor[InternLMXComposer2ProcessingInfo]):
    """The prompt arrives tokenised by `PromptRuleTokenizer` (one placeholder id per `<ImageHere>`); the images go
    through the model folder's image processor, and each placeholder becomes its image's run of placeholder ids."""

    def __init__(self, info, dummy_inputs):
        super().__init__(info, dummy_inputs)
        if not isinstance(info.ctx.tokenizer, PromptRuleTokenizer):
            raise ValueError(
                "InternLM-XComposer2 needs its own tokenizer mode, which puts BOS before every text segment around an "
                f"image as the model was trained; start vLLM with --tokenizer-mode {TOKENIZER_MODE} (or "
                f"LLM(..., tokenizer_mode={TOKENIZER_MODE!r}))."
            )

    def _call_hf_processor(self, hf_data, hf_kwargs):
        """Tiles and grids of the request's images; `hd_num` comes from `mm_processor_kwargs` (request or server)."""
        if "hd_num" in hf_kwargs:
            # Checked here so the request's error says what is wrong; vLLM rewraps errors raised inside the call.
            self.info.image_processing.validate_hd_num(hf_kwargs["hd_num"])
        return self.info.ctx.call_hf_processor(self.info.image_processor, {"images": hf_data["images"]}, hf_kwargs)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        image_grids = hf_inputs.get("image_grids", torch.empty(0, 2, dtype=torch.long))
        tiles_per_image = image_grids.prod(-1) + 1  # the global view, then rows * cols crops
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", tiles_per_image),
            "image_grids": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_id

        def image_run(item_idx: int) -> list[int]:
            rows, cols = out_mm_kwargs["image"][item_idx]["image_grids"].data.tolist()
            return [image_token_id] * self.info.num_image_tokens(rows, cols)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=image_run)]
