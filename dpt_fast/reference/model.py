"""The reference DPT: exactly the authors' computation, in plain PyTorch.

Prompt tokens are concatenated to the sequence before a layer and cut off after it; the text
encoder runs all T (77) positions for every class; the image goes through the tower twice
(frozen for the zero-shot selection, prompted for the logits). It is the oracle the fast model
is tested against, and deliberately does none of the fast model's shortcuts.
"""

from __future__ import annotations

import torch

from dpt_fast.base import DPTBase
from dpt_fast.clip_interop import (
    run_block,
    text_head,
    text_positions,
    text_transformer,
    vision_embed,
    vision_head,
)
from dpt_fast.ops.class_aware_attention.reference import class_aware_attention_ref


class DPT(DPTBase):
    """Reference Dual-modality Prompt Tuning; see :class:`dpt_fast.base.DPTBase` for the API."""

    def encode_learned_text(self) -> torch.Tensor:
        """Full causal text encoder over the C learned prompts -> (C, E)."""
        assert self.text_prompts is not None  # only methods with text prompts encode them
        prompts = self.text_prompts()  # (C, T, D)
        x = text_transformer(self.clip, text_positions(self.clip, prompts))
        return text_head(self.clip, x, self.text_prompts.eot_index)

    def encode_image_prompted(
        self, images: torch.Tensor, class_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.visual_prompts is None and self.cavpt is None:
            # Nothing to insert (CoOp): the prompted image is the frozen image, and no
            # parameter reaches it, so no graph is kept.
            return self.encode_image_frozen(images), None
        visual = self.clip.visual
        x = vision_embed(visual, images)  # (B, N, W)
        batch, n_tokens = x.shape[:2]
        deep = self.visual_prompts
        n_deep = deep.n_layers if deep is not None else 0
        layer_logits = []
        for i, block in enumerate(visual.transformer.resblocks):
            if deep is not None and i < n_deep:
                extra = deep.ctx[i].to(x.dtype).expand(batch, -1, -1)
            elif self.cavpt is not None and i >= self.cavpt_start:
                extra, logits = self.cavpt.layers[i - self.cavpt_start](
                    x, class_text, class_aware_attention_ref
                )
                layer_logits.append(logits)
            else:
                x = run_block(block, x)
                continue
            # Append the layer's prompt tokens, run the layer, drop their outputs.
            x = run_block(block, torch.cat([x, extra.to(x.dtype)], dim=1))
            x = x[:, :n_tokens]
        stacked = torch.stack(layer_logits, dim=1) if layer_logits else None  # (B, Lc, K, C)
        return vision_head(visual, x), stacked
