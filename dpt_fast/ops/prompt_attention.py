"""Prompt attention: every query attends to shared prompt keys/values and to the sequence's own.

``prompt_attention(q, k, v, k_prompt, v_prompt, causal=False, scale=None)`` computes::

    softmax(scale · q [k_prompt; k]ᵀ, masked) · [v_prompt; v]

with q (B, H, Nq, D), k and v (B, H, Nk, D), k_prompt and v_prompt (Bp, H, P, D), Bp ∈ {1, B}
(one prompt shared by the batch, or one per element), P ≥ 0. Prompt keys are always visible;
with ``causal`` query i sees self keys j <= i (the queries are the first Nq positions, so
Nq < Nk, e.g. the CLS query alone, is allowed).

Backends, chosen per call:

* ``triton``: the fused FlashAttention-style kernels of ``dpt_fast.kernels.prompt_attention``
  behind the custom op ``torch.ops.dpt_fast.prompt_attention_fwd`` (+ ``_bwd``), registered with
  fake kernels and an autograd formula so ``torch.compile(fullgraph=True)`` traces through it.
  Deterministic: the backward uses no atomics. The default for CUDA tensors.
* ``torch``: ``scaled_dot_product_attention`` over the concatenated, batch-expanded K/V
  (``prompt_attention_torch``), differentiated by plain autograd. The default for CPU tensors.

``DPT_FAST_BACKEND=triton|torch`` (read at every call) forces one; ``triton`` on CPU tensors runs
the kernels through Triton's interpreter and requires ``TRITON_INTERPRET=1``.

``prompt_attention_ref`` is the naive float64 composition used as the test oracle.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dpt_fast.kernels import prompt_attention as _kernels
from dpt_fast.ops._common import default_scale, lse_dtype, to_common_dtype

_FWD_OP = "dpt_fast::prompt_attention_fwd"
_BWD_OP = "dpt_fast::prompt_attention_bwd"
_BACKENDS = ("triton", "torch")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_MAX_DIM = 256  # one (BLOCK, D) tile per operand must fit in registers / shared memory


def prompt_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Attention of q over the prompt keys and the self keys, differentiable in all five inputs.

    Args:
        q: (B, H, Nq, D) queries (the first Nq positions of the sequence).
        k, v: (B, H, Nk, D) self keys and values.
        k_prompt, v_prompt: (Bp, H, P, D) prompt keys and values, Bp ∈ {1, B}, P ≥ 0. With
            Bp = 1 the prompt is shared by the batch and its gradient is summed over it.
        causal: self key j is visible to query i only when j <= i; prompt keys always are.
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        (B, H, Nq, D) in the inputs' common dtype: the autocast dtype under autocast (float64
        left alone), else ``torch.promote_types`` of the five.

    Inputs may be strided views (e.g. q/k/v sliced out of a fused qkv projection); the Triton
    kernels read them in place when their last dim is contiguous.
    """
    _check_shapes(q, k, v, k_prompt, v_prompt)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    q, k, v, k_prompt, v_prompt = to_common_dtype(q, k, v, k_prompt, v_prompt)
    if _backend(q) == "triton":
        return torch.ops.dpt_fast.prompt_attention_fwd(
            q, k, v, k_prompt, v_prompt, bool(causal), scale)[0]
    return prompt_attention_torch(q, k, v, k_prompt, v_prompt, causal, scale)


def prompt_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    causal: bool = False, scale: float | None = None,
) -> Tensor:
    """The PyTorch path: SDPA over ``[k_prompt.expand(B); k]`` and ``[v_prompt.expand(B); v]``.

    Shapes as in ``prompt_attention``; all inputs in one dtype. Returns (B, H, Nq, D).
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    keys, values = _concat_kv(q.shape[0], k, v, k_prompt, v_prompt)
    mask = _visible(q.shape[2], k_prompt.shape[2], k.shape[2], q.device) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale)


def prompt_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Naive float64 composition (matmul, mask, softmax, matmul): the test oracle.

    Shapes as in ``prompt_attention``; any dtypes (cast to float64). Returns (B, H, Nq, D) in
    float64, differentiable back to the inputs.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    f64 = torch.float64
    keys, values = _concat_kv(q.shape[0], k.to(f64), v.to(f64), k_prompt.to(f64),
                              v_prompt.to(f64))
    scores = torch.matmul(q.to(f64), keys.transpose(-1, -2)) * scale
    if causal:
        visible = _visible(q.shape[2], k_prompt.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)




# --- helpers -----------------------------------------------------------------------------------


def _backend(q: Tensor) -> str:
    """"triton" or "torch" for this call (see the module docstring)."""
    forced = os.environ.get("DPT_FAST_BACKEND", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"DPT_FAST_BACKEND must be one of {_BACKENDS}, got {forced!r}")
    if forced == "torch":
        return "torch"
    supported = q.dtype in _KERNEL_DTYPES and 1 <= q.shape[-1] <= _KERNEL_MAX_DIM
    if forced == "triton":
        if not supported:
            raise ValueError(f"DPT_FAST_BACKEND=triton: the kernels take fp16, bf16 or fp32 with "
                             f"head dim <= {_KERNEL_MAX_DIM}, not {q.dtype} with {q.shape[-1]}")
        if q.device.type == "cuda" or (
            q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        ):
            return "triton"
        raise RuntimeError(
            f"DPT_FAST_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the Triton "
            f"kernels on CPU through the (slow) interpreter; got {q.device.type} tensors"
        )
    return "triton" if q.device.type == "cuda" and supported else "torch"


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor) -> None:
    """Raises a ValueError that names the mismatch (the kernels would read out of bounds)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, Nq, D), got shape {tuple(q.shape)}")
    batch, heads, _, dim = q.shape
    if (k.dim() != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads
            or k.shape[3] != dim):
        raise ValueError(f"k and v must both be ({batch}, {heads}, Nk, {dim}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if (k_prompt.dim() != 4 or k_prompt.shape != v_prompt.shape
            or k_prompt.shape[0] not in (1, batch) or k_prompt.shape[1] != heads
            or k_prompt.shape[3] != dim):
        raise ValueError(f"k_prompt and v_prompt must both be (1 or {batch}, {heads}, P, {dim}), "
                         f"got {tuple(k_prompt.shape)} and {tuple(v_prompt.shape)}")
    if k.shape[2] + k_prompt.shape[2] == 0:
        raise ValueError("prompt_attention needs at least one key: Nk + P > 0")




