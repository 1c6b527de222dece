"""open_clip's residual blocks, recognised by their structure.

open_clip has shipped two attention modules inside ``ResidualAttentionBlock``:

* ``nn.MultiheadAttention`` (open_clip ≤ 3.x). Its own ``batch_first`` flag is the layout the
  block runs in: sequence-first (N, B, W) in older releases, batch-first (B, N, W) since the
  transformers gained a ``batch_first`` switch.
* open_clip's own ``Attention`` (every block from 4.x on, the "custom" blocks of 3.x). It has
  the same parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) and
  ``num_heads``, no ``batch_first`` flag, and runs batch-first only. Optional features change
  its math: ``ln_q``/``ln_k`` (qk_norm), ``logit_scale`` (scaled cosine), ``head_scale``
  (scale_heads), ``ln_inner`` (inner norm); its block may add ``ln_attn`` (scale_attn).

The layout is read off the attention module itself, never off a transformer attribute that a
release may drop. :class:`BlockSpec` also lists the features the fast model does not decompose,
so that it can refuse them by name while the reference model (which calls the block as open_clip
does) runs them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

# An open_clip CLIP, tower, block or attention module. open_clip ships no type information, and
# nn.Module types every attribute read by name as ``Tensor | Module``; dpt_fast reads these
# modules by structure and checks that structure (``block_spec``, ``towers.clip_geometry``), so
# past the check their attributes are what open_clip builds: typed Any, in this one alias.
OpenClipModule: TypeAlias = Any

REFERENCE_HINT = "use dpt_fast.reference.DPT, which runs every open_clip block as open_clip does"


@dataclass(frozen=True)
class BlockSpec:
    """What one residual block is, read off its modules.

    kind: ``"multihead"`` (``nn.MultiheadAttention``) or ``"attention"`` (open_clip's own).
    batch_first: the layout ``block(x)`` expects, (B, N, W) if True else (N, B, W).
    heads, width: H and W; the head width is W / H.
    fast_blockers: the features the fast model cannot run, each named for the user; empty when
        the block decomposes into ln_1, packed q/k/v projection, softmax(q kᵀ/√D) v, out_proj,
        ls_1, ln_2, mlp, ls_2.
    """

    kind: Literal["multihead", "attention"]
    batch_first: bool
    heads: int
    width: int
    fast_blockers: tuple[str, ...]


def _is_identity(module: object) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _multihead_blockers(attn: nn.MultiheadAttention) -> list[str]:
    blockers = []
    if not attn._qkv_same_embed_dim:
        blockers.append("separate q/k/v projection weights (kdim/vdim differ from the width)")
    if attn.bias_k is not None or attn.bias_v is not None:
        blockers.append("learned key/value biases (add_bias_kv)")
    if attn.add_zero_attn:
        blockers.append("a zero attention slot (add_zero_attn)")
    return blockers


def _is_open_clip_attention(attn: OpenClipModule) -> bool:
    # Parameter names shared with nn.MultiheadAttention, plus num_heads; no batch_first flag.
    has_proj = hasattr(attn, "in_proj_weight") or hasattr(attn, "q_proj_weight")
    return (has_proj and isinstance(getattr(attn, "out_proj", None), nn.Linear)
            and isinstance(getattr(attn, "num_heads", None), int))


def _attention_blockers(block: OpenClipModule, attn: OpenClipModule, head_dim: int) -> list[str]:
    blockers = []
    if getattr(attn, "in_proj_weight", None) is None:
        blockers.append("separate q/k/v projection weights (kdim/vdim differ from the width)")
    if not all(_is_identity(getattr(attn, name, None)) for name in ("ln_q", "ln_k")):
        blockers.append("qk_norm (layer norm of queries and keys, ln_q/ln_k)")
    if getattr(attn, "logit_scale", None) is not None:
        blockers.append("scaled_cosine (cosine attention scaled by logit_scale)")
    if getattr(attn, "head_scale", None) is not None:
        blockers.append("scale_heads (per-head output scales, head_scale)")
    if not _is_identity(getattr(attn, "ln_inner", None)):
        blockers.append("inner_norm (ln_inner before the output projection)")
    if not _is_identity(getattr(block, "ln_attn", None)):
        blockers.append("scale_attn (ln_attn after the attention)")
    scale = getattr(attn, "scale", None)
    if scale is not None and not math.isclose(float(scale), head_dim ** -0.5, rel_tol=1e-12):
        blockers.append(f"an attention scale of {float(scale):g} instead of 1/sqrt({head_dim})")
    return blockers


def block_spec(block: OpenClipModule) -> BlockSpec:
    """Recognise one open_clip residual block by its structure.

    Raises:
        TypeError: the block has no ``attn`` module of either form, naming what it has.
    """
    attn = getattr(block, "attn", None)
    kind: Literal["multihead", "attention"]
    if isinstance(attn, nn.MultiheadAttention):
        kind, batch_first = "multihead", bool(attn.batch_first)
        heads, width = int(attn.num_heads), int(attn.embed_dim)
        blockers = _multihead_blockers(attn)
    elif attn is not None and _is_open_clip_attention(attn):
        kind, batch_first = "attention", True
        heads, width = int(attn.num_heads), int(attn.out_proj.in_features)
        blockers = _attention_blockers(block, attn, width // heads)
    else:
        raise TypeError(
            f"dpt_fast needs an open_clip CLIP with a ViT image tower: {type(block).__name__} "
            f"has no attention it recognises (.attn is {type(attn).__name__}; expected "
            "nn.MultiheadAttention or open_clip's Attention with in_proj_weight, out_proj "
            "and num_heads)"
        )
    if hasattr(block, "ln_1_kv"):
        blockers.append("cross-attention (ln_1_kv)")
    if not all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")):
        blockers.append("a block without open_clip's ln_1/ls_1/ln_2/mlp/ls_2 layout")
    return BlockSpec(kind, batch_first, heads, width, tuple(blockers))


def check_fast_block(block: OpenClipModule, where: str) -> BlockSpec:
    """The block's spec, or a TypeError naming the features the fast model cannot run."""
    spec = block_spec(block)
    if spec.fast_blockers:
        raise TypeError(
            f"{where} ({type(block).__name__}) uses {'; '.join(spec.fast_blockers)}, which the "
            f"fast DPT does not decompose: {REFERENCE_HINT}"
        )
    return spec


def block_batch_first(block: OpenClipModule) -> bool:
    """The layout of a block :func:`block_spec` recognises: True if it runs (B, N, W).

    The cheap part of :func:`block_spec`, for the forward passes (and for torch.compile to
    trace): ``nn.MultiheadAttention`` says it, open_clip's ``Attention`` is batch-first only.
    """
    attn = block.attn
    return bool(attn.batch_first) if isinstance(attn, nn.MultiheadAttention) else True


def run_block(block: OpenClipModule, x: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One residual block on batch-first tokens x: (B, N, W) -> (B, N, W), as open_clip calls it.

    The block runs in its own layout: sequence-first blocks get (N, B, W) and give it back.
    """
    if block_batch_first(block):
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
