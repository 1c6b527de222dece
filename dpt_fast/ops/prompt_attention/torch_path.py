"""The PyTorch path of prompt attention: SDPA over the concatenated keys and values.

The default for CPU tensors (and for CUDA when triton is not installed); differentiated by plain
autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops._common import default_scale
from dpt_fast.ops.prompt_attention.reference import concat_prompt_kv, visible_keys


def prompt_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
    causal: bool = False, scale: float | None = None,
) -> Tensor:
    """``scaled_dot_product_attention`` over ``[k_prompt; k]`` and ``[v_prompt; v]``.

    Shapes as in ``prompt_attention``; all inputs in one dtype. Returns (B, H, Nq, D).
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    keys, values = concat_prompt_kv(k, v, k_prompt, v_prompt)
    mask = visible_keys(q.shape[2], k_prompt.shape[2], k.shape[2], q.device) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale)
