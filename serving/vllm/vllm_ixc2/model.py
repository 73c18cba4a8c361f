"""InternLM-XComposer2-4KHD as a native vLLM model: the InternLM2 decoder on vLLM's parallel layers with Partial LoRA
at image positions, and the model folder's own CLIP tower, 2x2 merge and global-local layout for the images.

Parameter names are the published checkpoint's, so its weights (and any `save_pretrained` copy) load unchanged.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    StageMissingLayer,
    _merge_multimodal_embeddings,
    is_pp_missing_parameter,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from .processing import (
    IMAGE_TOKEN,
    InternLMXComposer2DummyInputsBuilder,
    InternLMXComposer2MultiModalProcessor,
    InternLMXComposer2ProcessingInfo,
)
from .remote_code import remote_module


def _branch(linear, x, lora_mask):
    """`Plora_B(Plora_A(x) * mask)`: the low-rank branch, exactly zero on rows whose mask is 0."""
    return linear.Plora_B(linear.Plora_A(x) * lora_mask)


class PLoRAColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel linear (`w1`, `w3`) with the Partial LoRA branch: `Plora_A` replicated, `Plora_B` split by
    output rows like the base weight, so each rank adds the branch to its own output slice."""

    def __init__(self, input_size, output_size, rank, alpha, quant_config, prefix):
        super().__init__(
            input_size, output_size, bias=False, quant_config=quant_config, return_bias=False, prefix=prefix
        )
        self.Plora_A = ReplicatedLinear(input_size, rank, bias=False, return_bias=False, prefix=f"{prefix}.Plora_A")
        self.Plora_B = ColumnParallelLinear(
            rank, output_size, bias=False, return_bias=False, prefix=f"{prefix}.Plora_B"
        )
        self.lora_scaling = alpha / rank

    def forward(self, x, lora_mask):
        return torch.add(super().forward(x), _branch(self, x, lora_mask), alpha=self.lora_scaling)


class PLoRAQKVParallelLinear(QKVParallelLinear):
    """`wqkv` in vLLM's q/k/v layout with the Partial LoRA branch; `load_weights` de-interleaves the published rows
    of the weight and of `Plora_B` (docs/model.md section 3)."""

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, rank, alpha, quant_config, prefix):
        super().__init__(
            hidden_size, head_dim, num_heads, num_kv_heads, bias=False, quant_config=quant_config, return_bias=False,
            prefix=prefix,
        )  # fmt: skip
        self.Plora_A = ReplicatedLinear(hidden_size, rank, bias=False, return_bias=False, prefix=f"{prefix}.Plora_A")
        self.Plora_B = QKVParallelLinear(
            rank, head_dim, num_heads, num_kv_heads, bias=False, return_bias=False, prefix=f"{prefix}.Plora_B"
        )
        self.lora_scaling = alpha / rank

    def forward(self, x, lora_mask):
        return torch.add(super().forward(x), _branch(self, x, lora_mask), alpha=self.lora_scaling)


class PLoRARowParallelLinear(RowParallelLinear):
    """Row-parallel linear (`wo`, `w2`) with the Partial LoRA branch: `Plora_A` split by input columns like the base
    weight, `Plora_B` replicated. Each rank adds its partial branch to its partial output, and one all-reduce sums
    both (the branch is linear in each rank's partial rank-r activation)."""

    def __init__(self, input_size, output_size, rank, alpha, quant_config, prefix):
        super().__init__(
            input_size, output_size, bias=False, reduce_results=False, quant_config=quant_config, return_bias=False,
            prefix=prefix,
        )  # fmt: skip
        self.Plora_A = RowParallelLinear(
            input_size, rank, bias=False, reduce_results=False, return_bias=False, prefix=f"{prefix}.Plora_A"
        )
        self.Plora_B = ReplicatedLinear(rank, output_size, bias=False, return_bias=False, prefix=f"{prefix}.Plora_B")
        self.lora_scaling = alpha / rank

    def forward(self, x, lora_mask):
        output = torch.add(super().forward(x), _branch(self, x, lora_mask), alpha=self.lora_scaling)
        return tensor_model_parallel_all_reduce(output) if self.tp_size > 1 else output


