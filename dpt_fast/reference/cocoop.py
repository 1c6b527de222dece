"""The reference CoCoOp: the authors' computation (``trainers/cocoop.py``), in plain PyTorch.

Image features are normalised before the meta-net; each image's context (ctx + its meta-net
bias) is put into the full 77-token prompt of every class; then, one image at a time, the text
encoder runs over its C prompts and the image is compared with their normalised features. It is
the oracle the fast :class:`dpt_fast.CoCoOp` is tested against and does none of its shortcuts.
"""

from __future__ import annotations

import torch

from dpt_fast.clip_interop import text_head, text_positions, text_transformer
from dpt_fast.cocoop.base import CoCoOpBase, normalize


class CoCoOp(CoCoOpBase):
    """Reference CoCoOp; see :class:`dpt_fast.cocoop.base.CoCoOpBase` for the API."""

    def conditioned_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, E) normalised image features -> (B, C): the authors' per-image loop."""
        logit_scale = self.clip.logit_scale.exp()
        prompts = self.prompt_learner(image_features)  # (B, C, T, D)
        eot = self.prompt_learner.eot_index
        logits = []
        for pts_i, imf_i in zip(prompts, image_features, strict=True):
            x = text_transformer(self.clip, text_positions(self.clip, pts_i))
            text_features = normalize(text_head(self.clip, x, eot))  # (C, E)
            logits.append(logit_scale * imf_i @ text_features.t())
        return torch.stack(logits)
