"""Small CLIPs with random weights, for tests, benchmarks and examples without downloads."""

from __future__ import annotations

import open_clip

from dpt_fast.seeding import random_weights


def tiny_clip(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 3,
    vision_width: int = 64,
    vision_head_width: int = 16,
    text_layers: int = 2,
    text_width: int = 32,
    text_heads: int = 2,
    embed_dim: int = 24,
    quick_gelu: bool = True,
    seed: int = 0,
) -> open_clip.CLIP:
    """An open_clip ``CLIP`` with a ViT image tower, CLIP's vocabulary and random weights.

    The default is small enough for float64 gradcheck; QuickGELU as in OpenAI's weights.
    """
    with random_weights(seed):
        model = open_clip.CLIP(
            embed_dim=embed_dim,
            vision_cfg=open_clip.CLIPVisionCfg(
                layers=vision_layers, width=vision_width, head_width=vision_head_width,
                patch_size=patch_size, image_size=image_size,
            ),
            text_cfg=open_clip.CLIPTextCfg(
                context_length=77, vocab_size=49408, width=text_width, heads=text_heads,
                layers=text_layers,
            ),
            quick_gelu=quick_gelu,
        )
    return model.eval()


def vit_b16_clip(seed: int = 0) -> open_clip.CLIP:
    """open_clip's ViT-B-16 architecture (OpenAI's: QuickGELU) with random weights."""
    with random_weights(seed):
        model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    return model.eval()