class InternLM2Attention(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        head_dim = config.hidden_size // config.num_attention_heads
        if config.num_attention_heads % tp_size or config.num_key_value_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide num_attention_heads={config.num_attention_heads} and "
                f"num_key_value_heads={config.num_key_value_heads}; choose e.g. 1, 2, 4 or 8 for the 7B model."
            )
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = config.num_key_value_heads // tp_size
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        ranks, alphas = config.plora_ranks, config.plora_alphas
        self.wqkv = PLoRAQKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, ranks["wqkv"],
            alphas["wqkv"], quant_config, f"{prefix}.wqkv",
        )  # fmt: skip
        self.wo = PLoRARowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, ranks["wo"], alphas["wo"], quant_config,
            f"{prefix}.wo",
        )  # fmt: skip
        self.rotary_emb = get_rope(
            head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
        self.attn = Attention(
            self.num_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions, hidden_states, lora_mask):
        qkv = self.wqkv(hidden_states, lora_mask)  # (T, q_size + 2 * kv_size) on this rank
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query, key = self.rotary_emb(positions, query, key)
        return self.wo(self.attn(query, key, value), lora_mask)


class InternLM2MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). `w1` and `w3` stay two layers, under their checkpoint names."""

    def __init__(self, config, quant_config, prefix):
        super().__init__()
        ranks, alphas = config.plora_ranks, config.plora_alphas
        hidden, inner = config.hidden_size, config.intermediate_size
        self.w1 = PLoRAColumnParallelLinear(hidden, inner, ranks["w1"], alphas["w1"], quant_config, f"{prefix}.w1")
        self.w3 = PLoRAColumnParallelLinear(hidden, inner, ranks["w3"], alphas["w3"], quant_config, f"{prefix}.w3")
        self.w2 = PLoRARowParallelLinear(inner, hidden, ranks["w2"], alphas["w2"], quant_config, f"{prefix}.w2")
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; InternLM2 uses 'silu'.")

    def forward(self, x, lora_mask):
        return self.w2(nn.functional.silu(self.w1(x, lora_mask)) * self.w3(x, lora_mask), lora_mask)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix):
        super().__init__()
        self.attention = InternLM2Attention(config, cache_config, quant_config, f"{prefix}.attention")
        self.feed_forward = InternLM2MLP(config, quant_config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, lora_mask):
        # vLLM's fused residual norms: `norm(x, residual)` returns (norm(x + residual), x + residual).
        if residual is None:
            residual, hidden_states = hidden_states, self.attention_norm(hidden_states)
        else:
            hidden_states, residual = self.attention_norm(hidden_states, residual)
        hidden_states = self.attention(positions, hidden_states, lora_mask)
        hidden_states, residual = self.ffn_norm(hidden_states, residual)
        return self.feed_forward(hidden_states, lora_mask), residual


@support_torch_compile
class InternLM2Model(nn.Module):
    """Token embeddings, decoder layers (this pipeline stage's) and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: InternLM2DecoderLayer(config, vllm_config.cache_config, vllm_config.quant_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def make_empty_intermediate_tensors(self, batch_size, dtype, device) -> IntermediateTensors:
        """What one pipeline stage sends the next: hidden states, residual, and the image mask `(T, 1)`."""
        return IntermediateTensors(
            {
                "hidden_states": torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device),
                "residual": torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device),
                "image_mask": torch.zeros(batch_size, 1, dtype=dtype, device=device),
            }
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None,
        image_mask: torch.Tensor,
    ) -> torch.Tensor | IntermediateTensors:
        """
        Args:
            image_mask (`(T, 1)` in the activation dtype): 1 at image positions (they get the Partial LoRA branch),
                0 elsewhere. Later pipeline stages read it from `intermediate_tensors` instead.
        """
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
            image_mask = intermediate_tensors["image_mask"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual, image_mask)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual, "image_mask": image_mask})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def deinterleave_qkv(weight, num_kv_heads, head_dim):
    """Split published `wqkv` rows (per kv group: its query heads, its key head, its value head) into the q, k and v
    blocks vLLM's `QKVParallelLinear` loads, keeping query head `h * n_rep + g` in place.

    Args:
        weight (`(num_kv_heads * (n_rep + 2) * head_dim, in)`): `wqkv.weight` or `wqkv.Plora_B.weight`.
    Returns:
        `(q, k, v)` of shapes `(num_heads * head_dim, in)`, `(num_kv_heads * head_dim, in)` twice.
    """
    grouped = weight.view(num_kv_heads, -1, head_dim, weight.shape[-1])  # (kv, n_rep + 2, hd, in)
    query = grouped[:, :-2].reshape(-1, weight.shape[-1])
    key = grouped[:, -2].reshape(-1, weight.shape[-1])
    value = grouped[:, -1].reshape(-1, weight.shape[-1])
    return query, key, value


