"""An open_clip residual block taken apart, so prompts can enter as keys and values only.

A prompt token appended before a block and dropped after it changes the other tokens only
through its key and value in the attention (its query, attention output and MLP output are
discarded). :class:`BlockParts` exposes the pieces that make this exact shortcut possible:
q/k/v projections of any token subset, the output projection + residual, and the MLP.

Both open_clip attention forms (``nn.MultiheadAttention`` and open_clip's own ``Attention``) hold
the same ``in_proj_weight``/``in_proj_bias``/``out_proj`` parameters; which blocks qualify is
decided in :mod:`dpt_fast.clip_interop`, never here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpt_fast.clip_interop import BlockSpec, OpenClipModule, check_fast_block
from dpt_fast.ops import prompt_attention


def fast_blocks(transformer: OpenClipModule, tower: str) -> list[BlockParts]:
    """The decomposed blocks of an open_clip transformer, refused with a reason if unsupported."""
    return [BlockParts(block, check_fast_block(block, f"{tower} block {i}"))
            for i, block in enumerate(transformer.resblocks)]


class BlockParts:
    """Pieces of one residual block on batch-first tokens; H heads of width D = W / H."""

    def __init__(self, block: OpenClipModule, spec: BlockSpec) -> None:
        self.block = block
        self.heads = spec.heads
        self.width = spec.width
        self.head_dim = self.width // self.heads

    def _project(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        attn = self.block.attn
        bias = attn.in_proj_bias[rows] if attn.in_proj_bias is not None else None
        return F.linear(h, attn.in_proj_weight[rows], bias)

    def _heads(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """(B, N, n·W) -> n tensors (B, H, N, D), views of one projection."""
        b, length = t.shape[:2]
        t = t.view(b, length, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return t.unbind(0) if n > 1 else (t[0],)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.ln_1(x)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed tokens (B, N, W) -> q, k, v each (B, H, N, D)."""
        q, k, v = self._heads(self._project(h, slice(None)), 3)
        return q, k, v

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed tokens (B, N, W) -> k, v each (B, H, N, D), without computing queries."""
        k, v = self._heads(self._project(h, slice(self.width, None)), 2)
        return k, v

    def q(self, h: torch.Tensor) -> torch.Tensor:
        """Normed tokens (B, N, W) -> q (B, H, N, D)."""
        (q,) = self._heads(self._project(h, slice(0, self.width)), 1)
        return q

    def prompt_kv(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens (Bp, P, W) -> their keys and values (Bp, H, P, D)."""
        return self.kv(self.norm(prompts))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual + output projection, then the MLP half of the block.

        x: (B, Nq, W) the block's input at the query positions; attn_out: (B, H, Nq, D).
        """
        b, _, n, _ = attn_out.shape
        out = attn_out.transpose(1, 2).reshape(b, n, self.width)
        block = self.block
        x = x + block.ls_1(block.attn.out_proj(out))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def forward(self, x: torch.Tensor, prompt_k: torch.Tensor | None = None,
                prompt_v: torch.Tensor | None = None, *, causal: bool = False,
                queries: int | None = None) -> torch.Tensor:
        """The block on x (B, N, W), with optional prompt keys/values (Bp, H, P, D).

        ``queries=n`` computes the output of the first n tokens only (the others still serve
        as keys and values): (B, n, W). Otherwise (B, N, W).
        """
        h = self.norm(x)
        if queries is None:
            q, k, v = self.qkv(h)
            x_q = x
        else:
            k, v = self.kv(h)
            q = self.q(h[:, :queries])
            x_q = x[:, :queries]
        if prompt_k is None or prompt_v is None:  # no prompts: an empty set of prompt keys
            prompt_k = prompt_v = k.new_empty(1, self.heads, 0, self.head_dim)
        out = prompt_attention(q, k, v, prompt_k, prompt_v, causal=causal)
        return self.finish(x_q, out)
