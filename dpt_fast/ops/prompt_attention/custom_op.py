"""The custom ops ``torch.ops.dpt_fast.prompt_attention_fwd`` / ``_bwd`` and their registrations.

Registered with ``torch.library.custom_op`` with fake implementations (shapes for
``torch.compile`` and meta tensors) and an autograd formula, so ``torch.compile(fullgraph=True)``
traces a model through them. Each op runs the Triton launchers when ``dispatch.backend`` picks
them (imported only then), else the formula of ``reference.py`` in PyTorch, accumulated in fp32
(fp64 for fp64 inputs): that serves float64 gradchecks and machines without triton.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpt_fast.ops._common import lse_dtype
from dpt_fast.ops.prompt_attention.dispatch import backend
from dpt_fast.ops.prompt_attention.reference import (
    attention_with_lse,
    concat_prompt_kv,
    masked_scores,
)

FORWARD_OP = "dpt_fast::prompt_attention_fwd"
BACKWARD_OP = "dpt_fast::prompt_attention_bwd"


@torch.library.custom_op(FORWARD_OP, mutates_args=())
def forward_op(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32, fp64 for fp64 inputs)."""
    if backend(q) == "triton":
        # The Triton launchers, imported on first use so that triton stays optional.
        from dpt_fast.kernels.prompt_attention import prompt_attention_fwd

        return prompt_attention_fwd(q, k, v, k_prompt, v_prompt, causal, scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    q_acc, k_acc, v_acc, kp_acc, vp_acc = (t.to(acc) for t in (q, k, v, k_prompt, v_prompt))
    out, lse = attention_with_lse(q_acc, k_acc, v_acc, kp_acc, vp_acc, causal, scale)
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk_prompt, dv_prompt), contiguous, shaped and typed like their inputs."""
    if backend(q) == "triton":
        from dpt_fast.kernels.prompt_attention import prompt_attention_bwd

        return prompt_attention_bwd(
            grad_out, q, k, v, k_prompt, v_prompt, out, lse, causal, scale)
    return _backward_math(grad_out, q, k, v, k_prompt, v_prompt, out, lse, causal, scale)


def _backward_math(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The softmax-attention backward, probabilities recomputed from lse as the kernels do.

    With P = exp(S - lse), dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)); dQ = scale · dS K,
    d[K_p; K] = scale · dSᵀ Q, d[V_p; V] = Pᵀ dO; a shared prompt's gradient is summed over the
    batch.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    n_p = k_prompt.shape[2]
    q_acc, do = q.to(acc), grad_out.to(acc)
    keys, values = concat_prompt_kv(*(t.to(acc) for t in (k, v, k_prompt, v_prompt)))
    probs = torch.exp(masked_scores(q_acc, keys, n_p, causal, scale) - lse.to(acc)[..., None])
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    grad_scores = probs * (torch.matmul(do, values.transpose(-1, -2)) - delta)
    dq = torch.matmul(grad_scores, keys) * scale
    dkeys = torch.matmul(grad_scores.transpose(-1, -2), q_acc) * scale
    dvalues = torch.matmul(probs.transpose(-1, -2), do)
    dkp, dk = dkeys[:, :, :n_p], dkeys[:, :, n_p:]
    dvp, dv = dvalues[:, :, :n_p], dvalues[:, :, n_p:]
    if k_prompt.shape[0] == 1:
        dkp, dvp = dkp.sum(0, keepdim=True), dvp.sum(0, keepdim=True)
    grads = [g.to(t.dtype).contiguous() for g, t in zip(
        (dq, dk, dv, dkp, dvp), (q, k, v, k_prompt, v_prompt), strict=True)]
    return grads[0], grads[1], grads[2], grads[3], grads[4]


@forward_op.register_fake
def _forward_fake(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """out (B, H, Nq, D) contiguous in q's dtype, lse (B, H, Nq)."""
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return out, lse


@backward_op.register_fake
def _backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    out: Tensor, lse: Tensor, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Contiguous gradients shaped and typed like their inputs."""
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            k_prompt.new_empty(k_prompt.shape), v_prompt.new_empty(v_prompt.shape))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, k_prompt, v_prompt, causal, scale = inputs
    out, lse = output
    # lse is a by-product saved for the backward; no gradient flows through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, k_prompt, v_prompt, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx: Any, grad_out: Tensor | None,
                       grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, k_prompt, v_prompt, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None
    grads = torch.ops.dpt_fast.prompt_attention_bwd(
        grad_out.to(out.dtype), q, k, v, k_prompt, v_prompt, out, lse, ctx.causal, ctx.scale)
    return (*grads, None, None)


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
