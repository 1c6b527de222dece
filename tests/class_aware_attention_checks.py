"""Inputs, oracle comparison and tolerances shared by the class-aware attention tests.

Shapes: q (B, K, dk), k (B, M, dk), v (B, M, dv) -> (B, K, dv). The oracle is the op's reference
formula run in float64. float32/float64 results must match it within a per-dtype tolerance;
bfloat16/float16 results must be at most FACTOR times as far from it as PyTorch's own composition
in that dtype (the flash-attention criterion), plus one ulp of the result's magnitude.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dpt_fast.ops import _extension
from dpt_fast.ops.class_aware_attention import CLASS_AWARE_ATTENTION, class_aware_attention_ref

Shape = tuple[int, int, int, int, int]  # (B, K, M, dk, dv)

# Absolute tolerance (scaled by max(1, |reference|)) against the float64 oracle.
EXACT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
# Low precision: error <= FACTOR · PyTorch's own error + one ulp · max(1, |reference|).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

RESULT_NAMES = ("out", "grad_q", "grad_k", "grad_v")
DTYPES = CLASS_AWARE_ATTENTION.dtypes
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]

# The kernels of both devices run the same tests; CUDA parameters skip without a GPU.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def require_kernels(device: str) -> None:
    """Fails when a GPU machine runs a build without the CUDA kernels (needs ``extension``)."""
    if device == "cuda" and not _extension.cuda_kernels_available():
        pytest.fail("dpt_fast._C was built without CUDA kernels on a machine with a GPU")


def random_inputs(
    shape: Shape, dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, K, dk), k (B, M, dk), v (B, M, dv) and a grad_out (B, K, dv), all random normal."""
    batch, rows, keys, dk, dv = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device, dtype)

    return (
        rand(batch, rows, dk),
        rand(batch, keys, dk),
        rand(batch, keys, dv),
        rand(batch, rows, dv),
    )


def forward_backward(
    fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn on copies of q, k, v cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def assert_close_to_oracle(
    fn: Callable, shape: Shape, dtype: torch.dtype, device: str = "cpu"
) -> None:
    """Forward and gradients of fn in dtype against the float64 formula (see module doc)."""
    q, k, v, grad_out = random_inputs(shape, dtype, device)
    got = forward_backward(fn, q, k, v, grad_out, dtype)
    exact = forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float64)
    if dtype in LOW_PRECISION_ULP:
        pytorch = forward_backward(class_aware_attention_ref, q, k, v, grad_out, dtype)
    for index, name in enumerate(RESULT_NAMES):
        assert got[index].dtype == dtype, name
        assert got[index].shape == exact[index].shape, name
        assert not got[index].isnan().any(), f"{name} has NaN"
        error = (got[index].double() - exact[index]).abs().max().item()
        magnitude = max(1.0, exact[index].abs().max().item())
        if dtype in LOW_PRECISION_ULP:
            pytorch_error = (pytorch[index].double() - exact[index]).abs().max().item()
            bound = LOW_PRECISION_FACTOR * pytorch_error + LOW_PRECISION_ULP[dtype] * magnitude
        else:
            bound = EXACT_TOLERANCE[dtype] * magnitude
        assert error <= bound, f"{name}: error {error:.3g} > bound {bound:.3g} ({dtype})"
