"""Launchers of the fused prompt attention Triton kernels; installed as ``dpt_fast.kernels``.

Every query row attends to the P prompt keys of its (batch, head) and to the Nk self keys (only
self keys ``j <= i`` when causal; prompt keys are always visible)::

    out = softmax(scale · q [k_prompt; k]ᵀ, masked) · [v_prompt; v]

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D); k_prompt, v_prompt (Bp, H, P, D) with Bp ∈ {1, B}
(Bp = 1 is read with batch stride 0, never expanded in memory) and P ≥ 0. The queries are the
first Nq positions, so with causal and Nq < Nk query i still sees self keys 0..i. Dtypes and
head dims: ``dpt_fast.ops.prompt_attention.capabilities.TRITON_KERNELS``.

``prompt_attention_fwd`` returns the output and the log-sum-exp, ``prompt_attention_bwd`` the
five gradients (deterministic: no atomics). CUDA tensors run the compiled kernels; CPU tensors
run them in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is
imported. The kernels: ``prompt_attention_forward.py`` and ``prompt_attention_backward.py``;
their launch configurations and ``fixed_blocks``: ``prompt_attention_autotune.py``. Importing
this module imports triton but never touches CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from torch import Tensor

from dpt_fast.ops.prompt_attention.capabilities import TRITON_KERNELS, check_shapes

from .prompt_attention_autotune import (
    INTERPRETED,
    SETTINGS,
    block_at_least,
    compile_only,
    fixed_blocks,
)
from .prompt_attention_backward import (
    backward_dkdv_kernel,
    backward_dq_kernel,
    backward_preprocess_kernel,
)
from .prompt_attention_forward import forward_kernel

__all__ = ["compile_only", "fixed_blocks", "prompt_attention_bwd", "prompt_attention_fwd"]

_LOG2E = 1.4426950408889634


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate (tests patch this to NaN-fill them, which catches
    elements no program writes)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """t itself when its rows are contiguous (strided views need no copy), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _strides3(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) tensor; batch stride 0 for a size-1 batch,
    so that one prompt (Bp = 1) is shared by every batch element without expanding it."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run exact ("ieee") unless torch allows TF32 matmuls (precision "high")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor) -> None:
    """The op's shape contract and the kernels' table; one dtype and device; a device that runs
    Triton here. Raises ValueError / RuntimeError naming the problem."""
    check_shapes(q, k, v, k_prompt, v_prompt)
    for name, t in (("k", k), ("v", v), ("k_prompt", k_prompt), ("v_prompt", v_prompt)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype} on {q.device}), "
                             f"got {t.dtype} on {t.device}")
    if q.device.type == "cpu" and not INTERPRETED and not SETTINGS["compile_only"]:
        raise RuntimeError(
            "the prompt_attention Triton kernels run on CPU tensors only in Triton's "
            "interpreter: set TRITON_INTERPRET=1 before anything imports triton, or pass CUDA "
            "tensors")
    if q.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the prompt_attention Triton kernels run on CUDA (or CPU through the "
                           f"interpreter), not on {q.device.type}")
    reason = TRITON_KERNELS.unsupported(q.dtype, q.shape[-1], interpreted=INTERPRETED)
    if reason is not None:
        raise ValueError(reason)


def _kernel_meta(q: Tensor, k: Tensor, k_prompt: Tensor, causal: bool) -> dict:
    """The shape and constexpr arguments common to every kernel."""
    dim = q.shape[3]
    return {
        "H": q.shape[1], "N_Q": q.shape[2], "N_K": k.shape[2], "N_P": k_prompt.shape[2],
        "HEAD_DIM": dim, "BLOCK_D": block_at_least(dim), "CAUSAL": bool(causal),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }


def _run(
    kernel: triton.JITFunction | triton.runtime.Autotuner,
    grid: tuple[int, int, int] | Callable[[dict], tuple[int, int, int]], args: tuple, meta: dict,
) -> None:
    """Launches a kernel, or under ``compile_only`` compiles it without launching (an autotuned
    kernel: every configuration its pruning keeps for these arguments)."""
    if SETTINGS["compile_only"]:
        kernel.warmup(*args, **meta, grid=grid)
    else:
        kernel[grid](*args, **meta)


def _launch(
    kernel: triton.runtime.Autotuner, grid_blocks: Callable[[int, int], int], batch: int,
    heads: int, args: tuple, meta: dict,
) -> None:
    """Launches an autotuned kernel, or its inner jit function with the fixed blocks.

    grid_blocks(BLOCK_M, BLOCK_N) -> the number of programs along grid axis 0.
    """
    fixed = SETTINGS["fixed_blocks"]
    if isinstance(fixed, tuple):  # (BLOCK_M, BLOCK_N), or None: autotune
        block_m, block_n = fixed
        fixed_grid = (grid_blocks(block_m, block_n), heads, batch)
        _run(kernel.fn, fixed_grid, args, {**meta, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                           "num_warps": 4})
        return

    def grid(cfg: dict) -> tuple[int, int, int]:
        return grid_blocks(cfg["BLOCK_M"], cfg["BLOCK_N"]), heads, batch

    _run(kernel, grid, args, meta)


