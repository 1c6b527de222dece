"""Triton forward kernel of the fused prompt attention (contract: ``prompt_attention.py``).

One program per (query block, head, batch), FlashAttention-2 style: an online softmax over the
prompt key blocks and then the self key blocks (two loops over two pointers: the keys are never
concatenated), fp32 accumulation in registers, exp2 with log2(e) folded into the score scale.
It writes the output and the natural log-sum-exp the backward pass recomputes probabilities from.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .prompt_attention_autotune import FORWARD_SPECS, autotune_args


@triton.jit
def _forward_inner(
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**autotune_args(FORWARD_SPECS))
@triton.jit
def forward_kernel(
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

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    # Prompt keys: always visible.
    acc, l_i, m_i = _forward_inner(
        acc, l_i, m_i, q,
        KP + off_b * stride_kpb + off_h * stride_kph, VP + off_b * stride_vpb + off_h * stride_vph,
        stride_kpn, stride_vpn, N_P, N_P, offs_m, offs_d, qk_scale,
        HEAD_DIM, False, DOT_PRECISION, BLOCK_N,
    )
    # Self keys: with causal, blocks past this query block's last row are skipped entirely.
    hi = tl.minimum(N_K, start_m + BLOCK_M) if CAUSAL else N_K
    acc, l_i, m_i = _forward_inner(
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
