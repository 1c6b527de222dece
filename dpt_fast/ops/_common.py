"""Conventions shared by the attention ops: default scale, common dtype, saved-lse dtype."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(dim: int) -> float:
    """The usual attention scale ``1 / sqrt(dim)`` (1 when dim is 0, where every score is 0)."""
    return 1.0 / math.sqrt(dim) if dim > 0 else 1.0


def to_common_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors cast to the one dtype a fused kernel runs in.

    Under autocast for their device: the autocast dtype, as ``torch.bmm`` would use (float64
    inputs are left alone, as autocast leaves them). Otherwise ``torch.promote_types`` of all
    (e.g. bfloat16 with float32 gives float32).
    """
    device_type = tensors[0].device.type
    dtypes = [t.dtype for t in tensors]
    if torch.is_autocast_enabled(device_type) and torch.float64 not in dtypes:
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = dtypes[0]
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
    return tuple(t.to(dtype) for t in tensors)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a saved log-sum-exp: float64 for float64 inputs (exact gradcheck), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
