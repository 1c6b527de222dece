"""The image tower with prompts entering as keys/values only (docs/DESIGN.md §2, 1-3).

* No concatenation: a prompt token contributes its key and value to the attention and nothing
  else; its query, attention output and MLP are never computed.
* Deep prompts are the same for every image: their ln_1 + K/V projection runs once per layer on
  (1, P, W) and the attention broadcasts it over the batch.
* Only the CLS token leaves the tower: the last layer computes K/V for every token but query,
  output projection and MLP for CLS alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpt_fast.clip_interop import OpenClipModule, vision_embed, vision_head
from dpt_fast.fast.blocks import fast_blocks

# Called for the CAVPT layers: (layer index, tokens (B, N, W)) -> prompt tokens (B, K, W).
ClassPromptFn = Callable[[int, torch.Tensor], torch.Tensor]


class PromptedVisionEncoder:
    """Runs the frozen image tower with optional deep and class-aware prompts."""

    def __init__(self, visual: OpenClipModule) -> None:
        self.visual = visual
        self.blocks = fast_blocks(visual.transformer, "vision")

    def __call__(self, images: torch.Tensor, deep_prompts: torch.Tensor | None = None,
                 class_prompts: ClassPromptFn | None = None,
                 class_start: int | None = None) -> torch.Tensor:
        """Image features (B, E).

        deep_prompts: (n_deep, P, W) tokens of layers 0..n_deep-1, shared by all images.
        class_prompts / class_start: per-image prompts for layers class_start..L-1.
        """
        x = vision_embed(self.visual, images)  # (B, N, W)
        n_deep = deep_prompts.shape[0] if deep_prompts is not None else 0
        last = len(self.blocks) - 1
        for i, parts in enumerate(self.blocks):
            prompt_k = prompt_v = None
            if deep_prompts is not None and i < n_deep:
                prompt_k, prompt_v = parts.prompt_kv(deep_prompts[i : i + 1].to(x.dtype))
            elif class_prompts is not None and class_start is not None and i >= class_start:
                prompt_k, prompt_v = parts.prompt_kv(class_prompts(i, x).to(x.dtype))
            x = parts.forward(x, prompt_k, prompt_v, queries=1 if i == last else None)
        return vision_head(self.visual, x)
