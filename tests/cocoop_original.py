"""The authors' CoCoOp forward (``KaiyangZhou/CoOp`` ``trainers/cocoop.py``: ``PromptLearner``,
``TextEncoder``, ``CustomCLIP``), restated step by step on an open_clip CLIP for the tests.

It runs open_clip's own modules (``clip.visual``, ``clip.transformer`` with ``clip.attn_mask``),
not dpt_fast's piecewise helpers, so it is an independent statement of what the authors compute:

* context from the embeddings of the ``ctx_init`` words (tokens 1..M of the tokenised words),
  or random with std 0.02 and "X X X X" in the prompt; prompts "<ctx words> <name>.";
* meta-net ``linear1 (E -> E // 16) -> ReLU -> linear2 (E // 16 -> D)``;
* the image feature is normalised BEFORE the meta-net; ctx + bias per image;
* per image: its C full 77-token prompts through the text tower, EOT by arg-max, normalised,
  ``logit_scale.exp() * image @ text.T``; in training mode the module returns the
  cross-entropy, in eval mode the logits.

``state_dict()`` of :attr:`OriginalCoCoOp.prompt_learner` has the authors' keys (``ctx``,
``meta_net.*``, and the ``token_prefix``/``token_suffix`` buffers that their checkpoints hold).
"""

from __future__ import annotations

from collections import OrderedDict

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


class OriginalPromptLearner(nn.Module):
    def __init__(self, classnames: list[str], clip: nn.Module, n_ctx: int = 4,
                 ctx_init: str = "a photo of a") -> None:
        super().__init__()
        dtype = clip.token_embedding.weight.dtype
        ctx_dim = clip.ln_final.weight.shape[0]
        vis_dim = clip.visual.output_dim
        if ctx_init:
            words = ctx_init.replace("_", " ")
            n_ctx = len(words.split(" "))
            with torch.no_grad():
                emb = clip.token_embedding(open_clip.tokenize(words)).type(dtype)
            ctx = emb[0, 1 : 1 + n_ctx, :]
            prefix_words = words
        else:
            ctx = torch.empty(n_ctx, ctx_dim, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            prefix_words = " ".join("X" for _ in range(n_ctx))
        self.ctx = nn.Parameter(ctx)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ]))
        texts = [f"{prefix_words} {name.replace('_', ' ')}." for name in classnames]
        self.tokenized = torch.cat([open_clip.tokenize(t) for t in texts])  # (C, 77)
        with torch.no_grad():
            emb = clip.token_embedding(self.tokenized).type(dtype)
        self.register_buffer("token_prefix", emb[:, :1, :])
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :, :])
        self.n_cls = len(classnames)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        bias = self.meta_net(image_features).unsqueeze(1)  # (B, 1, D)
        shifted = self.ctx.unsqueeze(0) + bias  # (B, M, D)
        per_image = []
        for ctx_b in shifted:
            ctx_b = ctx_b.unsqueeze(0).expand(self.n_cls, -1, -1)
            per_image.append(torch.cat([self.token_prefix, ctx_b, self.token_suffix], dim=1))
        return torch.stack(per_image)  # (B, C, 77, D)


class OriginalCoCoOp(nn.Module):
    def __init__(self, classnames: list[str], clip: nn.Module, **kw) -> None:
        super().__init__()
        self.prompt_learner = OriginalPromptLearner(classnames, clip, **kw)
        self.clip = clip
        clip.requires_grad_(False)

    def encode_text(self, prompts: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        x = prompts + clip.positional_embedding.type(prompts.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)  # open_clip 3.x: batch first
        x = clip.ln_final(x)
        eot = self.prompt_learner.tokenized.argmax(dim=-1)
        return x[torch.arange(x.shape[0]), eot] @ clip.text_projection

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        logit_scale = self.clip.logit_scale.exp()
        image_features = self.clip.visual(image)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        prompts = self.prompt_learner(image_features)
        logits = []
        for pts_i, imf_i in zip(prompts, image_features, strict=True):
            text = self.encode_text(pts_i)
            text = text / text.norm(dim=-1, keepdim=True)
            logits.append(logit_scale * imf_i @ text.t())
        logits = torch.stack(logits)
        if self.prompt_learner.training:
            return F.cross_entropy(logits, label)
        return logits
