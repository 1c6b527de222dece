"""Triton kernels of the fused prompt attention (shared/DESIGN.md §3).

Every query row attends to the P prompt keys of its (batch, head) and to the Nk self keys (only
self keys ``j <= i`` when causal; prompt keys are always visible)::

    out = softmax(scale · q [k_prompt; k]ᵀ, masked) · [v_prompt; v]

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D); k_prompt, v_prompt (Bp, H, P, D) with Bp ∈ {1, B}
(Bp = 1 is read with batch stride 0, never expanded in memory) and P ≥ 0. The queries are the
first Nq positions, so with causal and Nq < Nk query i still sees self keys 0..i. The prompt and
self keys are never concatenated: each kernel walks the prompt keys and then the self keys as
two block loops over two pointers.

Kernels (FlashAttention-2 style, fp32 accumulation in registers, exp2 with log2(e) folded into
the score scale):

* ``_fwd_kernel``: one program per (q-block, h, b); online softmax; writes out and the natural
  log-sum-exp ``lse`` (fp32, (B, H, Nq)) saved for backward.
* ``_bwd_preprocess_kernel``: ``delta = rowsum(dO ∘ O)`` (fp32, (B, H, Nq)).
* ``_bwd_dkdv_kernel``: one program per (kv-block, h, b) over the self blocks followed by the
  prompt blocks; each accumulates its dK/dV over all query blocks in registers and stores them
  once. Prompt blocks go to a (B, H, P, D) buffer (fp32 when Bp = 1; the launcher sums it over
  the batch with torch).
* ``_bwd_dq_kernel``: one program per (q-block, h, b) accumulating dQ over prompt + self blocks.

Determinism: no atomics anywhere; every output element is written by exactly one program and
every reduction runs in a fixed order, so results are bitwise identical across runs.

Launchers: ``prompt_attention_fwd`` and ``prompt_attention_bwd``. CUDA tensors run the compiled
kernels; CPU tensors run a private copy of this module loaded with ``TRITON_INTERPRET=1``
(Triton decides interpret vs compile when ``@triton.jit`` runs, i.e. at import, so a copy is
the only way to have both in one process). Importing this module never touches CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
import triton.language as tl
from torch import Tensor

# Decided once, when the @triton.jit decorators below run.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = 1.4426950408889634  # the kernels spell it out: jit code reads no plain globals

# Launch settings, one object shared with the interpreted copy of this module.
# "fixed_blocks": (BLOCK_M, BLOCK_N) forced by `fixed_blocks`, bypassing the autotuner; or None.
_SETTINGS: dict[str, tuple[int, int] | None] = {"fixed_blocks": None}


# --- autotuning: candidate configs and their pruning ------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """One autotuning candidate and where it applies.

    max_dim and fp32 come from compiling every candidate for sm_90 and reading ptxas' register
    and stack use: beyond max_dim the candidate spills registers; fp32 inputs (exact IEEE dots)
    need far more registers than fp16 / bf16, so only small tiles take them.
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    max_dim: int = 128
    fp32: bool = False

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
                             num_warps=self.warps, num_stages=self.stages)


# The interpreter runs numpy per block: one small candidate, so the autotuner never benchmarks.
_INTERPRETER_SPECS = [_Spec(16, 16, 1, 1, 256, True)]

