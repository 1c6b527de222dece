"""Zero-shot CLIP: the one classifier of hand-crafted prompts that every method shares.

:func:`zero_shot_classifier` gives the normalised text features of ``template`` filled with each
class name: zero-shot CLIP's classifier, DPT's class selection and guidance features
(:class:`~dpt_fast.base.DPTBase`), the toy demo's zero-shot line, CoCoOp's init.
:class:`ZeroShotCLIP` is zero-shot CLIP as a model (the ``zeroshot`` method).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from dpt_fast.clip_interop import clip_geometry, encode_text_tokens
from dpt_fast.config import DPTConfig
from dpt_fast.frozen_classifier import FrozenCLIPClassifier
from dpt_fast.prompts import prompt_class_name
from dpt_fast.tokenizer import ClipTokenizer


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dimension, as the authors write it (F.normalize would clamp)."""
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def zero_shot_classifier(clip: nn.Module, classnames: Sequence[str], template: str,
                         tokenizer: ClipTokenizer | None = None) -> torch.Tensor:
    """(C, E) normalised text features of ``template.format(name)`` for each class name ("_"
    written as a space), on the CLIP's device, in its dtype.

    Raises:
        ValueError: a class name too long for the CLIP's context with this template.
    """
    tokenizer = tokenizer or ClipTokenizer(clip_geometry(clip).context_length)
    prompts = [template.format(prompt_class_name(name)) for name in classnames]
    device = next(p for p in clip.parameters() if p.is_floating_point()).device
    try:
        token_ids = tokenizer(prompts).to(device)
    except ValueError as err:
        raise ValueError(f"a class name is too long for the template: {err}") from None
    return normalize(encode_text_tokens(clip, token_ids))


class ZeroShotCLIP(FrozenCLIPClassifier):
    """Zero-shot CLIP on ``classnames``: ``logits = scale · norm(image) · classifierᵀ``.

    The image feature is the fast DPT's frozen pass (CLS-only last layer; the same values), so
    a run shares the frozen-feature cache with the DPT presets (``frozen_pass_id``).
    """

    handcrafted_text_features: torch.Tensor  # (C, E) buffer

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: DPTConfig | None = None) -> None:
        super().__init__(clip, classnames, config, "zeroshot")
        # (C, E) the hand-crafted classifier, fixed.
        self.register_buffer("handcrafted_text_features",
                             zero_shot_classifier(clip, self.classnames, self.config.template),
                             persistent=False)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of frozen image features (B, E)."""
        text = self.handcrafted_text_features
        scale = cast(torch.Tensor, self.clip.logit_scale).exp()
        return scale * normalize(features.to(text.dtype)) @ text.t()


def build_zero_shot(clip: nn.Module, classnames: Sequence[str],
                    config: DPTConfig) -> ZeroShotCLIP:
    """The ``zeroshot`` method's builder."""
    return ZeroShotCLIP(clip, classnames, config)


__all__ = ["ZeroShotCLIP", "build_zero_shot", "normalize", "zero_shot_classifier"]