def _concat_kv(
    batch: int, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor
) -> tuple[Tensor, Tensor]:
    """(B, H, P + Nk, D) keys and values, prompt first."""
    keys = torch.cat([k_prompt.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prompt.expand(batch, -1, -1, -1), v], dim=2)
    return keys, values


def _visible(n_q: int, n_p: int, n_k: int, device: torch.device) -> Tensor:
    """(Nq, P + Nk) bool causal mask: prompt columns always True, self column j iff j <= i."""
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    prompt = torch.ones((n_q, n_p), dtype=torch.bool, device=device)
    return torch.cat([prompt, cols <= rows], dim=1)




# --- the custom ops: CUDA (or interpreter) kernels, with a math implementation for CPU ----------


@torch.library.custom_op(_FWD_OP, mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Nq, D), lse (B, H, Nq) fp32) of the fused forward."""
    if _backend(q) == "triton":
        return _kernels.prompt_attention_fwd(q, k, v, k_prompt, v_prompt, causal, scale)
    return _fwd_math(q, k, v, k_prompt, v_prompt, causal, scale)


@torch.library.custom_op(_BWD_OP, mutates_args=())
def _bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk_prompt, dv_prompt), shaped like (q, k, v, k_prompt, v_prompt)."""
    if _backend(q) == "triton":
        return _kernels.prompt_attention_bwd(
            grad_out, q, k, v, k_prompt, v_prompt, out, lse, causal, scale)
    return _bwd_math(grad_out, q, k, v, k_prompt, v_prompt, out, lse, causal, scale)


def _scores(
    q: Tensor, k: Tensor, k_prompt: Tensor, causal: bool, scale: float, acc: torch.dtype
) -> Tensor:
    """(B, H, Nq, P + Nk) masked scores in the accumulation dtype."""
    keys = torch.cat([k_prompt.expand(q.shape[0], -1, -1, -1), k], dim=2).to(acc)
    scores = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale
    if causal:
        visible = _visible(q.shape[2], k_prompt.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _fwd_math(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The forward op in PyTorch, accumulated in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = _scores(q, k, k_prompt, causal, scale, acc)
    lse = torch.logsumexp(scores, dim=-1)
    values = torch.cat([v_prompt.expand(q.shape[0], -1, -1, -1), v], dim=2).to(acc)
    out = torch.matmul(torch.exp(scores - lse[..., None]), values)
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def _bwd_math(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward op in PyTorch: the probabilities recomputed from lse, as the kernels do."""
    acc = torch.promote_types(q.dtype, torch.float32)
    batch, n_p = q.shape[0], k_prompt.shape[2]
    probs = torch.exp(_scores(q, k, k_prompt, causal, scale, acc) - lse.to(acc)[..., None])
    keys = torch.cat([k_prompt.expand(batch, -1, -1, -1), k], dim=2).to(acc)
    values = torch.cat([v_prompt.expand(batch, -1, -1, -1), v], dim=2).to(acc)
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    grad_scores = probs * (torch.matmul(do, values.transpose(-1, -2)) - delta)
    dq = torch.matmul(grad_scores, keys) * scale
    dkeys = torch.matmul(grad_scores.transpose(-1, -2), q.to(acc)) * scale
    dvalues = torch.matmul(probs.transpose(-1, -2), do)
    dkp, dk = dkeys[:, :, :n_p], dkeys[:, :, n_p:]
    dvp, dv = dvalues[:, :, :n_p], dvalues[:, :, n_p:]
    if k_prompt.shape[0] == 1:
        dkp, dvp = dkp.sum(0, keepdim=True), dvp.sum(0, keepdim=True)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(
        (dq, dk, dv, dkp, dvp), (q, k, v, k_prompt, v_prompt), strict=True))


@_fwd_op.register_fake
def _fwd_fake(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """out (B, H, Nq, D) contiguous in q's dtype, lse (B, H, Nq)."""
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return out, lse


@_bwd_op.register_fake
def _bwd_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Contiguous gradients shaped and typed like their inputs."""
    return tuple(t.new_empty(t.shape) for t in (q, k, v, k_prompt, v_prompt))


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, k_prompt, v_prompt, causal, scale = inputs
    out, lse = output
    # lse is a by-product saved for the backward; no gradient flows through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, k_prompt, v_prompt, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple:
    q, k, v, k_prompt, v_prompt, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None
    grads = torch.ops.dpt_fast.prompt_attention_bwd(
        grad_out.to(out.dtype), q, k, v, k_prompt, v_prompt, out, lse, ctx.causal, ctx.scale)
    return (*grads, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
