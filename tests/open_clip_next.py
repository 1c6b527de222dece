"""Blocks built to the structure of open_clip's next release (4.x), for tests.

open_clip 4.x replaces ``nn.MultiheadAttention`` in ``ResidualAttentionBlock`` by its own
``Attention`` module: the same ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` parameters and
``num_heads``, batch-first only, optional qk_norm (``ln_q``/``ln_k``), scaled cosine attention
(``logit_scale``), per-head output scales (``head_scale``) and an inner norm (``ln_inner``); its
``Transformer`` has no ``batch_first`` attribute any more. That release is not on the registry, so
these classes are written here to that structure (attribute names and math), and
:func:`next_clip` swaps them into a tiny open_clip 3.x CLIP, weights copied.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dpt_fast.testing import tiny_clip

FEATURES = ("qk_norm", "scaled_cosine", "scale_heads", "inner_norm", "scale_attn")


class NextAttention(nn.Module):
    """Multi-head attention on batch-first tokens (B, N, W), open_clip 4.x's parameter names."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = False,
                 scaled_cosine: bool = False, scale_heads: bool = False,
                 inner_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.ln_q = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = (nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
                            if scaled_cosine else None)
        self.logit_scale_max = math.log(100.0)
        self.head_scale = nn.Parameter(torch.ones(num_heads, 1, 1)) if scale_heads else None
        self.ln_inner = nn.LayerNorm(dim) if inner_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.out_proj = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(0.0)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape  # (B, N, W) -> (B, H, N, D)
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, width = x.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split(F.linear(x, w_q, b_q))
        k = self._split(F.linear(x if k_x is None else k_x, w_k, b_k))
        v = self._split(F.linear(x if v_x is None else v_x, w_v, b_v))
        if self.logit_scale is not None:
            gain = self.logit_scale.clamp(max=self.logit_scale_max).exp()
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * gain
        else:
            scores = (self.ln_q(q) * self.scale) @ self.ln_k(k).transpose(-1, -2)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.to(scores.dtype)
        out = self.attn_drop(scores.softmax(dim=-1)) @ v  # (B, H, N, D)
        if self.head_scale is not None:
            out = out * self.head_scale
        out = self.ln_inner(out.transpose(1, 2).reshape(b, n, width))
        return self.out_drop(self.out_proj(out))


class NextBlock(nn.Module):
    """A residual block around :class:`NextAttention`, called as open_clip 4.x calls it."""

    def __init__(self, old: nn.Module, *, scale_attn: bool = False, **features: bool) -> None:
        super().__init__()
        width, heads = old.attn.embed_dim, old.attn.num_heads
        self.ln_1 = old.ln_1
        self.attn = NextAttention(width, heads, **features)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(old.attn.in_proj_weight)
            self.attn.in_proj_bias.copy_(old.attn.in_proj_bias)
            self.attn.out_proj.weight.copy_(old.attn.out_proj.weight)
            self.attn.out_proj.bias.copy_(old.attn.out_proj.bias)
        if scale_attn:
            self.ln_attn = nn.LayerNorm(width)
        self.ls_1, self.ln_2, self.mlp, self.ls_2 = old.ls_1, old.ln_2, old.mlp, old.ls_2

    def attention(self, q_x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # 4.x hands the normed tokens in as queries, keys and values alike.
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x=q_x, v_x=q_x, attn_mask=mask)

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attention(self.ln_1(q_x), attn_mask=attn_mask)
        if hasattr(self, "ln_attn"):
            out = self.ln_attn(out)
        x = q_x + self.ls_1(out)
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class NextTransformer(nn.Module):
    """open_clip 4.x's Transformer: batch-first blocks, no ``batch_first`` attribute."""

    def __init__(self, old: nn.Module, **features: bool) -> None:
        super().__init__()
        self.width, self.layers = old.width, old.layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(NextBlock(b, **features) for b in old.resblocks)

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def next_clip(*, towers: tuple[str, ...] = ("vision", "text"), seed: int = 0,
              **features: bool) -> nn.Module:
    """The default tiny CLIP with the given towers' blocks rebuilt in the 4.x form.

    ``features`` (names in :data:`FEATURES`) switch the optional parts on, with random values for
    their parameters so that ignoring one changes the numbers.
    """
    clip = copy.deepcopy(tiny_clip(seed=seed))
    if "vision" in towers:
        clip.visual.transformer = NextTransformer(clip.visual.transformer, **features)
    if "text" in towers:
        clip.transformer = NextTransformer(clip.transformer, **features)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in clip.named_parameters():
            if any(part in name for part in ("ln_q", "ln_k", "logit_scale", "head_scale",
                                             "ln_inner", "ln_attn")) and "attn" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return clip.requires_grad_(False).eval()


def sequence_first_clip(seed: int = 0) -> nn.Module:
    """The tiny CLIP laid out as open_clip < 2.24 ran it: sequence-first (N, B, W) blocks."""
    clip = copy.deepcopy(tiny_clip(seed=seed))
    for transformer in (clip.visual.transformer, clip.transformer):
        transformer.batch_first = False  # open_clip 3.x's switch: (B, N, W) -> (N, B, W) inside
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return clip.eval()
