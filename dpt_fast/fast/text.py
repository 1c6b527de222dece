"""The learned-prompt text encoder with a shared prefix and EOT truncation (docs/DESIGN.md §2, 4-5).

Under the causal mask, position t sees positions ≤ t only. So

* the hidden states of a prefix that is the same for every class (``[SOS] ctx…`` with a generic
  context) are the same for every class: run it once, as a batch of one;
* each class's suffix attends to that prefix's keys/values (broadcast over the classes) and to
  its own earlier suffix tokens;
* nothing after a prompt's EOT token reaches that token's output: stop at the largest EOT.
"""

from __future__ import annotations

import torch

from dpt_fast.clip_interop import OpenClipModule, text_head
from dpt_fast.fast.blocks import fast_blocks
from dpt_fast.ops import prompt_attention
from dpt_fast.prompts import TextPrompts


def split_prompts(prompts: TextPrompts, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings cut into the shared prefix (1, Lp, D) and suffixes (C, length-Lp, D).

    The prefix is what really is common to all classes: ``[SOS] ctx`` for a generic context at
    the end, ``[SOS] ctx[:M/2]`` for "middle", ``[SOS]`` alone for "front" or class-specific
    contexts. ``length`` is the number of positions kept (the largest EOT index + 1).
    """
    generic = prompts.ctx.dim() == 2
    if prompts.position == "end":
        # Built from the parts directly: the (C, T, D) prompt tensor is never materialised.
        ctx = prompts.ctx.to(prompts.token_prefix.dtype)
        if generic:
            prefix = torch.cat([prompts.token_prefix[:1], ctx[None]], dim=1)
            return prefix, prompts.token_suffix[:, : length - prefix.shape[1]]
        suffix = torch.cat([ctx, prompts.token_suffix[:, : length - 1 - prompts.n_ctx]], dim=1)
        return prompts.token_prefix[:1], suffix
    shared = 1 + (prompts.n_ctx // 2 if prompts.position == "middle" and generic else 0)
    full = prompts()[:, :length]
    return full[:1, :shared], full[:, shared:]


class SharedPrefixTextEncoder:
    """Encodes the learned prompts of all classes: (C, E) features, as the full encoder would.

    Holds no parameters: it reads the CLIP's frozen text tower and the prompts it is given.
    """

    def __init__(self, clip: OpenClipModule) -> None:
        self.clip = clip
        self.blocks = fast_blocks(clip.transformer, "text")

    def __call__(self, prompts: TextPrompts) -> torch.Tensor:
        eot = prompts.eot_index  # (C,)
        length = prompts.used_length
        prefix, suffix = split_prompts(prompts, length)
        n_prefix = prefix.shape[1]
        positions = self.clip.positional_embedding[:length]
        prefix = prefix + positions[:n_prefix].to(prefix.dtype)
        suffix = suffix + positions[n_prefix:].to(suffix.dtype)
        for parts in self.blocks:
            q_p, k_p, v_p = parts.qkv(parts.norm(prefix))  # (1, H, Lp, D)
            q_s, k_s, v_s = parts.qkv(parts.norm(suffix))  # (C, H, S, D)
            empty = k_p[:, :, :0]
            prefix_out = prompt_attention(q_p, k_p, v_p, empty, empty, causal=True)
            suffix_out = prompt_attention(q_s, k_s, v_s, k_p, v_p, causal=True)
            prefix = parts.finish(prefix, prefix_out)
            suffix = parts.finish(suffix, suffix_out)
        return text_head(self.clip, suffix, eot - n_prefix)
