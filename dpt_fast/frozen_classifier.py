"""What the methods that train no prompt share: a frozen CLIP's image feature and a classifier.

``zeroshot`` (:class:`dpt_fast.zero_shot.ZeroShotCLIP`) and ``linear_probe``
(:class:`dpt_fast.linear_probe.model.LinearProbeCLIP`) differ only in the classifier applied to
the frozen image features (B, E); the frozen pass is the fast DPT's, so they share its feature
cache (``frozen_pass_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from dpt_fast.clip_interop import ClipGeometry, clip_geometry
from dpt_fast.config import DPTConfig
from dpt_fast.fast.vision import PromptedVisionEncoder
from dpt_fast.output import DPTOutput

if TYPE_CHECKING:
    from typing_extensions import Self


class FrozenCLIPClassifier(nn.Module):
    """A frozen CLIP's image features (B, E) and a classifier on them (subclasses:
    :meth:`logits_from_features`). Nothing in it trains."""

    frozen_pass_id = "DPT"  # the feature cache's key: the frozen pass of dpt_fast.DPT
    uses_frozen_image = True  # evaluation may hand it cached frozen features

    def __init__(self, clip: nn.Module, classnames: Sequence[str], config: DPTConfig | None,
                 method: str) -> None:
        """``config`` defaults to ``DPTConfig(method=method)``; ``classnames`` must not be
        empty."""
        super().__init__()
        self.config = DPTConfig(method=method) if config is None else config
        self.classnames = list(classnames)
        if not self.classnames:
            raise ValueError(f"classnames is empty: {method} needs at least one class")
        self.geometry: ClipGeometry = clip_geometry(clip)
        clip.requires_grad_(False)
        self.clip = clip.eval()
        # a plain attribute: it only reads the registered CLIP
        self._vision = PromptedVisionEncoder(cast(nn.Module, clip.visual))

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never trains
        return self

    @torch.no_grad()
    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features (B, E) of images (B, 3, H, W)."""
        return self._vision(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of frozen image features (B, E)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor,
                frozen_features: torch.Tensor | None = None) -> DPTOutput:
        """images (B, 3, H, W), CLIP-normalised -> :class:`DPTOutput` with the logits only."""
        if frozen_features is None:
            frozen_features = self.encode_image_frozen(images)
        return DPTOutput(logits=self.logits_from_features(frozen_features))


__all__ = ["FrozenCLIPClassifier"]
