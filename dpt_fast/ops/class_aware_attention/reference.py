"""The one written-out formula of class-aware attention, ``softmax(q kᵀ · scale) · v``.

It is the test oracle, the reference model's CAVPT attention, and (widened to float32) the
op's fallback when the extension has no kernel for the tensors' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops._common import default_scale


def class_aware_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None
) -> Tensor:
    """Plain PyTorch ``softmax(q kᵀ · scale) · v`` in the inputs' dtype.

    q (B, K, dk), k (B, M, dk), v (B, M, dv) -> (B, K, dv); scale defaults to ``1 / sqrt(dk)``.
    Run it on float64 copies for the exact answer, or on low-precision inputs for PyTorch's own
    rounding error.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v
