"""The InternLM2 decoder of InternLM-XComposer2-4KHD, with Partial LoRA on every linear.

Positions where the per-token image mask is true get the low-rank branch of each `PLoRA` linear. As the model's
`base_model` the decoder also takes the images themselves, which its owner encodes (`embed_images`), and it checks
hand-built ids. Parameter names follow the published checkpoint.
"""

import contextvars
import functools
import inspect

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

logger = logging.get_logger(__name__)

# transformers renamed arguments of the mask helpers over 5.x (`input_embeds` -> `inputs_embeds`, then
# `past_key_values` -> `cache`, and dropped `cache_position`), and 5.2x renamed `past_key_values` to `cache` in
# forward arguments and model outputs. We read the installed signature instead of a version number, accept both
# names, and answer in the installed version's name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_PARAMETERS = set(inspect.signature(create_causal_mask).parameters)


# True while `generate` runs in this thread: it checked its inputs once, so the forwards of its steps skip the checks
# (and the host sync of the id-range check on every decode step).
INPUTS_CHECKED = contextvars.ContextVar("inputs_checked", default=False)


def pick_image_mask(image_mask, im_mask):
    """The image mask passed under either name: `image_mask`, or `im_mask` as the original code and the clients
    written for it (VLMEvalKit, lmms-eval, ms-swift) call it."""
    if im_mask is None:
        return image_mask
    if image_mask is not None:
        raise ValueError("Pass the image mask once: as image_mask, or as im_mask (the original's name).")
    return im_mask


def pop_cache(past_key_values, kwargs):
    """The cache passed under either name (`past_key_values`, or `cache` on transformers >= 5.2x)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position):
    """transformers' own causal mask (right format for the attention backend), on any of its signatures."""
    arguments = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    arguments["inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"] = inputs_embeds
    arguments["cache" if "cache" in _MASK_PARAMETERS else "past_key_values"] = cache
    if "cache_position" in _MASK_PARAMETERS:
        arguments["cache_position"] = cache_position
    return create_causal_mask(**arguments)


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """Plain RoPE (rotate-half convention). The inverse frequencies are recomputed in fp32 on every call
    instead of being kept as a buffer: 64 numbers cost nothing, and a buffer would be cast to bf16 by
    `model.to(dtype)` or left on the meta device by low-memory loading."""

    def __init__(self, head_dim, base):
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    @torch.no_grad()
    def forward(self, position_ids, dtype):
        """cos and sin `(B, T, hd)` of `position_ids`, computed in fp32 and rounded to `dtype`."""
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.base**exponent)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # In the query's dtype: under fp16 autocast over bf16 weights, the original rotated its fp16 queries with its
    # bf16 cos/sin tables cast to fp16. Without autocast this is a no-op.
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)  # (B, 1, T, hd), broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class PartialLoRA:
    """Mixin for a bias-free linear class: adds the low-rank branch `Plora_B(Plora_A(x)) * alpha / rank` at image
    positions. Mixed into `nn.Linear` (`PLoRA`) and, for bitsandbytes loading, into its quantised linears.

    `lora_mask` is `(B, T, 1)` in the activation dtype: 1 at image positions, 0 elsewhere, or None when the
    forward has no image positions at all. The mask is applied to the rank-r activation, the smallest tensor
    on the branch, so text rows receive exactly zero and no host synchronisation is needed (the original
    indexed rows with a boolean mask, one sync per linear). With `lora_mask=None` the branch is skipped,
    so decoding and text-only prompts cost what the plain LLM costs.
    """

    def __init__(self, in_features, out_features, rank, alpha, dropout, **base_kwargs):
        super().__init__(in_features, out_features, bias=False, **base_kwargs)
        self.Plora_A = nn.Linear(in_features, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_features, bias=False)
        self.lora_scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x, lora_mask=None):
        out = super().forward(x)
        if lora_mask is None:
            return out
        delta = self.Plora_B(self.Plora_A(self.lora_dropout(x)) * lora_mask)
        # In place: autograd does not need a linear's output for its backward, and a new tensor per linear
        # costs a full-size allocation and copy.
        return out.add_(delta, alpha=self.lora_scaling)


