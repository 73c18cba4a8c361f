"""vLLM plugin for InternLM-XComposer2-4KHD: registers the architecture and the `internlm_xcomposer2` tokenizer mode.

vLLM calls `register` in every process it starts (entry point group `vllm.general_plugins`).
"""

ARCHITECTURE = "InternLMXComposer2ForCausalLM"


def register():
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from .tokenizer import TOKENIZER_MODE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_ixc2.model:InternLMXComposer2ForCausalLM")
    TokenizerRegistry.tokenizers.setdefault(TOKENIZER_MODE, ("vllm_ixc2.tokenizer", "InternLMXComposer2Tokenizer"))
    # Chat messages render with vLLM's HF renderer (the chat template), then go through the tokenizer above.
    RENDERER_REGISTRY.renderers.setdefault(TOKENIZER_MODE, ("vllm.renderers.hf", "HfRenderer"))
