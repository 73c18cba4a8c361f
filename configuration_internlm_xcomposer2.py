"""Configuration of InternLM-XComposer2-4KHD: the InternLM2 decoder fields (flat, as in the published
config.json), the CLIP vision tower, the Partial LoRA ranks and the image placeholder id.
"""

from transformers import CLIPVisionConfig, PretrainedConfig
from transformers.utils import is_flash_attn_2_available, logging

logger = logging.get_logger(__name__)

# The published tower: OpenAI CLIP ViT-L/14 at 336 px (docs/model.md section 1).
CLIP_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

# The linears that carry a Partial LoRA branch, with the published ranks and alphas (docs/model.md section 2).
PLORA_RANKS = {"wqkv": 8, "wo": 256, "w1": 256, "w2": 256, "w3": 256}
PLORA_ALPHAS = {"wqkv": 16, "wo": 256, "w1": 256, "w2": 256, "w3": 256}


class InternLMXcomposer2Config(PretrainedConfig):
    r"""
    Configuration for [`InternLMXComposer2ForCausalLM`]. Defaults are the published 7B 4KHD model, so an old
    config.json with only the flat InternLM2 fields loads unchanged.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, hidden_act, max_position_embeddings, initializer_range, rms_norm_eps,
        rope_theta, bias: the InternLM2-7B decoder (docs/model.md section 1).
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower, built from this config and never downloaded. Default: ViT-L/14-336.
        plora_ranks / plora_alphas (`dict[str, int]`, *optional*):
            Rank and alpha of the Partial LoRA branch of each linear (`wqkv`, `wo`, `w1`, `w2`, `w3`); the
            branch is scaled by alpha / rank.
        plora_dropout (`float`, *optional*, defaults to 0.05):
            Dropout on the branch input, active in training only.
        image_token_id (`int`, *optional*, defaults to 92537):
            The placeholder id that marks image positions in `input_ids`. It is a reserved piece of the published
            vocabulary (`[UNUSED_TOKEN_140]`) that the chat markup never uses; its embedding row is never read,
            because image features replace it.
        hd_num (`int`, *optional*, defaults to 25):
            Default maximum number of 336 px crops per image (the original `chat()` default).
        max_sequence_length (`int`, *optional*, defaults to 16384):
            The longest sequence (prompt plus reply) `chat` accepts: the published config's `max_length`, up to
            which the original truncated its inputs (silently; we raise instead). Old configs' `max_length` is read.
    """

    model_type = "internlmxcomposer2"
    sub_configs = {"vision_config": CLIPVisionConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=92544,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=False,
        rope_theta=1e6,
        rope_scaling=None,
        vision_config=None,
        plora_ranks=None,
        plora_alphas=None,
        plora_dropout=0.05,
        image_token_id=92537,
        hd_num=25,
        max_sequence_length=16384,
        **kwargs,
    ):
        if rope_scaling is not None:
            raise ValueError(
                f"rope_scaling={rope_scaling} is not supported: InternLM-XComposer2-4KHD uses plain RoPE. "
                "Remove `rope_scaling` from the config."
            )
        if bias:
            raise ValueError("bias=True is not supported: the InternLM2 decoder of this model has no biases.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta

        if vision_config is None:
            vision_config = dict(CLIP_VIT_L_336)
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{**CLIP_VIT_L_336, **vision_config})
        self.vision_config = vision_config

        self.plora_ranks = {**PLORA_RANKS, **(plora_ranks or {})}
        self.plora_alphas = {**PLORA_ALPHAS, **(plora_alphas or {})}
        self.plora_dropout = plora_dropout
        self.image_token_id = image_token_id
        self.hd_num = hd_num
        # The published config calls it `max_length`, a name transformers reserves for generation settings.
        self.max_sequence_length = kwargs.pop("max_length", max_sequence_length)

        # The published config.json asks for flash_attention_2. Without flash-attn installed that would make
        # from_pretrained fail, so fall back to SDPA (same function, slower at long sequences).
        attn_implementation = kwargs.get("attn_implementation")
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            logger.warning(
                "This config asks for attn_implementation='flash_attention_2' but flash-attn is not installed; "
                "using 'sdpa' instead (same outputs). Install flash-attn to use it."
            )
            kwargs["attn_implementation"] = "sdpa"

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
