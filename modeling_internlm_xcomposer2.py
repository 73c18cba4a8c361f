"""InternLMXComposer2ForCausalLM: CLIP tower + projector + newline/separator vectors + InternLM2 decoder with
Partial LoRA + output head, loading the published 4KHD checkpoint unchanged.
"""

import copy
from numbers import Integral
from threading import Event, Thread

import torch
from torch import nn
from transformers import (
    BitsAndBytesConfig,
    GenerationMixin,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .build_mlp import (
    CLIPVisionEmbeddings,
    CLIPVisionTower,
    build_vision_projector,
    global_local_layout,
    merge_2x2,
)
from .configuration_internlm_xcomposer2 import PLORA_RANKS, InternLMXcomposer2Config
from .image_processing_4khd import (
    InternLMXComposer2ImageProcessor,
    check_folder_for_lfs_pointers,
    num_image_tokens,
    tokens_per_side,
    validate_hd_num,
)
from .modeling_internlm2 import (
    CACHE_FIELD,
    INPUTS_CHECKED,
    InternLM2Model,
    InternLM2RMSNorm,
    pick_image_mask,
    pop_cache,
)
from .original_api import OriginalAPIMixin
from .processing_internlm_xcomposer2 import (
    DEFAULT_SYSTEM,
    TURN_END,
    InternLMXComposer2Processor,
    check_text,
    check_tokenizer,
)

logger = logging.get_logger(__name__)

# Left unquantised by bitsandbytes loading unless `llm_int8_skip_modules` says otherwise: the vision tower and the
# projector (small, and the image path is the most sensitive) and the LM head (as transformers keeps heads).
DEFAULT_QUANTIZATION_SKIP = ["vit", "vision_proj", "output"]


class InternLMXComposer2ForCausalLM(OriginalAPIMixin, PreTrainedModel, GenerationMixin):
    """The whole model. Checkpoint names: `model.*` (decoder), `output` (LM head), `vit.*` (CLIP),
    `vision_proj.*`, `plora_glb_GN` (separator) and `plora_sub_GN` (newline)."""

    config_class = InternLMXcomposer2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_cache_class = True
    _supports_static_cache = True
    # The Trainer passes `num_items_in_batch` (labelled tokens of the whole accumulated batch) to `forward`, which
    # hands it to the loss, so gradient accumulation averages over tokens exactly like one large batch.
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        # transformers resolves the attention backend on the top config only; the CLIP layers read theirs from
        # the vision sub-config, so hand it down (both towers support eager, sdpa and flash-attn 2).
        config.vision_config._attn_implementation = config._attn_implementation
        self.model = InternLM2Model(config)
        # The decoder is the `base_model`; it encodes images through this model's vision side (see InternLM2Model).
        self.model.embed_images = self._embed_with_images
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vit = CLIPVisionTower(config.vision_config)
        self.vision_proj = build_vision_projector(config)
        merged_size = 4 * config.vision_config.hidden_size
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, merged_size))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_size))
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, InternLM2RMSNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, CLIPVisionEmbeddings):
            module.class_embedding.data.normal_(mean=0.0, std=std)
        elif isinstance(module, InternLMXComposer2ForCausalLM):
            module.plora_glb_GN.data.normal_(mean=0.0, std=std)
            module.plora_sub_GN.data.normal_(mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, with a bitsandbytes `quantization_config` completed for this model.

        The Partial LoRA linears are built quantised by the model itself (`quantized_plora_class`), so their names
        and their branches' (`Plora_A`, `Plora_B`, kept in the load dtype) are added to `llm_int8_skip_modules`:
        that only stops transformers from replacing them with branchless linears. Without a skip list of the
        user's, `DEFAULT_QUANTIZATION_SKIP` (vision tower, projector, LM head) stays unquantised.
        """
        check_folder_for_lfs_pointers(args[0] if args else kwargs.get("pretrained_model_name_or_path", ""))
        if kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit"):
            raise ValueError(
                "load_in_4bit/load_in_8bit are not supported here (the Partial LoRA branches would be dropped); pass "
                "quantization_config=BitsAndBytesConfig(load_in_4bit=True) or BitsAndBytesConfig(load_in_8bit=True)."
            )
        if isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "bitsandbytes":
            quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
        if isinstance(quantization_config, BitsAndBytesConfig):
            quantization_config = copy.deepcopy(quantization_config)
            skip = quantization_config.llm_int8_skip_modules
            skip = list(DEFAULT_QUANTIZATION_SKIP if skip is None else skip)
            skip += [name for name in (*PLORA_RANKS, "Plora_A", "Plora_B") if name not in skip]
            quantization_config.llm_int8_skip_modules = skip
        return super().from_pretrained(*args, quantization_config=quantization_config, **kwargs)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def get_image_features(self, pixel_values, image_grids):
        """Encode pixel tiles into one token sequence per image, ready to replace its placeholders.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(T, 3, S, S)`): all tiles of all images as the image
                processor returns them (per image: the global view, then its crops in row-major order).
            image_grids (`torch.LongTensor` of shape `(N, 2)`): (rows, cols) of each image.
        Returns:
            `list[torch.Tensor]`: for image i a `(L_i, hidden_size)` tensor, L_i = `num_image_tokens(rows, cols)`.
        Raises:
            `ValueError`: if the shapes of `pixel_values` and `image_grids` do not fit each other or the model.
        """
        self._check_pixels(pixel_values, image_grids)
        features = merge_2x2(self.vit(pixel_values))  # (T, t, t, 4C)
        sequences = global_local_layout(features, image_grids, self.plora_glb_GN, self.plora_sub_GN)
        projected = self.vision_proj(torch.cat(sequences))  # (sum L_i, hidden)
        return list(projected.split([len(s) for s in sequences]))

    def _check_pixels(self, pixel_values, image_grids):
        """Shape checks of model inputs built by hand, with what to do instead (one host read of the small grid)."""
        size = self.config.vision_config.image_size
        fix = "Build pixel_values and image_grids with the model's processor (one call for both)."
        tiles_ok = torch.is_tensor(pixel_values) and pixel_values.dim() == 4
        if not tiles_ok or tuple(pixel_values.shape[1:]) != (3, size, size):
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (num_tiles, 3, {size}, {size}) tensor, got {shape}. {fix}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point (normalised tiles), got {pixel_values.dtype}. {fix}")
        if getattr(self, "hf_device_map", None) is None and pixel_values.device != self.device:
            raise ValueError(
                f"pixel_values are on {pixel_values.device} but the model is on {self.device}; move the inputs with "
                "inputs.to(model.device)."
            )
        if not torch.is_tensor(image_grids) or image_grids.dim() != 2 or image_grids.shape[1] != 2:
            shape = tuple(image_grids.shape) if torch.is_tensor(image_grids) else type(image_grids).__name__
            raise ValueError(f"image_grids must be a (num_images, 2) tensor of (rows, cols), got {shape}. {fix}")
        if image_grids.is_floating_point() or image_grids.is_complex() or image_grids.dtype == torch.bool:
            raise ValueError(f"image_grids must hold integer (rows, cols) (torch.long), got {image_grids.dtype}. {fix}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
            # NaN or inf pixels make every logit NaN, and generation then silently repeats token 0.
            raise ValueError(
                "pixel_values contain NaN or infinite values; check what produced them (e.g. a division by a zero "
                f"std). {fix}"
            )
        grids = image_grids.tolist()
        num_tiles = sum(rows * cols + 1 for rows, cols in grids)
        if min((min(grid) for grid in grids), default=1) < 1 or num_tiles != pixel_values.shape[0]:
            raise ValueError(
                f"image_grids {grids} need {num_tiles} tiles (rows * cols + 1 per image) but pixel_values has "
                f"{pixel_values.shape[0]}. {fix}"
            )

    def _check_max_new_tokens(self, max_new_tokens, prompt_length=None):
        """`max_new_tokens` must be a positive integer below `config.max_sequence_length`, leaving room for a prompt of
        `prompt_length` ids when that is known."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive integer, got {max_new_tokens!r}; e.g. max_new_tokens=1024."
            )
        limit = self.config.max_sequence_length
        if max_new_tokens >= limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context of {limit} ids "
                f"(config.max_sequence_length); pass a smaller max_new_tokens, e.g. 1024."
            )
        if prompt_length is not None and prompt_length + max_new_tokens > limit:
            room = "shorten the prompt"
            if prompt_length < limit:
                room = f"pass max_new_tokens={limit - prompt_length} or less"
            raise ValueError(
                f"max_new_tokens={max_new_tokens} and a prompt of {prompt_length} ids exceed the model's context of "
                f"{limit} ids (config.max_sequence_length); {room}."
            )

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`, after checking hand-built inputs once (`InternLM2Model._check_inputs`) and an
        explicit `max_new_tokens` against `config.max_sequence_length`; the forwards of its steps skip those checks."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        pixel_values, inputs_embeds = kwargs.get("pixel_values"), kwargs.get("inputs_embeds")
        self.model._check_inputs(input_ids, kwargs.get("attention_mask"), pixel_values, inputs_embeds)
        if kwargs.get("max_new_tokens") is not None:
            prompt = input_ids if input_ids is not None else inputs_embeds
            self._check_max_new_tokens(kwargs["max_new_tokens"], prompt.shape[1] if torch.is_tensor(prompt) else None)
        checked = INPUTS_CHECKED.set(True)
        try:
            return super().generate(inputs, *args, **kwargs)
        finally:
            INPUTS_CHECKED.reset(checked)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_grids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        image_mask=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """
        Args:
            input_ids (`(B, T)`): token ids; image positions hold `config.image_token_id`.
            pixel_values (`(num_tiles, 3, S, S)`) and image_grids (`(N, 2)`), *optional*: the images, encoded and
                scattered into the placeholder positions of `input_ids` (prefill only).
            inputs_embeds (`(B, T, hidden)`) with image_mask (`(B, T)` bool), *optional*: ready embeddings, e.g. with
                image features already in place; `image_mask` says which positions get Partial LoRA.
            labels (`(B, T)`, *optional*): targets for the shifted cross-entropy; -100 is ignored.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*, in `kwargs`): the number of labelled tokens over
                all micro-batches of one optimizer step; the loss is then their sum divided by it (the Trainer's
                gradient accumulation). Without it the loss is the mean over this batch's labelled tokens.
            logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep`
                positions (0 = all), so prefill need not build full-vocabulary logits for every position.
            output_attentions (`bool`, *optional*): also return each layer's attention weights `(B, nh, T, S)`;
                needs `attn_implementation="eager"`.
        Returns:
            `CausalLMOutputWithPast`.
        """
        past_key_values = pop_cache(past_key_values, kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # The decoder (`base_model`) checks hand-built inputs, encodes the images and scatters them into the
        # placeholder positions.
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grids=image_grids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_mask=image_mask,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.output(hidden_states[:, keep])
        if pixel_values is None and self._vision_needs_gradients():
            logits = logits + self._zero_vision_term(logits.device)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )

        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: outputs[CACHE_FIELD] if CACHE_FIELD in outputs else None},
        )
        return result.to_tuple() if return_dict is False else result

    def _vision_needs_gradients(self) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        vision = [self.plora_glb_GN, self.plora_sub_GN, *self.vit.parameters(), *self.vision_proj.parameters()]
        return any(parameter.requires_grad for parameter in vision)

    def _zero_vision_term(self, device):
        """0 times the features of one blank image, on `device`: training batches without images still give every
        trainable vision parameter a (zero) gradient, which DDP, FSDP and ZeRO need from every process at every step."""
        size = self.config.vision_config.image_size
        tiles = torch.zeros(2, 3, size, size, device=device)  # the tower casts pixels to its own dtype and device
        features = self.get_image_features(tiles, torch.ones(1, 2, dtype=torch.long))[0]
        return features.sum().to(device) * 0

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_grids=None, inputs_embeds=None,
                                      image_mask=None, im_mask=None, **kwargs):  # fmt: skip
        """transformers' step inputs, plus the image inputs of the steps that feed prompt positions. `image_mask`
        (`im_mask` in the original) `(B, T)` marks the image positions of a prompt given as `inputs_embeds` or as
        `input_ids`; generated tokens are never image positions, so decode steps get no Partial LoRA."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        # Images are encoded once, by the forward that sees the whole prompt (the prefill, or every step when
        # decoding without a cache); later steps read them from the KV cache.
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and step_ids.shape[1] == input_ids.shape[1]:
            model_inputs.update(pixel_values=pixel_values, image_grids=image_grids)
        image_mask = pick_image_mask(image_mask, im_mask)
        if image_mask is not None:
            model_inputs["image_mask"] = self._step_image_mask(image_mask, input_ids, inputs_embeds, model_inputs)
        return model_inputs

    @staticmethod
    def _step_image_mask(image_mask, input_ids, inputs_embeds, model_inputs):
        """The columns of the prompt's `image_mask` that this step feeds, or None when it feeds none."""
        prompt = inputs_embeds if inputs_embeds is not None else input_ids
        length = image_mask.shape[1]
        # Generated ids extend `input_ids` (never `inputs_embeds`) as the steps go.
        fits = length == prompt.shape[1] if inputs_embeds is not None else length <= prompt.shape[1]
        if image_mask.shape[0] != prompt.shape[0] or not fits:
            raise ValueError(
                f"image_mask (im_mask) has shape {tuple(image_mask.shape)} but the prompt is {tuple(prompt.shape[:2])}"
                "; pass one (batch, prompt length) mask, true where the prompt holds image features."
            )
        step_embeds = model_inputs.get("inputs_embeds")
        if inputs_embeds is not None:
            # The embeddings are fed once (their last positions, should a cache already hold the first ones); the
            # ids fed after them are all generated.
            return image_mask[:, -step_embeds.shape[1] :] if step_embeds is not None else None
        # Prompt ids then generated ids: the step feeds the last positions of `input_ids`.
        first = input_ids.shape[1] - model_inputs["input_ids"].shape[1]
        if first >= image_mask.shape[1]:
            return None
        generated = image_mask.new_zeros(image_mask.shape[0], input_ids.shape[1] - image_mask.shape[1])
        return torch.cat([image_mask, generated], dim=1)[:, first:]

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat every batch row `expand_size` times. The image tensors
        are not batch-major (tiles and images, not rows), so each row's images are repeated with it instead."""
        pixel_values, image_grids = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_grids", None)
        if pixel_values is not None and expand_size > 1:
            pixel_values, image_grids = self._repeat_images_per_row(input_ids, pixel_values, image_grids, expand_size)
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs.update(pixel_values=pixel_values, image_grids=image_grids)
        return expanded_ids, model_kwargs

    def _repeat_images_per_row(self, input_ids, pixel_values, image_grids, repeats):
        """Reorder images for `input_ids.repeat_interleave(repeats, 0)`: the images of row b (in prompt order)
        followed by themselves `repeats` times, row after row."""
        vision = self.config.vision_config
        per_side = tokens_per_side(vision.image_size, vision.patch_size)
        grids = image_grids.tolist()
        slots_per_row = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        tile_starts = [0]
        for rows, cols in grids:
            tile_starts.append(tile_starts[-1] + rows * cols + 1)
        tile_blocks, grid_blocks, image = [], [], 0
        for slots in slots_per_row:
            first = image
            while slots > 0 and image < len(grids):
                slots -= num_image_tokens(*grids[image], per_side)
                image += 1
            if slots != 0:
                raise ValueError(
                    "The image placeholders of input_ids do not split into whole images of image_grids; build "
                    "input_ids, pixel_values and image_grids with one processor call."
                )
            tiles = pixel_values[tile_starts[first] : tile_starts[image]]
            tile_blocks += [tiles] * repeats
            grid_blocks += [image_grids[first:image]] * repeats
        return torch.cat(tile_blocks), torch.cat(grid_blocks)

    def _embed_with_images(self, input_ids, pixel_values, image_grids):
        """Token embeddings with each image's features written over its placeholder positions, in order."""
        features = torch.cat(self.get_image_features(pixel_values, image_grids))  # (sum L_i, hidden)
        return self._scatter_image_features(input_ids, features)

    def _scatter_image_features(self, input_ids, features):
        """`(inputs_embeds, image_mask)`: the embeddings of `input_ids` `(B, T)` with `features` `(L, hidden)` written
        over the L image placeholder positions, in order, and the `(B, T)` mask of those positions."""
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, hidden)
        # On the embedding's device: with a `device_map` the ids may arrive elsewhere.
        image_mask = (input_ids == self.config.image_token_id).to(inputs_embeds.device)  # (B, T)
        num_slots = int(image_mask.sum())
        if num_slots != features.shape[0]:
            raise ValueError(
                f"The prompt has {num_slots} image placeholder positions but the images give {features.shape[0]} "
                "image tokens. Build input_ids and pixel_values with the same processor call and the same hd_num."
            )
        # The common dtype of both, as the original's concatenation of text and image embeddings: the same dtype
        # normally; fp32 under fp16 autocast over bf16 weights, so the fp16 image features are not rounded to bf16.
        dtype = torch.promote_types(inputs_embeds.dtype, features.dtype)
        features = features.to(device=inputs_embeds.device, dtype=dtype)
        inputs_embeds = inputs_embeds.to(dtype).masked_scatter(image_mask[..., None], features)
        return inputs_embeds, image_mask

    # ---- The original chat API: thin wrappers over the processor and `generate`. ----

    def build_processor(self, tokenizer, hd_num=None):
        """The processor matching this model (tile size and placeholder id from the config) around `tokenizer`."""
        vision = self.config.vision_config
        image_processor = InternLMXComposer2ImageProcessor(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hd_num=self.config.hd_num if hd_num is None else hd_num,
        )
        return InternLMXComposer2Processor(image_processor, tokenizer, image_token_id=self.config.image_token_id)

    def _chat_inputs(self, processor, prompts, images, hd_num, max_new_tokens):
        inputs = processor(
            prompts, images=images, hd_num=hd_num, max_length=self.config.max_sequence_length - max_new_tokens
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _chat_generate_kwargs(self, tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p,
                              repetition_penalty, kwargs):  # fmt: skip
        """The original chat() defaults as generate() arguments; it stops at EOS or at the turn-end marker."""
        stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_END)]
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "num_beams": num_beams,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": stop_ids,
            "pad_token_id": tokenizer.pad_token_id,
            **sampling,
            **kwargs,
        }

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query,
        image=None,
        hd_num=25,
        history=[],  # noqa: B006 - the original signature; never mutated
        streamer=None,
        max_new_tokens=1024,
        do_sample=True,
        num_beams=1,
        temperature=1.0,
        top_p=0.8,
        repetition_penalty=1.005,
        meta_instruction=DEFAULT_SYSTEM,
        **kwargs,
    ):
        """One chat turn, with the original signature and defaults.

        Args:
            tokenizer: the InternLM2 tokenizer.
            query (`str`): the user's message; `<ImageHere>` marks where an image goes (at the start if absent).
            image: `None`, an image (path, PIL image, array) or a list of them, for the placeholders of the whole
                conversation: a follow-up turn passes the first turn's image again, as with the original.
            history (`list[tuple[str, str]]`): earlier (query, reply) pairs.
            streamer: a transformers streamer that receives the reply's tokens as they come.
            kwargs: further `generate` arguments.
        Returns:
            `(reply, history + [(query, reply)])`.
        """
        self._check_chat_arguments(tokenizer, hd_num, max_new_tokens, meta_instruction, history)
        images = image if isinstance(image, (list, tuple)) or image is None else [image]
        self._check_query(query, images)
        processor = self.build_processor(tokenizer, hd_num)
        prompt = processor.build_prompt(query, history, meta_instruction)
        inputs = self._chat_inputs(processor, prompt, images, hd_num, max_new_tokens)
        generate_kwargs = self._chat_generate_kwargs(
            tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p, repetition_penalty, kwargs
        )
        output = self.generate(**inputs, streamer=streamer, **self._original_penalty(generate_kwargs, inputs))
        new_ids = output[0, inputs["input_ids"].shape[1] :]
        reply = processor.postprocess(tokenizer.decode(new_ids, skip_special_tokens=True))
        return reply, list(history) + [(query, reply)]

    def stream_chat(self, tokenizer, query, image=None, history=[], **kwargs):  # noqa: B006
        """Like `chat`, but yields the reply as it grows (each value is the whole reply so far). An error in
        `chat` (bad input, a prompt too long) is raised here, after ending the stream, instead of hanging it. Closing
        the stream early (`close()`, a `break` out of the loop, a web client going away) stops the generation at the
        next token."""
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors = []
        cancelled = Event()
        stopping_criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping_criteria.append(_StopWhenSet(cancelled))
        # Autocast is per thread: carry the caller's (e.g. the model card's fp16 autocast) into the worker.
        device_type = self.device.type
        autocast = torch.autocast(
            device_type, torch.get_autocast_dtype(device_type), enabled=torch.is_autocast_enabled(device_type)
        )

        def run():
            try:
                with autocast:
                    self.chat(tokenizer, query, image, history=history, streamer=streamer,
                              stopping_criteria=stopping_criteria, **kwargs)  # fmt: skip
            except Exception as error:
                errors.append(error)
                streamer.end()

        worker = Thread(target=run)
        worker.start()
        reply = ""
        try:
            for piece in streamer:
                reply += piece
                yield reply.split(TURN_END)[0]
        finally:  # also when the caller closes the stream: the worker stops instead of generating on unread
            cancelled.set()
            worker.join()
        if errors:
            raise errors[0]

    @torch.no_grad()
    def batch_chat(self, tokenizer, queries, images=None, hd_num=25, max_new_tokens=1024, do_sample=False,
                   num_beams=1, temperature=1.0, top_p=0.8, repetition_penalty=1.005,
                   meta_instruction=DEFAULT_SYSTEM, **kwargs):  # fmt: skip
        """Answer many single-turn queries in one batch (left-padded); greedy by default.

        Args:
            queries (`list[str]`): one query per request.
            images (`list`, *optional*): per query `None`, one image or a list of images.
        Returns:
            `list[str]`: the replies, in order.

        Raises:
            `BatchChatError`: when some requests fail on their own (a missing image, a prompt too long, an empty
            query): the others are answered all the same, and the error holds every reply and each failure.
        """
        self._check_chat_arguments(tokenizer, hd_num, max_new_tokens, meta_instruction)
        if isinstance(queries, (str, bytes)) or not isinstance(queries, (list, tuple)) or not queries:
            raise TypeError(
                f"queries must be a non-empty list of query strings, got {type(queries).__name__} {queries!r:.60}; for "
                "one query pass [query], or use chat()."
            )
        if images is not None and not isinstance(images, (list, tuple)):
            raise TypeError(
                f"images must be a list with one entry per query (None, an image or a list of images), got "
                f"{type(images).__name__}; e.g. images=[image] for queries=[query]."
            )
        processor = self.build_processor(tokenizer, hd_num)
        images = images or [None] * len(queries)
        if len(images) != len(queries):
            raise ValueError(f"Got {len(queries)} queries but {len(images)} image entries; pass one per query.")
        per_prompt = [[] if own is None else list(own) if isinstance(own, (list, tuple)) else [own] for own in images]
        generate_kwargs = self._chat_generate_kwargs(
            tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p, repetition_penalty, kwargs
        )

        def prepare(indices):
            for index in indices:
                self._check_query(queries[index], per_prompt[index])
            prompts = [processor.build_prompt(queries[index], (), meta_instruction) for index in indices]
            own_images = [per_prompt[index] for index in indices]
            return self._chat_inputs(processor, prompts, own_images, hd_num, max_new_tokens)

        def answer(indices):
            inputs = prepare(indices)
            output = self.generate(**inputs, **self._original_penalty(generate_kwargs, inputs))
            new_ids = output[:, inputs["input_ids"].shape[1] :]
            return processor.postprocess(tokenizer.batch_decode(new_ids, skip_special_tokens=True))

        everyone = list(range(len(queries)))
        try:
            return answer(everyone)
        except (ValueError, TypeError, OSError) as batch_error:
            # Find the requests that fail on their own; answer the others, then report both.
            errors = {}
            for index in everyone:
                try:
                    prepare([index])
                except (ValueError, TypeError, OSError) as error:
                    errors[index] = error
            if not errors:
                raise batch_error
        good = [index for index in everyone if index not in errors]
        replies = [None] * len(queries)
        for index, reply in zip(good, answer(good) if good else []):
            replies[index] = reply
        raise BatchChatError(errors, replies)

    def _check_chat_arguments(self, tokenizer, hd_num, max_new_tokens, meta_instruction, history=()):
        """Check the arguments of `chat`/`stream_chat`/`batch_chat` other than the query and images, each error with
        its fix."""
        check_tokenizer(tokenizer, self.config.vocab_size)
        if hd_num is not None:  # None: the config's hd_num
            validate_hd_num(hd_num)
        self._check_max_new_tokens(max_new_tokens)
        if meta_instruction is not None:
            check_text(meta_instruction, "meta_instruction")
        if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple)):
            raise TypeError(
                f"history must be a list of (query, reply) pairs, got {type(history).__name__}; pass history=[] to "
                "start a conversation, or the history that chat() returned."
            )
        for index, pair in enumerate(history):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(
                    f"history[{index}] must be a (query, reply) pair, got {pair!r:.80}; pass the history that chat() "
                    "returned, e.g. [('What is it?', 'A cat.')]."
                )
            check_text(pair[0], f"history[{index}][0] (a query)")
            check_text(pair[1], f"history[{index}][1] (a reply)")

    @staticmethod
    def _check_query(query, images):
        check_text(query, "query")
        if not (query.strip() or images):
            raise ValueError(f"The query is empty ({query!r}); ask something, or pass an image to talk about.")


class _StopWhenSet(StoppingCriteria):
    """Stops every sequence once `event` is set (`stream_chat`'s reader has gone away)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class BatchChatError(ValueError):
    """Some requests of a `batch_chat` call failed. The others were answered all the same.

    Attributes:
        errors (`dict[int, Exception]`): the failed requests' indices and their errors.
        replies (`list[str | None]`): every request's reply, in order; `None` for the failed ones.
    """

    def __init__(self, errors, replies):
        self.errors, self.replies = errors, replies
        failures = "; ".join(f"request {index}: {type(error).__name__}: {error}" for index, error in errors.items())
        super().__init__(
            f"{len(errors)} of {len(replies)} requests failed ({failures}). The other replies are in this error's "
            "`replies` (None where a request failed)."
        )
