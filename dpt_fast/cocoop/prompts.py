"""CoCoOp's learnable part: the shared context and the meta-net (authors' ``PromptLearner``).

The prompt of class c for image b is ``[SOS] (ctx_1 + π_b) … (ctx_M + π_b) <name c> . [EOT]``
where π_b = meta_net(normalised image feature of b) is one bias vector per image added to every
context token. The fixed token embeddings (``token_prefix``, ``token_suffix``) and the context
are :class:`dpt_fast.prompts.TextPrompts`' (same tokenisation, same initialisation), so the
parameter names are the authors': ``ctx``, ``meta_net.linear1.*``, ``meta_net.linear2.*``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from dpt_fast.cocoop.config import CoCoOpConfig
from dpt_fast.config import DPTConfig
from dpt_fast.prompts import TextPrompts
from dpt_fast.tokenizer import ClipTokenizer


def _text_prompt_config(config: CoCoOpConfig) -> DPTConfig:
    """The CoOp text-prompt settings CoCoOp's prompts are built with: a generic context at the
    end of the prompt, from words or random."""
    return DPTConfig(method="coop", n_text_ctx=max(config.n_ctx, 1),
                     text_ctx_init=config.ctx_init, init_std=config.init_std)


class CoCoOpPrompts(TextPrompts):
    """Context (M, D), meta-net E -> E // reduction -> D, and the fixed prompt embeddings.

    Buffers (see :class:`TextPrompts`): ``token_ids`` (C, T), ``token_prefix`` (C, 1, D),
    ``token_suffix`` (C, T - 1 - M, D). Parameters: ``ctx`` (M, D); ``meta_net``.
    """

    # Registered by TextPrompts; declared here for the type checker.
    token_ids: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    ctx: nn.Parameter

    def __init__(self, token_embedding: nn.Embedding, tokenizer: ClipTokenizer,
                 classnames: Sequence[str], config: CoCoOpConfig, embed_dim: int,
                 param_dtype: torch.dtype) -> None:
        try:
            super().__init__(token_embedding, tokenizer, classnames,
                             _text_prompt_config(config), param_dtype)
        except ValueError as err:
            raise ValueError(str(err).replace("DPTConfig.text_ctx_init", "CoCoOpConfig.ctx_init")
                             ) from None
        hidden = embed_dim // config.meta_net_reduction
        if hidden < 1:
            raise ValueError(
                f"CoCoOpConfig.meta_net_reduction={config.meta_net_reduction} leaves no hidden "
                f"unit for image features of size {embed_dim}: use at most {embed_dim}"
            )
        width = token_embedding.weight.shape[1]
        device = token_embedding.weight.device
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed_dim, hidden, device=device, dtype=param_dtype)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width, device=device, dtype=param_dtype)),
        ]))

    def conditioned_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """ctx + meta_net(image features): (B, E) normalised features -> (B, M, D), in the
        embedding dtype (the meta-net and the sum run in the parameters' dtype, or autocast's).
        """
        bias = self.meta_net(image_features.to(self.ctx.dtype))  # (B, D)
        shifted = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, M, D)
        return shifted.to(self.token_prefix.dtype)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The authors' prompt tensor: (B, E) -> (B, C, T, D), every class's full prompt with
        each image's context (what the reference encodes; the fast model never builds it)."""
        prefix, suffix = self.token_prefix, self.token_suffix
        n_cls = prefix.shape[0]
        prompts = []
        for ctx_i in self.conditioned_context(image_features):
            ctx_i = ctx_i.unsqueeze(0).expand(n_cls, -1, -1)
            prompts.append(torch.cat([prefix, ctx_i, suffix], dim=1))
        return torch.stack(prompts)
