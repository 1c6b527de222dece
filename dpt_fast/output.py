"""The result of a DPT forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DPTOutput:
    """Everything the objective and the evaluation need from one forward pass.

    B: batch, C: classes, L_cavpt: layers with class-aware prompts, K: selected classes per image.
    A part the method does not have is ``None`` (e.g. "coop" has no CAVPT and no guidance terms).
    """

    logits: torch.Tensor  # (B, C) scale · norm(prompted image) · norm(learned text)ᵀ
    layer_logits: torch.Tensor | None = None  # (B, L_cavpt, K, C) CAVPT per-layer classifiers
    topk_indices: torch.Tensor | None = None  # (B, K) zero-shot top-K class indices, long
    logits_zeroshot_image: torch.Tensor | None = None  # (B, C) frozen image vs learned text
    logits_handcrafted_text: torch.Tensor | None = None  # (B, C) prompted image vs template text
