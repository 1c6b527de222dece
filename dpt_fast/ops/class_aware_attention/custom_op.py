"""Registrations on the C++ ops ``torch.ops.dpt_fast.class_aware_attention`` / ``_backward``.

The schemas and the CPU/CUDA kernels come from ``dpt_fast._C`` (``csrc/``); this module adds the
fake implementations (shapes for ``torch.compile`` and meta tensors) and the autograd formula,
once, when the extension is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpt_fast.ops import _extension
from dpt_fast.ops._common import lse_dtype

FORWARD_OP = "dpt_fast::class_aware_attention"
BACKWARD_OP = "dpt_fast::class_aware_attention_backward"


def _forward_fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Shapes of the forward op's results: out (B, K, dv) in q's dtype, lse (B, K)."""
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "q, k, v must be 3-D")
    batch, rows = q.shape[0], q.shape[1]
    out = q.new_empty((batch, rows, v.shape[2]))
    lse = q.new_empty((batch, rows), dtype=lse_dtype(q.dtype))
    return out, lse


def _backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of the backward op's results: contiguous gradients shaped like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale = inputs
    out, lse = output
    # lse is a by-product saved for backward; no gradient flows through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _autograd_backward(ctx: Any, grad_out: Tensor,
                       grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.dpt_fast.class_aware_attention_backward(
        grad_out.to(out.dtype), q, k, v, out, lse, ctx.scale
    )
    return grad_q, grad_k, grad_v, None


def _register() -> None:
    """Attaches the fake kernels and the autograd formula to the C++ ops."""
    torch.library.register_fake(FORWARD_OP)(_forward_fake)
    torch.library.register_fake(BACKWARD_OP)(_backward_fake)
    torch.library.register_autograd(FORWARD_OP, _autograd_backward, setup_context=_setup_context)


if _extension.extension_available():
    _register()