def prompt_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward launcher.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); k_prompt, v_prompt: (Bp, H, P, D), Bp ∈ {1, B}.
            One dtype (fp16 / bf16 / fp32) and device; any strides (rows are copied only when
            the last dim is not contiguous).
        causal: self key j visible to query i only when j <= i.
        scale: score scale.

    Returns:
        out (B, H, Nq, D) contiguous in q's dtype, lse (B, H, Nq) fp32 natural log-sum-exp.
    """
    _check_inputs(q, k, v, k_prompt, v_prompt)
    q, k, v, k_prompt, v_prompt = map(_last_dim_contiguous, (q, k, v, k_prompt, v_prompt))
    batch, heads, n_q, dim = q.shape
    out = _empty((batch, heads, n_q, dim), q.dtype, q.device)
    lse = _empty((batch, heads, n_q), torch.float32, q.device)
    if n_q == 0 or batch * heads == 0:
        return out, lse
    meta = _kernel_meta(q, k, k_prompt, causal)
    meta["qk_scale"] = scale * _LOG2E
    if k_prompt.shape[2] == 0:
        # Never read (no prompt blocks), but keeps an empty tensor's pointer out of the kernel.
        k_prompt, v_prompt = k, v
    args = (
        q, k, v, k_prompt, v_prompt, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(k_prompt), *_strides3(v_prompt),
        *_strides3(out),
    )
    _launch(forward_kernel, lambda bm, bn: triton.cdiv(n_q, bm), batch, heads, args, meta)
    return out, lse


def prompt_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward launcher (deterministic: no atomics, fixed reduction order).

    Args:
        do: (B, H, Nq, D) gradient of out, any strides.
        q, k, v, k_prompt, v_prompt, causal, scale: as given to ``prompt_attention_fwd``.
        out: (B, H, Nq, D) and lse: (B, H, Nq) fp32, as it returned.

    Returns:
        dq (B, H, Nq, D), dk and dv (B, H, Nk, D), dk_prompt and dv_prompt (Bp, H, P, D), each
        contiguous in its input's dtype. With Bp = 1 the prompt gradients are summed over the
        batch in fp32 before the cast.
    """
    _check_inputs(q, k, v, k_prompt, v_prompt)
    do, q, k, v, k_prompt, v_prompt = map(
        _last_dim_contiguous, (do, q, k, v, k_prompt, v_prompt))
    out, lse = out.contiguous(), lse.contiguous()
    batch, heads, n_q, dim = q.shape
    n_p = k_prompt.shape[2]
    shared_prompt = k_prompt.shape[0] == 1 and batch > 1
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    # Per-batch prompt gradients; fp32 when they will be summed over the batch.
    part_dtype = torch.float32 if shared_prompt else k_prompt.dtype
    dkp = _empty((batch, heads, n_p, dim), part_dtype, q.device)
    dvp = _empty((batch, heads, n_p, dim), part_dtype, q.device)
    if batch * heads > 0 and n_q > 0:
        _launch_bwd(do, q, k, v, k_prompt, v_prompt, out, lse, dq, dk, dv, dkp, dvp, causal,
                    scale)
    elif batch * heads > 0:
        # No queries: every gradient is zero.
        for t in (dk, dv, dkp, dvp):
            t.zero_()
    if shared_prompt:
        # torch's reductions are deterministic (no atomics).
        dkp = dkp.sum(0, keepdim=True).to(k_prompt.dtype)
        dvp = dvp.sum(0, keepdim=True).to(v_prompt.dtype)
    return dq, dk, dv, dkp, dvp


def _launch_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, dkp: Tensor, dvp: Tensor,
    causal: bool, scale: float,
) -> None:
    """Runs the three backward kernels into the preallocated gradients."""
    batch, heads, n_q, dim = q.shape
    n_k, n_p = k.shape[2], k_prompt.shape[2]
    meta = _kernel_meta(q, k, k_prompt, causal)
    delta = _empty(lse.shape, torch.float32, lse.device)
    # 64 rows, or fewer when there are fewer queries (the CLS query alone: a 64-row block is
    # 63 masked rows, and in fp32 at head dim 128 ptxas spills for it).
    pre_block = min(64, block_at_least(n_q))
    _run(backward_preprocess_kernel, (triton.cdiv(n_q, pre_block), heads, batch),
         (out, do, delta, *_strides3(out), *_strides3(do), heads, n_q),
         {"HEAD_DIM": dim, "BLOCK_D": meta["BLOCK_D"], "BLOCK_M": pre_block})
    if n_p == 0:
        # Never read or written (no prompt blocks): real pointers in place of empty tensors.
        k_prompt, v_prompt, dkp, dvp = k, v, dk, dv
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(k_prompt),
               *_strides3(v_prompt), *_strides3(do))
    meta.update(qk_scale=scale * _LOG2E, sm_scale=scale)
    _launch(
        backward_dkdv_kernel, lambda bm, bn: triton.cdiv(n_k, bn) + triton.cdiv(n_p, bn),
        batch, heads,
        (q, k, v, k_prompt, v_prompt, do, lse, delta, dk, dv, dkp, dvp, *strides), meta,
    )
    _launch(
        backward_dq_kernel, lambda bm, bn: triton.cdiv(n_q, bm), batch, heads,
        (q, k, v, k_prompt, v_prompt, do, lse, delta, dq, *strides), meta,
    )
