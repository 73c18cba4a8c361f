"""The vision side of InternLM-XComposer2-4KHD: the CLIP tower built from config (never downloaded), the
global-local token layout with newline and separator vectors, and the projector into the LLM.
"""

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoder


class CLIPVisionEmbeddings(nn.Module):
    """Patch + class + position embeddings of CLIP, with the parameter names of transformers' CLIP.

    Written here rather than imported so that it holds parameters only: transformers' version also keeps a
    `position_ids` buffer that low-memory loading leaves uninitialised on some versions.
    """

    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, self.embed_dim)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (T, C, n, n)
        patches = patches.flatten(2).transpose(1, 2)  # (T, n*n, C)
        # Under autocast the convolution's output is fp16 while the class embedding keeps the weights' dtype, and
        # autocast refuses to concatenate bf16 with fp16: join them in their common dtype (a no-op otherwise).
        dtype = torch.promote_types(self.class_embedding.dtype, patches.dtype)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)  # (T, 1, C)
        embeddings = torch.cat([cls, patches.to(dtype)], dim=1)  # (T, 1 + n*n, C)
        # Called as a module, not read as `.weight`: with offloading (`device_map`), accelerate loads a module's
        # weights only when that module runs.
        positions = torch.arange(embeddings.shape[1], device=embeddings.device)
        return embeddings + self.position_embedding(positions)


class CLIPVisionTransformer(nn.Module):
    """CLIP ViT without the post-layernorm (the published checkpoint has none: the original replaced it by an
    identity when training the tower). Returns the last encoder layer's output."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)

    def forward(self, pixel_values):
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(inputs_embeds=hidden_states)[0]  # (T, 1 + n*n, C)


class CLIPVisionTower(nn.Module):
    """Checkpoint path `vit.vision_tower.vision_model.*`, kept for the published weights."""

    def __init__(self, config):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values):
        """(T, 3, S, S) pixel tiles -> (T, n, n, C) patch features of the last layer, CLS dropped."""
        features = self.vision_tower.vision_model(pixel_values)[:, 1:]  # (T, n*n, C)
        side = int(features.shape[1] ** 0.5)
        return features.unflatten(1, (side, side))  # (T, n, n, C)


def build_vision_projector(config):
    """`vision_proj`: Linear -> GELU (exact) -> Linear, from the merged 2x2 CLIP features to the LLM width."""
    merged_size = 4 * config.vision_config.hidden_size
    return nn.Sequential(
        nn.Linear(merged_size, config.hidden_size),
        nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size),
    )


def merge_2x2(features):
    """(T, n, n, C) -> (T, n/2, n/2, 4C): each 2x2 block of neighbours becomes one token, channels in the order
    top-left, top-right, bottom-left, bottom-right."""
    tiles, side, _, channels = features.shape
    half = side // 2
    features = features.view(tiles, half, 2, half, 2, channels)  # (T, row, dy, col, dx, C)
    features = features.permute(0, 1, 3, 2, 4, 5)  # (T, row, col, dy, dx, C)
    return features.reshape(tiles, half, half, 4 * channels)


def global_local_layout(merged, image_grids, glb_gn, sub_gn):
    """Lay out each image's tokens: global rows each followed by a newline, one separator, then the crops
    stitched into one grid whose rows are each followed by a newline (docs/model.md section 5).

    Args:
        merged (`torch.Tensor` of shape `(T, t, t, D)`): merged features of all tiles of all images, per image
            the global view first and then its `rows * cols` crops in row-major order.
        image_grids (`torch.LongTensor` of shape `(N, 2)`): (rows, cols) of each image.
        glb_gn (`(1, 1, D)`): the separator vector `plora_glb_GN`.
        sub_gn (`(1, 1, 1, D)`): the newline vector `plora_sub_GN`.
    Returns:
        `list[torch.Tensor]`: one `(num_image_tokens(rows, cols, t), D)` sequence per image.
    """
    t, dim = merged.shape[1], merged.shape[-1]
    newline = sub_gn.to(device=merged.device, dtype=merged.dtype).view(1, 1, dim)
    separator = glb_gn.to(device=merged.device, dtype=merged.dtype).view(1, dim)
    sequences, start = [], 0
    for rows, cols in image_grids.tolist():
        global_view = merged[start]  # (t, t, D)
        crops = merged[start + 1 : start + 1 + rows * cols]  # (rows*cols, t, t, D)
        start += 1 + rows * cols
        local = crops.view(rows, cols, t, t, dim).permute(0, 2, 1, 3, 4)  # (rows, t, cols, t, D)
        local = local.reshape(rows * t, cols * t, dim)
        global_tokens = torch.cat([global_view, newline.expand(t, 1, dim)], dim=1).flatten(0, 1)
        local_tokens = torch.cat([local, newline.expand(rows * t, 1, dim)], dim=1).flatten(0, 1)
        sequences.append(torch.cat([global_tokens, separator, local_tokens]))
    if start != merged.shape[0]:
        raise ValueError(
            f"image_grids {image_grids.tolist()} account for {start} tiles but pixel_values holds "
            f"{merged.shape[0]}; pass the pixel_values and image_grids the image processor returned together."
        )
    return sequences
