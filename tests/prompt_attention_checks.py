"""Inputs, oracle comparison, tolerances and fixtures shared by the prompt attention tests.

Oracle: ``prompt_attention_ref`` in float64 on the same (rounded) inputs. fp32 errors are bounded
relative to the reference's magnitude (docs/DESIGN.md, testing rules); fp16 / bf16 errors
relative to the error of PyTorch's own SDPA path in the same precision (×2 outputs, ×3
gradients), with a floor of a fraction of an ulp of the reference's magnitude.

The Triton kernels run on CUDA tensors compiled, and on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (``tests/conftest.py`` does so on
machines without a GPU); ``require_triton(device)`` skips with the reason where they cannot.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the op's own tests run without triton; the kernels' tests skip
    triton = tl = None

from dpt_fast.ops.prompt_attention import (
    TRITON_KERNELS,
    prompt_attention,
    prompt_attention_ref,
    prompt_attention_torch,
)

# (B, H, Nq, Nk, P, D, causal): tails everywhere (N, P not multiples of the blocks), P = 0,
# CLS-only queries (Nq = 1), causal with Nq < Nk, every head dim of ViT and text towers.
GRID = [
    (2, 2, 7, 7, 3, 32, False),
    (1, 3, 1, 13, 10, 64, False),
    (2, 1, 17, 17, 0, 32, False),
    (3, 2, 20, 20, 17, 32, True),
    (2, 2, 9, 9, 1, 128, False),
    (2, 2, 5, 12, 4, 32, True),
]
GRID_IDS = ["B{}H{}q{}k{}p{}d{}{}".format(*s[:6], "c" if s[6] else "") for s in GRID]
PROMPT_BATCH = {"shared": lambda b: 1, "per_batch": lambda b: b}

# Error bounds (max abs error): fractions of max(1, max|reference|) in fp32; in low precision,
# multiples of the SDPA path's own error plus a floor in ulps of max|reference| (for when SDPA
# happens to be exact).
FP32_REL_TOL = {"out": 1e-5, "grad": 1e-4}
LOW_PRECISION_FACTOR = {"out": 2.0, "grad": 3.0}
LOW_PRECISION_FLOOR_ULPS = 0.5
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# The kernels' tests run on both devices; CUDA parameters skip without a GPU.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
# dtypes each device runs the kernels in: the table's (the interpreter has no bfloat16).
KERNEL_DTYPES = {"cpu": TRITON_KERNELS.interpreter_dtypes, "cuda": TRITON_KERNELS.dtypes}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Case:
    """Leaf tensors (what gradients are taken of) and how to view them as (q, k, v, kp, vp)."""

    leaves: list[Tensor]
    views: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    causal: bool
    out_shape: tuple[int, ...]

    def to(self, dtype: torch.dtype) -> Case:
        return Case([x.to(dtype) for x in self.leaves], self.views, self.causal, self.out_shape)


def make_case(
    shape: tuple, prompt_batch: int | None = None, *, fused: bool = False, device: str = "cpu"
) -> Case:
    """Random non-zero inputs for shape (B, H, Nq, Nk, P, D, causal).

    fused=True slices q, k, v out of one (B, N, 3, H, D) projection and the prompts out of one
    (Bp, P, 2, H, D) tensor, as a fused qkv linear layer would: strided, non-contiguous views.
    """
    b, h, n_q, n_k, p, d, causal = shape
    bp = b if prompt_batch is None else prompt_batch

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, device=device)

    if not fused:
        leaves = [randn(b, h, n_q, d), randn(b, h, n_k, d), randn(b, h, n_k, d),
                  randn(bp, h, p, d), randn(bp, h, p, d)]
        return Case(leaves, tuple, causal, (b, h, n_q, d))
    assert n_q <= n_k

    def views(leaves: Sequence[Tensor]) -> tuple[Tensor, ...]:
        qkv, kvp = leaves
        return (qkv[:, :n_q, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2),
                qkv[:, :, 2].transpose(1, 2), kvp[:, :, 0].transpose(1, 2),
                kvp[:, :, 1].transpose(1, 2))

    return Case([randn(b, n_k, 3, h, d), randn(bp, p, 2, h, d)], views, causal, (b, h, n_q, d))


def run(attn: Callable[..., Tensor], case: Case, grad_out: Tensor) -> tuple[Tensor, list[Tensor]]:
    """attn's output and the gradients of the case's leaves for the given output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in case.leaves]
    out = attn(*case.views(leaves), causal=case.causal)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def grad_out_for(case: Case) -> Tensor:
    return torch.randn(case.out_shape, device=case.leaves[0].device)


