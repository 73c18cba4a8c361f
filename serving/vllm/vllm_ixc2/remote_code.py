"""The model folder's own remote-code modules (image processor, CLIP tower, merge, layout, token count, prompt ids),
imported the way transformers imports them for `trust_remote_code=True`, so the plugin never copies them.
"""

import sys

from transformers.dynamic_module_utils import get_class_from_dynamic_module

# One class per module: transformers' dynamic loader imports a module (and the files it imports) through a class in it.
_ANCHORS = {
    "build_mlp": "CLIPVisionTower",
    "image_processing_4khd": "InternLMXComposer2ImageProcessor",
    "processing_internlm_xcomposer2": "InternLMXComposer2Processor",
}


def remote_module(model_path: str, name: str):
    """The module `name` (e.g. `"build_mlp"`) of the model folder or Hub repo `model_path`."""
    anchor = get_class_from_dynamic_module(f"{name}.{_ANCHORS[name]}", model_path)
    return sys.modules[anchor.__module__]
