"""The one written-out formula of prompt attention: the test oracle and the custom op's CPU math.

``prompt_attention_ref`` runs it in float64. The custom op's PyTorch implementation
(``custom_op.py``) runs the same functions in float32, and its backward recomputes the
probabilities through ``masked_scores`` from the saved log-sum-exp, as the kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops._common import default_scale


def concat_prompt_kv(
    k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor
) -> tuple[Tensor, Tensor]:
    """(B, H, P + Nk, D) keys and values, prompt first; a shared prompt (Bp = 1) is expanded."""
    batch = k.shape[0]
    keys = torch.cat([k_prompt.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prompt.expand(batch, -1, -1, -1), v], dim=2)
    return keys, values


def visible_keys(n_q: int, n_p: int, n_k: int, device: torch.device) -> Tensor:
    """(Nq, P + Nk) bool causal mask: prompt columns always True, self column j iff j <= i.

    The queries are the first Nq positions of the sequence, so Nq < Nk keeps query i at key i.
    """
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    prompt = torch.ones((n_q, n_p), dtype=torch.bool, device=device)
    return torch.cat([prompt, cols <= rows], dim=1)


def masked_scores(
    q: Tensor, keys: Tensor, n_prompt: int, causal: bool, scale: float
) -> Tensor:
    """(B, H, Nq, P + Nk) scores ``scale · q keysᵀ`` in q's dtype; hidden keys are -inf."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if causal:
        n_k = keys.shape[2] - n_prompt
        visible = visible_keys(q.shape[2], n_prompt, n_k, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Output (B, H, Nq, D) and natural log-sum-exp (B, H, Nq) in the inputs' (common) dtype.

    ``out = exp(scores - lse) · [v_prompt; v]``, i.e. softmax over the visible keys.
    """
    keys, values = concat_prompt_kv(k, v, k_prompt, v_prompt)
    scores = masked_scores(q, keys, k_prompt.shape[2], causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), values), lse


def prompt_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    causal: bool = False, scale: float | None = None,
) -> Tensor:
    """The formula in float64, differentiable back to the inputs: the test oracle.

    Shapes as in ``prompt_attention``; any floating dtypes (cast to float64). Returns
    (B, H, Nq, D) in float64.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    f64 = torch.float64
    return attention_with_lse(q.to(f64), k.to(f64), v.to(f64), k_prompt.to(f64),
                              v_prompt.to(f64), causal, scale)[0]