# --- error checks -------------------------------------------------------------------------------


def _max_err(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def _scale(ref: Tensor) -> float:
    return ref.abs().max().item() if ref.numel() else 0.0


def assert_all_written(out: Tensor, grads: list[Tensor]) -> None:
    """No NaN/inf: with NaN-poisoned buffers this catches elements no program wrote."""
    for name, t in [("out", out)] + [(f"grad {i}", g) for i, g in enumerate(grads)]:
        assert torch.isfinite(t).all(), f"{name} has non-finite elements"


def check_against_ref(case: Case, dtype: torch.dtype) -> None:
    """prompt_attention (whatever backend is selected) vs the float64 reference."""
    low = case.to(dtype)
    grad_out = grad_out_for(case).to(dtype)
    ref_out, ref_grads = run(prompt_attention_ref, low.to(torch.float64), grad_out.double())
    out, grads = run(prompt_attention, low, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]
    assert_all_written(out, grads)
    pairs = [("out", "out", out, ref_out)] + [
        ("grad", f"grad {i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))]
    if dtype == torch.float32:
        for kind, name, got, ref in pairs:
            bound = FP32_REL_TOL[kind] * max(_scale(ref), 1.0)
            assert _max_err(got, ref) <= bound, f"{name}: {_max_err(got, ref):.3g} > {bound:.3g}"
        return
    sdpa_out, sdpa_grads = run(prompt_attention_torch, low, grad_out)
    baseline = [sdpa_out, *sdpa_grads]
    for (kind, name, got, ref), sdpa in zip(pairs, baseline, strict=True):
        floor = LOW_PRECISION_FLOOR_ULPS * ULP[dtype] * _scale(ref)
        bound = LOW_PRECISION_FACTOR[kind] * _max_err(sdpa, ref) + floor
        assert _max_err(got, ref) <= bound, (
            f"{name}: {_max_err(got, ref):.3g} > {bound:.3g} (SDPA {_max_err(sdpa, ref):.3g})")


def assert_deterministic(case: Case) -> None:
    grad_out = grad_out_for(case)
    out_a, grads_a = run(prompt_attention, case, grad_out)
    out_b, grads_b = run(prompt_attention, case, grad_out)
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


# --- where the Triton kernels can run -----------------------------------------------------------


def _probe_kernel(X, n):
    for i in range(0, n, 1):
        tl.store(X + i, i)


@functools.cache
def _cpu_kernel_problem() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors in this process, or None."""
    if triton is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton compiles in this process (TRITON_INTERPRET=1 was not set before triton "
                "was imported), so CPU tensors cannot run the kernels")
    # triton 3.6's interpreter turns a runtime loop bound into an int with ``int(array)``, which
    # NumPy >= 2.4 rejects for 1-element arrays (3.8 squeezes first): every kernel loop fails.
    x = torch.zeros(2, dtype=torch.int32)
    try:
        triton.jit(_probe_kernel)[(1,)](x, 2)
    except Exception as e:
        return f"triton {triton.__version__}'s interpreter cannot run loops here: {e}"
    return None


def require_triton(device: str) -> None:
    """Skips (with the reason) where the Triton kernels cannot run on this device's tensors."""
    if device == "cpu" and (problem := _cpu_kernel_problem()) is not None:
        pytest.skip(problem)
    if device == "cuda" and triton is None:
        pytest.fail("triton is not installed on a machine with a GPU")


def kernels() -> ModuleType:
    """``dpt_fast.kernels.prompt_attention``; skips the test where triton is not installed."""
    if triton is None:
        pytest.skip("triton is not installed")
    from dpt_fast.kernels import prompt_attention

    return prompt_attention
