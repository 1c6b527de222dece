"""The towers of an open_clip CLIP, run piece by piece.

These helpers do exactly what open_clip's ``VisionTransformer.forward`` and ``CLIP.encode_text``
do, piece by piece, for the models DPT supports (a ViT image tower with CLS pooling, the CLIP
text tower with arg-max EOT pooling), and reject the others with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn

from dpt_fast.clip_interop.blocks import OpenClipModule, block_spec, run_block


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes read off a CLIP model. Names follow docs/DESIGN.md."""

    vision_layers: int  # L
    vision_width: int  # W
    vision_heads: int  # H
    embed_dim: int  # E, the joint image-text feature width
    image_size: tuple[int, int]  # (height, width) the patch embedding expects
    text_width: int  # width of the text transformer
    context_length: int  # text positions (77 for CLIP)
    vocab_size: int


def _fail(reason: str) -> NoReturn:
    raise TypeError(f"dpt_fast needs an open_clip CLIP with a ViT image tower: {reason}")


def clip_geometry(clip: OpenClipModule) -> ClipGeometry:
    """Check that ``clip`` is a model DPT supports and read its sizes.

    Every residual block of both towers must be one :func:`block_spec` recognises (either
    open_clip attention form); the layout each block runs in is read off it there.

    Raises:
        TypeError: naming what is missing or unsupported (ResNet image towers, attention
            pooling, Hugging Face text towers, non-argmax text pooling, unknown blocks).
    """
    visual = getattr(clip, "visual", None)
    if visual is None:
        _fail(f"{type(clip).__name__} has no .visual image tower")
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
                 "ln_post"):
        if not hasattr(visual, name):
            _fail(f"the image tower {type(visual).__name__} has no .{name} (ResNet or timm "
                  "towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        _fail("attention pooling in the image tower is not supported (CLS pooling only)")
    if getattr(visual, "pool_type", "tok") != "tok":
        _fail(f"image pooling {visual.pool_type!r} is not supported (CLS token pooling only)")
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(clip, name):
            _fail(f"the model has no text tower attribute .{name} (Hugging Face text towers "
                  "are not supported)")
    if getattr(clip, "text_pool_type", "argmax") != "argmax":
        _fail(f"text pooling {clip.text_pool_type!r} is not supported: DPT takes the EOT token "
              "by arg-max of the token ids")
    if getattr(clip, "attn_mask", None) is None:
        _fail("the text transformer has no causal attention mask")

    blocks = visual.transformer.resblocks
    specs = [block_spec(b) for b in blocks]
    for block in clip.transformer.resblocks:
        block_spec(block)
    image_size = visual.image_size if hasattr(visual, "image_size") else visual.input_resolution
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    proj = getattr(visual, "proj", None)
    width = visual.class_embedding.shape[-1]
    return ClipGeometry(
        vision_layers=len(blocks),
        vision_width=int(width),
        vision_heads=specs[0].heads,
        embed_dim=int(proj.shape[1]) if proj is not None else int(width),
        image_size=(int(image_size[0]), int(image_size[1])),
        text_width=int(clip.token_embedding.weight.shape[1]),
        context_length=int(clip.positional_embedding.shape[0]),
        vocab_size=int(clip.token_embedding.weight.shape[0]),
    )


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype activations take in a CLIP tower: the dtype of its conv/linear weights."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def vision_embed(visual: OpenClipModule, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + CLS + positions + ln_pre.

    images (B, 3, H, W) -> tokens (B, N, W) with N = 1 + patches. Patch dropout is not applied:
    the frozen CLIP always runs in eval mode.
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, W, gh, gw)
    x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, W)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def vision_head(visual: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
    """ln_post on the CLS token, then the projection: tokens (B, N, W) -> features (B, E).

    Takes CLS before ln_post: layer norm is per token, so this equals open_clip's order.
    """
    pooled = visual.ln_post(x[:, 0])
    proj = getattr(visual, "proj", None)
    if proj is not None:
        pooled = pooled @ proj
    return pooled


def text_head(clip: OpenClipModule, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """ln_final on the EOT tokens, then the text projection.

    x: (C, T, D) hidden states; eot_index: (C,) position of each row's EOT -> (C, E).
    """
    pooled = clip.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_index])
    proj = clip.text_projection
    if proj is None:
        return pooled
    if isinstance(proj, nn.Linear):
        return proj(pooled)
    return pooled @ proj


def text_transformer(clip: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
    """Causal text transformer on embedded prompts x: (C, T, D) -> (C, T, D)."""
    transformer = clip.transformer
    mask = clip.attn_mask[: x.shape[1], : x.shape[1]]
    for block in transformer.resblocks:
        x = run_block(block, x, attn_mask=mask)
    return x


def text_positions(clip: OpenClipModule, embeddings: torch.Tensor) -> torch.Tensor:
    """Add positional embeddings to token embeddings (C, T, D) -> (C, T, D)."""
    return embeddings + clip.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)


@torch.no_grad()
def encode_text_tokens(clip: OpenClipModule, token_ids: torch.Tensor) -> torch.Tensor:
    """Frozen text features of token id rows (C, T) -> (C, E), as ``clip.encode_text``."""
    dtype = clip.token_embedding.weight.dtype
    x = text_positions(clip, clip.token_embedding(token_ids).to(dtype))
    x = text_transformer(clip, x)
    return text_head(clip, x, token_ids.argmax(dim=-1))
