"""The fast CoCoOp: ``from dpt_fast import CoCoOp``, a drop-in for ``dpt_fast.reference.CoCoOp``.

Same constructor, forward, loss and state_dict as the reference (both are built on
:class:`~dpt_fast.cocoop.base.CoCoOpBase` and own the same prompt learner); the same numbers to
floating-point tolerance. The shortcuts (docs/DESIGN.md §2, 7) are exact:

1. the frozen image features run without autograd and with the CLS-only last layer (the
   evaluation passes them from the frozen-feature cache instead);
2. all images of the batch and all classes go through the text tower in one pass, never
   building the (B, C, 77, D) prompt tensor;
3. each image's ``[SOS] ctx`` prefix runs once for all its classes (batch B, not B·C);
4. the suffixes stop at the largest EOT position (causal mask: nothing later reaches an EOT);
5. the attention is the ``prompt_attention`` op (fused Triton kernels on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dpt_fast.cocoop.base import CoCoOpBase, normalize
from dpt_fast.cocoop.config import CoCoOpConfig
from dpt_fast.cocoop.text import ConditionedTextEncoder
from dpt_fast.fast.vision import PromptedVisionEncoder
from dpt_fast.tokenizer import ClipTokenizer


class CoCoOp(CoCoOpBase):
    """Fast CoCoOp; see :class:`dpt_fast.cocoop.base.CoCoOpBase` for the API.

    Needs open_clip's standard residual blocks; other block types raise ``TypeError`` at
    construction (the reference model runs them).
    """

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: CoCoOpConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__(clip, classnames, config, tokenizer=tokenizer)
        # Plain attributes, not submodules: they only read the (already registered) CLIP.
        self._vision = PromptedVisionEncoder(self.clip.visual)
        self._text = ConditionedTextEncoder(clip)

    @torch.no_grad()
    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features (B, E), with the CLS-only last layer."""
        return self._vision(images)

    def conditioned_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, E) normalised image features -> (B, C), every image and class at once."""
        logit_scale = self.clip.logit_scale.exp()
        context = self.prompt_learner.conditioned_context(image_features)  # (B, M, D)
        text = normalize(self._text(self.prompt_learner, context))  # (B, C, E)
        # The reference's (scale · image_b) @ text_bᵀ for every b as one batched product.
        scaled = (logit_scale * image_features).unsqueeze(1)  # (B, 1, E)
        return (scaled @ text.transpose(1, 2)).squeeze(1)
