"""Triton backward kernels of the fused prompt attention (contract: ``prompt_attention.py``).

* ``backward_preprocess_kernel``: ``delta = rowsum(dO ∘ O)`` (fp32, (B, H, Nq)).
* ``backward_dkdv_kernel``: one program per (key block, head, batch) over the self blocks and
  then the prompt blocks; each accumulates its dK/dV over all query blocks in registers and
  stores them once. Prompt blocks go to a (B, H, P, D) buffer (fp32 when Bp = 1; the launcher
  sums it over the batch).
* ``backward_dq_kernel``: one program per (query block, head, batch) accumulating dQ over the
  prompt and self blocks.

Probabilities are recomputed from the forward's log-sum-exp. No atomics: every output element
is written by exactly one program and every reduction runs in a fixed order, so results are
bitwise identical across runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .prompt_attention_autotune import DKDV_SPECS, DQ_SPECS, autotune_args


@triton.jit
def backward_preprocess_kernel(
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
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (off_b * H + off_h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _backward_kv_block(
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
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


@triton.autotune(**autotune_args(DKDV_SPECS))
@triton.jit
def backward_dkdv_kernel(
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
        dk, dv = _backward_kv_block(
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
        dk, dv = _backward_kv_block(
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
def _backward_dq_inner(
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


@triton.autotune(**autotune_args(DQ_SPECS))
@triton.jit
def backward_dq_kernel(
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

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _backward_dq_inner(
        dq, q, do, lse, delta,
        KP + off_b * stride_kpb + off_h * stride_kph, VP + off_b * stride_vpb + off_h * stride_vph,
        stride_kpn, stride_vpn, N_P, N_P, offs_m, offs_d, qk_scale,
        HEAD_DIM, False, DOT_PRECISION, BLOCK_N,
    )
    hi = tl.minimum(N_K, start_m + BLOCK_M) if CAUSAL else N_K
    dq = _backward_dq_inner(
        dq, q, do, lse, delta,
        K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, N_K, hi, offs_m, offs_d, qk_scale,
        HEAD_DIM, CAUSAL, DOT_PRECISION, BLOCK_N,
    )
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)
