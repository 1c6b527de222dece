"""CoCoOp's text encoder for all images and classes in one pass (docs/DESIGN.md §2, 7).

The prompt of (image b, class c) is ``[SOS] ctx_b <name c> . [EOT]``. Under the causal mask,
position t sees positions ≤ t only, so

* the prefix ``[SOS] ctx_b`` (1 + M tokens) has the same hidden states for every class: it runs
  once per image, a batch of B;
* each class's suffix (name, ".", EOT) attends to its image's prefix keys/values and, causally,
  to its own earlier suffix tokens: a batch of B·C sequences of S tokens;
* nothing after a prompt's EOT reaches its feature: the suffixes stop at the largest EOT.

The attention is the ``prompt_attention`` op (fused Triton kernels on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from dpt_fast.clip_interop import text_head
from dpt_fast.cocoop.prompts import CoCoOpPrompts
from dpt_fast.fast.blocks import fast_blocks
from dpt_fast.ops import prompt_attention


class ConditionedTextEncoder:
    """Text features (B, C, E) of every class's prompt under every image's context.

    Holds no parameters: it reads the CLIP's frozen text tower and the prompts it is given.
    """

    def __init__(self, clip: Any) -> None:
        self.clip = clip  # an open_clip CLIP (its towers are read as attributes)
        self.blocks = fast_blocks(clip.transformer, "text")

    def __call__(self, prompts: CoCoOpPrompts, context: torch.Tensor) -> torch.Tensor:
        """context: (B, M, D) each image's conditioned context -> (B, C, E), unnormalised."""
        batch, n_ctx = int(context.shape[0]), int(context.shape[1])
        n_cls = int(prompts.token_prefix.shape[0])
        length = prompts.used_length  # positions up to the last EOT
        n_prefix = 1 + n_ctx
        positions = self.clip.positional_embedding[:length]
        sos = prompts.token_prefix[:1].expand(batch, -1, -1)  # (B, 1, D), same for all
        prefix = torch.cat([sos, context], dim=1)  # (B, 1 + M, D)
        prefix = prefix + positions[:n_prefix].to(prefix.dtype)
        suffix = prompts.token_suffix[:, : length - n_prefix]  # (C, S, D)
        suffix = suffix + positions[n_prefix:].to(suffix.dtype)
        # Every (image, class) pair gets its own suffix sequence from the first layer on.
        suffix = suffix.unsqueeze(0).expand(batch, -1, -1, -1).reshape(
            batch * n_cls, suffix.shape[1], suffix.shape[2])  # (B·C, S, D)
        last = len(self.blocks) - 1
        for i, parts in enumerate(self.blocks):
            if i < last:
                q_p, k_p, v_p = parts.qkv(parts.norm(prefix))  # (B, H, 1 + M, Dh)
            else:  # the prefix's own outputs after the last layer reach no EOT: keys only
                k_p, v_p = parts.kv(parts.norm(prefix))
            # Each class's suffix reads its image's prefix keys/values.
            k_pc = _per_class(k_p, n_cls)  # (B·C, H, 1 + M, Dh)
            v_pc = _per_class(v_p, n_cls)
            q_s, k_s, v_s = parts.qkv(parts.norm(suffix))  # (B·C, H, S, Dh)
            suffix_out = prompt_attention(q_s, k_s, v_s, k_pc, v_pc, causal=True)
            if i < last:
                empty = k_p[:, :, :0]
                prefix_out = prompt_attention(q_p, k_p, v_p, empty, empty, causal=True)
                prefix = parts.finish(prefix, prefix_out)
            suffix = parts.finish(suffix, suffix_out)
        eot = (prompts.eot_index - n_prefix).repeat(batch)  # (B·C,) EOT inside each suffix
        return text_head(self.clip, suffix, eot).view(batch, n_cls, -1)


def _per_class(t: torch.Tensor, n_cls: int) -> torch.Tensor:
    """(B, H, P, Dh) -> (B·C, H, P, Dh): image b's rows repeated for its C classes."""
    return t.unsqueeze(1).expand(-1, n_cls, -1, -1, -1).reshape(-1, *t.shape[1:])