@MULTIMODAL_REGISTRY.register_processor(
    InternLMXComposer2MultiModalProcessor,
    info=InternLMXComposer2ProcessingInfo,
    dummy_inputs=InternLMXComposer2DummyInputsBuilder,
)
class InternLMXComposer2ForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    """The whole model under the checkpoint's names: `model.*`, `output`, `vit.*`, `vision_proj.*`, `plora_glb_GN`
    (separator) and `plora_sub_GN` (newline).

    vLLM hands every step's image positions to `embed_input_ids` as `is_multimodal`; they are kept in the persistent
    `image_mask` buffer (one row per schedulable token) and a slice of it goes to the decoder, so compiled graphs and
    CUDA graphs always read the same address.
    """

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"Only images are supported, got modality {modality!r}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        build_mlp = remote_module(vllm_config.model_config.model, "build_mlp")
        self.merge_2x2, self.global_local_layout = build_mlp.merge_2x2, build_mlp.global_local_layout

        with self._mark_tower_model(vllm_config, "image"):
            # The tower runs transformers' CLIP layers, which read their attention backend from the sub-config.
            config.vision_config._attn_implementation = "sdpa"
            self.vit = build_mlp.CLIPVisionTower(config.vision_config)
            self.vision_proj = build_mlp.build_vision_projector(config)
        merged_size = 4 * config.vision_config.hidden_size
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, merged_size))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_size))

        with self._mark_language_model(vllm_config):
            self.model = InternLM2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
            self.output = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "output"),
            )  # fmt: skip
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("image_mask", torch.zeros(max_tokens, 1), persistent=False)

    def get_language_model(self) -> nn.Module:
        return self.model

    def embed_multimodal(self, **kwargs) -> list[torch.Tensor]:
        """One `(num_image_tokens(rows, cols), hidden)` sequence per image, as `get_image_features` of the HF model.

        Args (kwargs):
            pixel_values (`(T, 3, S, S)`, or one `(T_i, 3, S, S)` per image): per image its global view, then crops.
            image_grids (`(N, 2)`): (rows, cols) of each image.
        """
        pixel_values, image_grids = kwargs.get("pixel_values"), kwargs.get("image_grids")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        if isinstance(image_grids, (list, tuple)):
            image_grids = torch.stack(list(image_grids))
        features = self.merge_2x2(self.vit(pixel_values.to(self.plora_glb_GN.dtype)))  # (T, t, t, 4C)
        sequences = self.global_local_layout(features, image_grids.view(-1, 2), self.plora_glb_GN, self.plora_sub_GN)
        return list(self.vision_proj(torch.cat(sequences)).split([len(s) for s in sequences]))

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None) -> torch.Tensor:
        """Token embeddings with image features scattered in; records this step's image positions."""
        num_tokens = input_ids.shape[0]
        if is_multimodal is None:
            self.image_mask[:num_tokens].zero_()
        else:
            self.image_mask[:num_tokens, 0].copy_(is_multimodal, non_blocking=True)
        inputs_embeds = self.model.embed_input_ids(input_ids)
        if not multimodal_embeddings:
            return inputs_embeds
        return _merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        image_mask = self.image_mask[: positions.shape[-1]]
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, image_mask)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.output, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load published (or `save_pretrained`) tensors by name; `wqkv` rows are de-interleaved into q, k, v."""
        config = self.config
        head_dim = config.hidden_size // config.num_attention_heads
        parameters = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            # Layers of other pipeline stages, and the vision side when images are off (--limit-mm-per-prompt).
            stage = getattr(self, name.split(".")[0], None)
            if is_pp_missing_parameter(name, self) or isinstance(stage, StageMissingLayer):
                continue
            if name not in parameters:
                raise ValueError(
                    f"Checkpoint tensor {name!r} has no parameter in the model; is this an InternLM-XComposer2-4KHD "
                    "checkpoint of the same architecture as its config.json?"
                )
            parameter = parameters[name]
            if name.endswith(("attention.wqkv.weight", "attention.wqkv.Plora_B.weight")):
                for shard, part in zip("qkv", deinterleave_qkv(tensor, config.num_key_value_heads, head_dim)):
                    parameter.weight_loader(parameter, part, shard)
            else:
                getattr(parameter, "weight_loader", default_weight_loader)(parameter, tensor)
            loaded.add(name)
        return loaded