class PLoRA(PartialLoRA, nn.Linear):
    """A bias-free `nn.Linear` with the Partial LoRA branch (see `PartialLoRA`)."""


@functools.cache
def quantized_plora_class(base):
    """`PartialLoRA` over a bitsandbytes linear class (`Linear4bit`, `Linear8bitLt`). transformers' bitsandbytes
    loading replaces only plain linears, and would either leave a `PLoRA` unquantised (5.x) or swap it for a
    branchless linear and drop the branch weights (4.57); so the model builds these itself and the quantiser
    fills their weights. `source_cls` is the attribute transformers' replacement leaves on a quantised linear
    and its quantiser reads (a Conv1D source would need transposing)."""
    attributes = {"__doc__": f"`PartialLoRA` over `{base.__name__}`.", "source_cls": nn.Linear}
    return type(f"PLoRA{base.__name__}", (PartialLoRA, base), attributes)


def plora_linear_class(config):
    """The class and extra constructor arguments of the Partial LoRA linears: `PLoRA`, or a quantised variant when
    the model is being loaded with a bitsandbytes `quantization_config` (set on the config before `__init__`)."""
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, BitsAndBytesConfig):
        return PLoRA, {}
    import bitsandbytes as bnb

    if quantization.load_in_4bit:
        return quantized_plora_class(bnb.nn.Linear4bit), {
            "compute_dtype": quantization.bnb_4bit_compute_dtype,
            "compress_statistics": quantization.bnb_4bit_use_double_quant,
            "quant_type": quantization.bnb_4bit_quant_type,
            "quant_storage": quantization.bnb_4bit_quant_storage,
        }
    return quantized_plora_class(bnb.nn.Linear8bitLt), {
        "has_fp16_weights": quantization.llm_int8_has_fp16_weight,
        "threshold": quantization.llm_int8_threshold,
    }


def plora(config, name, in_features, out_features):
    linear_class, base_kwargs = plora_linear_class(config)
    rank, alpha = config.plora_ranks[name], config.plora_alphas[name]
    return linear_class(in_features, out_features, rank, alpha, config.plora_dropout, **base_kwargs)


def repeat_kv(hidden_states, n_rep):
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd); kv head h serves query heads h*n_rep .. h*n_rep + n_rep-1."""
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hd)
    return attn_output, attn_weights


class InternLM2Attention(nn.Module):
    """Grouped-query attention with the fused `wqkv` projection of the published checkpoint.

    `wqkv` rows are laid out per key/value group: for group h, the `n_rep` query heads h*n_rep .. , then key
    head h, then value head h, each `head_dim` rows (docs/model.md section 3).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = 0.0
        self.is_causal = True
        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.wqkv = plora(config, "wqkv", config.hidden_size, qkv_size)
        self.wo = plora(config, "wo", self.num_heads * self.head_dim, config.hidden_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, lora_mask, cache=None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states, lora_mask)
        qkv = qkv.view(batch, seq_len, self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        query = qkv[..., :-2, :].reshape(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        key = qkv[..., -2, :].transpose(1, 2)  # (B, n_kv, T, hd)
        value = qkv[..., -1, :].transpose(1, 2)  # (B, n_kv, T, hd)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            # transformers 4.57 caches read `cache_position` from this dict; 5.x caches ignore it.
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": kwargs.get("cache_position")})

        attention_interface = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq_len, -1).contiguous()  # (B, T, nh * hd)
        return self.wo(attn_output, lora_mask), attn_weights


class InternLM2MLP(nn.Module):
    """SwiGLU: w2(act(w1 x) * w3 x)."""

    def __init__(self, config):
        super().__init__()
        self.w1 = plora(config, "w1", config.hidden_size, config.intermediate_size)
        self.w3 = plora(config, "w3", config.hidden_size, config.intermediate_size)
        self.w2 = plora(config, "w2", config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x, lora_mask):
        return self.w2(self.act_fn(self.w1(x, lora_mask)) * self.w3(x, lora_mask), lora_mask)


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, lora_mask=None, cache=None, **kwargs):
        """Returns the new hidden states `(B, T, hidden)` and the attention weights `(B, nh, T, S)` (None unless the
        backend is eager)."""
        residual = hidden_states
        hidden_states, attn_weights = self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, lora_mask, cache, **kwargs
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states), lora_mask), attn_weights