# Forward: BLOCK_M queries per program, BLOCK_N keys per loop step.
_FWD_SPECS = [
    _Spec(128, 64, 8, 3), _Spec(128, 32, 8, 3), _Spec(64, 64, 4, 3, 64), _Spec(64, 32, 4, 3),
    _Spec(32, 64, 4, 2), _Spec(16, 64, 4, 2, 64, fp32=True), _Spec(32, 32, 4, 2, 64, fp32=True),
    _Spec(16, 64, 8, 2, fp32=True),
]
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per loop step.
_DKDV_SPECS = [
    _Spec(32, 128, 8, 2, 64), _Spec(16, 128, 8, 2, 64), _Spec(64, 64, 8, 2, 64),
    _Spec(32, 64, 8, 2, 64), _Spec(32, 64, 4, 2, 64), _Spec(16, 64, 8, 2, fp32=True),
    _Spec(16, 32, 4, 2, 64, fp32=True),
]
# dQ: BLOCK_M queries per program, BLOCK_N keys per loop step.
_DQ_SPECS = [
    _Spec(128, 32, 8, 2, 64), _Spec(64, 32, 4, 2), _Spec(128, 64, 8, 2, 64),
    _Spec(64, 64, 8, 2, 64), _Spec(32, 64, 4, 2), _Spec(16, 64, 4, 2, 64, fp32=True),
    _Spec(32, 32, 4, 2, 64, fp32=True), _Spec(16, 64, 8, 2, fp32=True),
    _Spec(32, 32, 8, 2, fp32=True),
]


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _tile(config: triton.Config) -> tuple[int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


def _autotune_args(specs: list[_Spec], interpreted: bool = _INTERPRETED) -> dict:
    """triton.autotune's configs and pruning for these candidates (one in the interpreter)."""
    specs = _INTERPRETER_SPECS if interpreted else specs
    by_config = {(s.block_m, s.block_n, s.warps, s.stages): s for s in specs}

    def spec_of(config: triton.Config) -> _Spec:
        return by_config[(*_tile(config), config.num_warps, config.num_stages)]

    def prune(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
        """Keeps the candidates that fit the head dim and dtype without spilling and whose
        blocks do not overshoot the sequence (small N, e.g. Nq = 1 for CLS-only queries).

        The autotuner passes the positional arguments as nargs and the keyword ones (where
        the launchers put the shapes) as kwargs.
        """
        args = {**nargs, **kwargs}
        is_fp32 = args["Q"].dtype == torch.float32
        fitting = [
            c for c in configs
            if spec_of(c).max_dim >= args["HEAD_DIM"] and (spec_of(c).fp32 or not is_fp32)
        ] or [min(configs, key=_tile)]
        max_m = _pow2_at_least_16(args["N_Q"])
        max_n = _pow2_at_least_16(max(args["N_K"], args["N_P"]))
        small = [c for c in fitting if _tile(c)[0] <= max_m and _tile(c)[1] <= max_n]
        # When every candidate overshoots: the smallest query block, then the smallest key block.
        return small or [min(fitting, key=_tile)]

    return {
        "configs": [s.config() for s in specs],
        "key": ["N_Q", "N_K", "N_P", "HEAD_DIM", "CAUSAL"],
        "prune_configs_by": {"early_config_prune": prune},
    }




@contextlib.contextmanager
def fixed_blocks(block_m: int, block_n: int) -> Iterator[None]:
    """Within the block, launch with these block sizes (4 warps) instead of autotuning.

    For tests (exercising block shapes the autotuner would not pick, keeping GPU compile time
    down) and debugging. Both sizes must be powers of two ≥ 16.
    """
    for b in (block_m, block_n):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {block_m}, {block_n}")
    previous = _SETTINGS["fixed_blocks"]
    _SETTINGS["fixed_blocks"] = (block_m, block_n)
    try:
        yield
    finally:
        _SETTINGS["fixed_blocks"] = previous


# --- reductions --------------------------------------------------------------------------------
# The kernels call only builtins of triton.language plus these two reductions, never its @jit
# library functions (tl.zeros, tl.max, tl.sum, tl.cdiv): those are compiled-or-interpreted by
# the TRITON_INTERPRET value at `import triton`, so the interpreted copy of this module could not
# call them when triton was imported without it. tl.reduce with the library's own combine
# functions is exactly what tl.max / tl.sum run, and the interpreter maps them onto numpy.
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine


@triton.jit
def _row_max(x):
    """(M, N) fp32 -> (M,) row maxima."""
    return tl.reduce(x, 1, _MAX_COMBINE)


@triton.jit
def _row_sum(x):
    """(M, N) fp32 -> (M,) row sums."""
    return tl.reduce(x, 1, _SUM_COMBINE)


# --- forward -----------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    K,  # (n_keys, D) keys of this (b, h): prompt or self; row stride stride_kn
    V,  # (n_keys, D) values of this (b, h); row stride stride_vn
    stride_kn, stride_vn, n_keys, hi, offs_m, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [0, hi) of one key source."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        # kᵀ (D, BLOCK_N) loaded transposed straight from memory.
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        # m_i starts finite, so a fully masked block gives p = 0 and alpha = 1, never NaN.
        m_new = tl.maximum(m_i, _row_max(s))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + _row_sum(p)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_autotune_args(_FWD_SPECS))
@triton.jit
def _fwd_kernel(
    Q,  # (B, H, Nq, D) queries, last dim contiguous
    K,  # (B, H, Nk, D) self keys, last dim contiguous
    V,  # (B, H, Nk, D) self values, last dim contiguous
    KP,  # (Bp, H, P, D) prompt keys; batch stride 0 when Bp = 1
    VP,  # (Bp, H, P, D) prompt values; batch stride 0 when Bp = 1
    Out,  # (B, H, Nq, D) output, written here
    Lse,  # (B, H, Nq) fp32 contiguous natural log-sum-exp, written here
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_ob, stride_oh, stride_on,
    H, N_Q, N_K, N_P,
    qk_scale,  # scale · log2(e): scores in the exp2 domain
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    # Prompt keys: always visible.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q,
        KP + off_b * stride_kpb + off_h * stride_kph, VP + off_b * stride_vpb + off_h * stride_vph,
        stride_kpn, stride_vpn, N_P, N_P, offs_m, offs_d, qk_scale,
        HEAD_DIM, False, DOT_PRECISION, BLOCK_N,
    )
    # Self keys: with causal, blocks past this query block's last row are skipped entirely.
    hi = tl.minimum(N_K, start_m + BLOCK_M) if CAUSAL else N_K
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q,
        K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, N_K, hi, offs_m, offs_d, qk_scale,
        HEAD_DIM, CAUSAL, DOT_PRECISION, BLOCK_N,
    )

    # Padding rows (>= N_Q) are never stored; guard their l = 0 anyway.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # back to natural log
    tl.store(Lse + (off_b * H + off_h) * N_Q + offs_m, lse, mask=m_ok)


