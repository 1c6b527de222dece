"""The ``linear_probe`` method's model: the frozen CLIP's image feature, then a linear layer.

The layer is fitted outside (:mod:`dpt_fast.linear_probe.search`: scikit-learn's logistic
regression on the unnormalised image features, as lpclip's ``feat_extractor.py`` saves them)
and set with :meth:`LinearProbeCLIP.set_classifier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dpt_fast.config import DPTConfig
from dpt_fast.frozen_classifier import FrozenCLIPClassifier


class LinearProbeCLIP(FrozenCLIPClassifier):
    """``logits = image_feature · Wᵀ + b`` on the frozen CLIP's unnormalised image features."""

    weight: torch.Tensor  # (C, E) buffer
    bias: torch.Tensor  # (C,) buffer

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: DPTConfig | None = None) -> None:
        super().__init__(clip, classnames, config, "linear_probe")
        width = self.geometry.embed_dim
        # (C, E) and (C,): zero until fitted.
        self.register_buffer("weight", torch.zeros(len(self.classnames), width))
        self.register_buffer("bias", torch.zeros(len(self.classnames)))

    def set_classifier(self, classifier: Any) -> None:
        """Take a fitted scikit-learn ``LogisticRegression`` (labels 0 … C-1) as the layer.

        A two-class fit has one row of coefficients (the second class's score minus the
        first's): it becomes the rows (0, w) so that the argmax is the same.
        """
        coef, intercept = np.asarray(classifier.coef_), np.asarray(classifier.intercept_)
        classes = [int(c) for c in classifier.classes_]
        if coef.shape[0] == 1 and len(classes) == 2:
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        weight = torch.zeros_like(self.weight, dtype=torch.float64)
        bias = torch.full_like(self.bias, -torch.inf, dtype=torch.float64)  # unseen classes
        weight[classes] = torch.from_numpy(coef).to(torch.float64)
        bias[classes] = torch.from_numpy(intercept).to(torch.float64)
        self.weight = weight.to(self.weight.device)
        self.bias = bias.to(self.bias.device)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of frozen image features (B, E), in float64 as scikit-learn's."""
        return features.to(self.weight) @ self.weight.t() + self.bias


__all__ = ["LinearProbeCLIP"]