class InternLM2Model(nn.Module):
    """Token embeddings, the decoder layers and the final norm (checkpoint prefix `model.`).

    A plain module owned by `InternLMXComposer2ForCausalLM`, which holds the config, initialisation and
    loading logic. It is also the model's `base_model` (what TRL, peft and others call for hidden states), so it
    takes images too: `embed_images`, set by the owner, writes their features over the placeholder embeddings. The
    vision weights stay on the owner (their published names are top-level), so this module only holds a reference.
    """

    # (input_ids, pixel_values, image_grids) -> (inputs_embeds, image_mask); None for a decoder without a vision side.
    embed_images = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = InternLM2RotaryEmbedding(head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        image_mask=None,
        use_cache=None,
        output_hidden_states=False,
        output_attentions=False,
        pixel_values=None,
        image_grids=None,
        im_mask=None,
        **kwargs,
    ):
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`), or inputs_embeds (`(B, T, hidden_size)`).
            attention_mask (`(B, past + T)`, 1 for real tokens, 0 for padding), optional.
            image_mask (`torch.BoolTensor` of shape `(B, T)`, *optional*): true at positions whose embedding came
                from the vision side; those positions get the Partial LoRA branch. None = no image positions.
                `im_mask` is the original's name for it and is accepted too.
            pixel_values (`(num_tiles, 3, S, S)`) and image_grids (`(N, 2)`), *optional*: the images of `input_ids`'
                placeholders, as the processor returns them; encoded by `embed_images` (prefill only).
            past_key_values / cache (`Cache`, *optional*): the KV cache, updated in place.
            output_attentions (`bool`): also return each layer's attention weights (eager attention only).
        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` `(B, T, hidden_size)`, the cache, and the hidden states
            and attention weights when asked for.
        Raises:
            `ValueError`: for image arguments this decoder cannot use (no `embed_images`, or names it does not know,
            which would otherwise be ignored silently), or attention weights from a fused attention backend.
        """
        past_key_values = pop_cache(past_key_values, kwargs)
        image_mask = pick_image_mask(image_mask, im_mask)
        self._check_image_arguments(input_ids, pixel_values, image_grids, kwargs)
        self._check_inputs(input_ids, attention_mask, pixel_values, inputs_embeds, past_key_values)
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs eager attention; {self.config._attn_implementation!r} does not compute "
                "the weights. Load the model with attn_implementation=\"eager\" (or call model.set_attn_implementation"
                "(\"eager\") on transformers 5)."
            )
        if pixel_values is not None:
            inputs_embeds, image_mask = self.embed_images(input_ids, pixel_values, image_grids)
            input_ids = None
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()

        cache_position = kwargs.pop("cache_position", None)
        if cache_position is None:
            # A static cache counts its length in a device tensor: adding it (not `arange(past, past + T)`) keeps
            # the host from waiting for the device.
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        mask = causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids, cache_position)

        # In training the branch always runs (an all-zero mask when the batch has no image), so every
        # PLoRA parameter is in the graph and DDP never sees an unused parameter; its gradient is then zero.
        if image_mask is None and self.training:
            image_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        lora_mask = None
        if image_mask is not None:
            lora_mask = image_mask[..., None].to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)  # (B, T, 1)

        hidden_states = inputs_embeds
        # cos/sin rounded to the weights' dtype, like the original's cached tables: under autocast the activations
        # may be wider (fp32 image features) or narrower (fp16 queries) than the weights.
        position_embeddings = self.rotary_emb(position_ids.to(inputs_embeds.device), self.norm.weight.dtype)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                lora_mask=lora_mask,
                cache=past_key_values,
                cache_position=cache_position,
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )

    def _check_inputs(self, input_ids, attention_mask, pixel_values, inputs_embeds, past_key_values=None):
        """Checks of hand-built ids for `generate` and `forward`, each error with its fix.

        Shapes and dtypes always; for a whole prompt (no cache yet) also the attention mask's shape and, in one host
        sync, the id range (an id outside the embedding is a device-side assert on CUDA) and image placeholders
        without images (the model would read their embeddings as an image). Inside `generate`, whose entry checked
        the prompt already, the forwards of the steps skip every check.
        """
        if input_ids is None or INPUTS_CHECKED.get():
            return
        fix = "Build the inputs with the model's processor: inputs = processor(prompt, images=...)."
        if not torch.is_tensor(input_ids):
            kind = type(input_ids).__name__
            raise TypeError(f"input_ids must be a torch tensor of shape (batch, length), got {kind}. {fix}")
        if input_ids.dim() != 2:
            hint = "add the batch dimension with input_ids[None]." if input_ids.dim() == 1 else fix
            raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}; {hint}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}; cast ids with .long(), or "
                f"pass embeddings as inputs_embeds. {fix}"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token id. {fix}")
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return  # a step after the prompt, which was checked when the cache was still empty
        if attention_mask is not None and (
            not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(input_ids.shape)
        ):
            shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}; pass the "
                "attention_mask the processor returned with the ids (or none for an unpadded batch)."
            )
        if torch.compiler.is_compiling():
            return
        vocab_size, image_token_id = self.config.vocab_size, self.config.image_token_id
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        any_outside, any_placeholder = torch.stack([outside.any(), (input_ids == image_token_id).any()]).tolist()
        if any_outside:
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab_size}), e.g. {input_ids[outside][:5].tolist()}; "
                "tokenize with this model's tokenizer: "
                "AutoTokenizer.from_pretrained(model_folder, trust_remote_code=True)."
            )
        if any_placeholder and pixel_values is None and inputs_embeds is None:
            raise ValueError(
                f"input_ids hold image placeholder ids ({image_token_id}) but no pixel_values were given, so the model "
                "would read the placeholder embeddings as an image. Pass the pixel_values and image_grids the "
                "processor returned with these ids, or build the ids without <ImageHere>."
            )

    def _check_image_arguments(self, input_ids, pixel_values, image_grids, kwargs):
        """Refuse image inputs this call would otherwise drop: `**kwargs` reach the attention backend, which ignores
        names it does not know (TRL once trained "with images" that never reached the model this way)."""
        unknown = sorted(name for name in kwargs if name.startswith(("pixel_", "image_")))
        if unknown:
            raise ValueError(
                f"The decoder got {unknown}, which this model does not use; pass the processor's outputs: "
                "input_ids, attention_mask, pixel_values and image_grids."
            )
        if pixel_values is None:
            if image_grids is not None:
                raise ValueError("image_grids were given without pixel_values; pass both, as the processor gives them.")
            return
        if self.embed_images is None:
            raise ValueError(
                "This decoder has no vision side to encode pixel_values; call the whole model "
                "(InternLMXComposer2ForCausalLM, whose base_model encodes images) or pass inputs_embeds."
            )
        if input_ids is None or image_grids is None:
            raise ValueError(
                "pixel_values need the input_ids holding the image placeholder ids and the image_grids the image "
                "processor returned with them."
            )
