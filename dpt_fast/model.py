"""The fast DPT: ``from dpt_fast import DPT``, a drop-in for ``dpt_fast.reference.DPT``.

Same constructor, forward, loss and state_dict as the reference (both are built on
:class:`~dpt_fast.base.DPTBase` and own the same prompt modules); the same numbers to
floating-point tolerance. It computes them with the exact shortcuts of docs/DESIGN.md §2:

1. prompts enter each attention as extra keys/values (``dpt_fast.ops.prompt_attention``: a fused
   Triton kernel on CUDA), never concatenated to the sequence;
2. deep-prompt K/V computed once per layer and broadcast over the batch;
3. the last vision layer computes query, output and MLP for the CLS token only;
4. the ``[SOS] ctx…`` text prefix runs once, every class's suffix attends to its K/V;
5. the text stops at the last EOT position;
6. in eval mode without autograd, text features are cached until the prompts change;

and the CAVPT attention runs the ``class_aware_attention`` op of the C++/CUDA extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpt_fast.base import DPTBase
from dpt_fast.config import DPTConfig
from dpt_fast.fast.text import SharedPrefixTextEncoder
from dpt_fast.fast.vision import PromptedVisionEncoder
from dpt_fast.ops import class_aware_attention
from dpt_fast.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from typing_extensions import Self


class DPT(DPTBase):
    """Fast Dual-modality Prompt Tuning; see :class:`dpt_fast.base.DPTBase` for the API.

    Needs open_clip's standard residual blocks (packed ``nn.MultiheadAttention``); other block
    types raise ``TypeError`` at construction (the reference model runs them).
    """

    def __init__(self, clip: nn.Module, classnames: Sequence[str],
                 config: DPTConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__(clip, classnames, config, tokenizer=tokenizer)
        # Plain attributes, not submodules: they only read the (already registered) CLIP.
        self._vision = PromptedVisionEncoder(self.clip.visual)
        self._text = SharedPrefixTextEncoder(clip) if self.text_prompts is not None else None
        # (key, context values, features) of the last eval-mode text encoding
        self._text_cache: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> Self:
        self._text_cache = None
        return super().train(mode)

    # ----------------------------------------------------------------------------- text
    def _text_cache_key(self) -> tuple[Any, ...]:
        assert self.text_prompts is not None  # only methods with text prompts encode them
        ctx = self.text_prompts.ctx
        device = ctx.device.type
        autocast = torch.is_autocast_enabled(device)
        return (ctx.device, ctx.dtype, autocast,
                torch.get_autocast_dtype(device) if autocast else None)

    def encode_learned_text(self) -> torch.Tensor:
        """Text features (C, E) of the learned prompts, shared prefix + truncated suffixes.

        Cached in eval mode when autograd is off, keyed on the context's values (so any update
        counts: an optimizer step, fused or not, ``load_state_dict``, a write through
        ``.data``), its device and dtype and the autocast state; ``train()`` drops it. Not
        cached inside torch.compile, whose graphs cannot hold the comparison.
        """
        # both exist exactly for methods with text prompts, the only ones that encode them
        assert self.text_prompts is not None and self._text is not None
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._text(self.text_prompts)
        ctx = self.text_prompts.ctx
        key = self._text_cache_key()
        cached = self._text_cache
        if cached is None or cached[0] != key or not torch.equal(cached[1], ctx):
            cached = (key, ctx.detach().clone(), self._text(self.text_prompts))
            self._text_cache = cached
        return cached[2]

    # ----------------------------------------------------------------------------- vision
    @torch.no_grad()
    def encode_image_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features (B, E), with the CLS-only last layer."""
        return self._vision(images)

    def encode_image_prompted(
        self, images: torch.Tensor, class_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.visual_prompts is None and self.cavpt is None:
            return self.encode_image_frozen(images), None
        layer_logits: list[torch.Tensor] = []

        def class_prompts(layer: int, tokens: torch.Tensor) -> torch.Tensor:
            assert self.cavpt is not None  # passed to the encoder only with CAVPT
            prompts, logits = self.cavpt.layers[layer - self.cavpt_start](
                tokens, class_text, class_aware_attention
            )
            layer_logits.append(logits)
            return prompts

        deep = self.visual_prompts.ctx if self.visual_prompts is not None else None
        features = self._vision(
            images, deep,
            class_prompts if self.cavpt is not None else None, self.cavpt_start,
        )
        stacked = torch.stack(layer_logits, dim=1) if layer_logits else None  # (B, Lc, K, C)
        return features, stacked
