"""``prompt_attention``: every query attends to shared prompt keys/values and to its sequence's.

``prompt_attention(q, k, v, k_prompt, v_prompt, causal=False, scale=None)`` computes::

    softmax(scale · q [k_prompt; k]ᵀ, masked) · [v_prompt; v]

with q (B, H, Nq, D), k and v (B, H, Nk, D), k_prompt and v_prompt (Bp, H, P, D), Bp ∈ {1, B}
(one prompt shared by the batch, or one per element), P ≥ 0. Prompt keys are always visible;
with ``causal`` query i sees self keys j <= i (the queries are the first Nq positions, so
Nq < Nk, e.g. the CLS query alone, is allowed).

The call runs the fused Triton kernels through the custom op ``torch.ops.dpt_fast.
prompt_attention_fwd`` (deterministic: the backward uses no atomics) or the PyTorch path
(``prompt_attention_torch``); ``dispatch.py`` says which and how to force one. The kernels take
head dims up to 128 (``capabilities.TRITON_KERNELS``): larger ones would spill registers in
every launch configuration, so they run on the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops._common import default_scale, to_common_dtype
from dpt_fast.ops.prompt_attention import custom_op  # noqa: F401  (registers the ops)
from dpt_fast.ops.prompt_attention.capabilities import check_shapes
from dpt_fast.ops.prompt_attention.dispatch import backend
from dpt_fast.ops.prompt_attention.torch_path import prompt_attention_torch


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
    check_shapes(q, k, v, k_prompt, v_prompt)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    q, k, v, k_prompt, v_prompt = to_common_dtype(q, k, v, k_prompt, v_prompt)
    if backend(q) == "triton":
        return torch.ops.dpt_fast.prompt_attention_fwd(
            q, k, v, k_prompt, v_prompt, bool(causal), scale)[0]
    return prompt_attention_torch(q, k, v, k_prompt, v_prompt, causal, scale)