# --- backward ----------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    Out,  # (B, H, Nq, D) forward output
    DO,  # (B, H, Nq, D) gradient of the output, last dim contiguous
    Delta,  # (B, H, Nq) fp32 contiguous rowsum(dO ∘ O), written here
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))
    tl.store(Delta + (off_b * H + off_h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _bwd_kv_block(
    Q,  # (Nq, D) queries of this (b, h); row stride stride_qn
    DO,  # (Nq, D) output gradient of this (b, h); row stride stride_don
    Lse,  # (Nq,) fp32 log-sum-exp of this (b, h)
    Delta,  # (Nq,) fp32 rowsum(dO ∘ O) of this (b, h)
    K,  # (n_keys, D) keys of this (b, h): prompt or self; row stride stride_kn
    V,  # (n_keys, D) values of this (b, h); row stride stride_vn
    stride_qn, stride_don, stride_kn, stride_vn,
    N_Q, n_keys, start_n, lo, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(dK, dV) of key rows [start_n, start_n + BLOCK_N), unscaled dK, summed over the query
    blocks from row lo on, in a fixed order (deterministic)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < n_keys) & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        qt = tl.load(Q + offs_m[None, :] * stride_qn + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        lse = tl.load(Lse + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634  # log2(e)
        # Pᵀ (BLOCK_N, BLOCK_M) recomputed from the saved log-sum-exp.
        pt = tl.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        visible = m_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(visible, pt, 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(**_autotune_args(_DKDV_SPECS))
@triton.jit
def _bwd_dkdv_kernel(
    Q,  # (B, H, Nq, D) queries, last dim contiguous
    K,  # (B, H, Nk, D) self keys, last dim contiguous
    V,  # (B, H, Nk, D) self values, last dim contiguous
    KP,  # (Bp, H, P, D) prompt keys; batch stride 0 when Bp = 1
    VP,  # (Bp, H, P, D) prompt values; batch stride 0 when Bp = 1
    DO,  # (B, H, Nq, D) output gradient, last dim contiguous
    Lse,  # (B, H, Nq) fp32 contiguous log-sum-exp from the forward
    Delta,  # (B, H, Nq) fp32 contiguous rowsum(dO ∘ O)
    DK,  # (B, H, Nk, D) contiguous self-key gradient, written here
    DV,  # (B, H, Nk, D) contiguous self-value gradient, written here
    DKP,  # (B, H, P, D) contiguous per-batch prompt-key gradient (fp32 when Bp = 1), written here
    DVP,  # (B, H, P, D) contiguous per-batch prompt-value gradient, written here
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_dob, stride_doh, stride_don,
    H, N_Q, N_K, N_P,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = Lse + (off_b * H + off_h) * N_Q
    delta_base = Delta + (off_b * H + off_h) * N_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_self_blocks = (N_K + BLOCK_N - 1) // BLOCK_N
    if pid_n < n_self_blocks:
        start_n = pid_n * BLOCK_N
        # Causal: queries above this key block's first row never see it.
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
        dk, dv = _bwd_kv_block(
            q_base, do_base, lse_base, delta_base,
            K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,
            stride_qn, stride_don, stride_kn, stride_vn, N_Q, N_K, start_n, lo, qk_scale,
            HEAD_DIM, BLOCK_D, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < N_K) & d_ok[None, :]
        out_off = ((off_b * H + off_h) * N_K + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask)
    else:
        start_n = (pid_n - n_self_blocks) * BLOCK_N
        dk, dv = _bwd_kv_block(
            q_base, do_base, lse_base, delta_base,
            KP + off_b * stride_kpb + off_h * stride_kph,
            VP + off_b * stride_vpb + off_h * stride_vph,
            stride_qn, stride_don, stride_kpn, stride_vpn, N_Q, N_P, start_n, 0, qk_scale,
            HEAD_DIM, BLOCK_D, False, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < N_P) & d_ok[None, :]
        out_off = ((off_b * H + off_h) * N_P + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(DKP + out_off, (dk * sm_scale).to(DKP.dtype.element_ty), mask=mask)
        tl.store(DVP + out_off, dv.to(DVP.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta,
    K,  # (n_keys, D) keys of this (b, h): prompt or self; row stride stride_kn
    V,  # (n_keys, D) values of this (b, h); row stride stride_vn
    stride_kn, stride_vn, n_keys, hi, offs_m, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Adds dS · K (unscaled) over the key blocks [0, hi) of one key source to dq."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kv_mask = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(**_autotune_args(_DQ_SPECS))
@triton.jit
def _bwd_dq_kernel(
    Q,  # (B, H, Nq, D) queries, last dim contiguous
    K,  # (B, H, Nk, D) self keys, last dim contiguous
    V,  # (B, H, Nk, D) self values, last dim contiguous
    KP,  # (Bp, H, P, D) prompt keys; batch stride 0 when Bp = 1
    VP,  # (Bp, H, P, D) prompt values; batch stride 0 when Bp = 1
    DO,  # (B, H, Nq, D) output gradient, last dim contiguous
    Lse,  # (B, H, Nq) fp32 contiguous log-sum-exp from the forward
    Delta,  # (B, H, Nq) fp32 contiguous rowsum(dO ∘ O)
    DQ,  # (B, H, Nq, D) contiguous query gradient, written here
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_dob, stride_doh, stride_don,
    H, N_Q, N_K, N_P,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mask, other=0.0)
    row = (off_b * H + off_h) * N_Q + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=0.0) * 1.4426950408889634  # log2(e)
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta,
        KP + off_b * stride_kpb + off_h * stride_kph, VP + off_b * stride_vpb + off_h * stride_vph,
        stride_kpn, stride_vpn, N_P, N_P, offs_m, offs_d, qk_scale,
        HEAD_DIM, False, DOT_PRECISION, BLOCK_N,
    )
    hi = tl.minimum(N_K, start_m + BLOCK_M) if CAUSAL else N_K
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta,
        K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, N_K, hi, offs_m, offs_d, qk_scale,
        HEAD_DIM, CAUSAL, DOT_PRECISION, BLOCK_N,
    )
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------


@functools.cache
def _interpreted_copy() -> ModuleType:
    """This module loaded again with TRITON_INTERPRET=1, so its kernels run on CPU tensors."""
    name = f"{__name__}_interpreted"
    spec = importlib.util.spec_from_file_location(name, __file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules[name] = module  # the interpreter reads the kernels' source via inspect
        spec.loader.exec_module(module)
        module._SETTINGS = _SETTINGS
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def _implementation(t: Tensor) -> ModuleType | None:
    """The module whose kernels run on t's device: None for this one, else the interpreted copy."""
    if t.device.type == "cuda" or _INTERPRETED:
        return None
    if t.device.type != "cpu":
        raise RuntimeError(f"prompt_attention kernels run on CUDA (or CPU via Triton's "
                           f"interpreter), not on {t.device.type}")
    return _interpreted_copy()


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
    batch, heads, _, dim = q.shape
    for name, t in (("k", k), ("v", v), ("k_prompt", k_prompt), ("v_prompt", v_prompt)):
        if t.dim() != 4 or t.shape[1] != heads or t.shape[3] != dim:
            raise ValueError(f"{name} must be (·, {heads}, ·, {dim}), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device")
    if k.shape != v.shape or k.shape[0] != batch:
        raise ValueError(f"k and v must both be ({batch}, {heads}, Nk, {dim})")
    if k_prompt.shape != v_prompt.shape or k_prompt.shape[0] not in (1, batch):
        raise ValueError(f"k_prompt and v_prompt must both be (1 or {batch}, {heads}, P, {dim})")
    if k.shape[2] + k_prompt.shape[2] == 0:
        raise ValueError("prompt_attention needs at least one key (Nk + P > 0)")
    if not 1 <= dim <= 256:
        raise ValueError(f"head dim must be in [1, 256], got {dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take fp16, bf16 or fp32, not {q.dtype}")


def _kernel_meta(q: Tensor, k: Tensor, k_prompt: Tensor, causal: bool) -> dict:
    """The shape and constexpr arguments common to every kernel."""
    dim = q.shape[3]
    return {
        "H": q.shape[1], "N_Q": q.shape[2], "N_K": k.shape[2], "N_P": k_prompt.shape[2],
        "HEAD_DIM": dim, "BLOCK_D": _pow2_at_least_16(dim), "CAUSAL": bool(causal),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }


def _launch(
    kernel: triton.runtime.Autotuner, grid_blocks: Callable[[int, int], int], batch: int,
    heads: int, args: tuple, meta: dict,
) -> None:
    """Launches an autotuned kernel, or its inner jit function with the fixed blocks.

    grid_blocks(BLOCK_M, BLOCK_N) -> the number of programs along grid axis 0.
    """
    if _SETTINGS["fixed_blocks"] is not None:
        block_m, block_n = _SETTINGS["fixed_blocks"]
        grid = (grid_blocks(block_m, block_n), heads, batch)
        kernel.fn[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        return

    def grid(cfg: dict) -> tuple[int, int, int]:
        return grid_blocks(cfg["BLOCK_M"], cfg["BLOCK_N"]), heads, batch

    kernel[grid](*args, **meta)


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
    impl = _implementation(q)
    if impl is not None:
        return impl.prompt_attention_fwd(q, k, v, k_prompt, v_prompt, causal, scale)
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
    _launch(_fwd_kernel, lambda bm, bn: triton.cdiv(n_q, bm), batch, heads, args, meta)
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
    impl = _implementation(q)
    if impl is not None:
        return impl.prompt_attention_bwd(do, q, k, v, k_prompt, v_prompt, out, lse, causal, scale)
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
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(n_q, pre_block), heads, batch)](
        out, do, delta, *_strides3(out), *_strides3(do), heads, n_q,
        HEAD_DIM=dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block,
    )
    if n_p == 0:
        # Never read or written (no prompt blocks): real pointers in place of empty tensors.
        k_prompt, v_prompt, dkp, dvp = k, v, dk, dv
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(k_prompt),
               *_strides3(v_prompt), *_strides3(do))
    meta.update(qk_scale=scale * _LOG2E, sm_scale=scale)
    _launch(
        _bwd_dkdv_kernel, lambda bm, bn: triton.cdiv(n_k, bn) + triton.cdiv(n_p, bn),
        batch, heads,
        (q, k, v, k_prompt, v_prompt, do, lse, delta, dk, dv, dkp, dvp, *strides), meta,
    )
    _launch(
        _bwd_dq_kernel, lambda bm, bn: triton.cdiv(n_q, bm), batch, heads,
        (q, k, v, k_prompt, v_prompt, do, lse, delta, dq, *strides), meta,
    )
