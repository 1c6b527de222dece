"""The learnable parts of DPT. Both models own exactly these modules, so their state_dicts match.

* :class:`TextPrompts` — CoOp's text context (authors' ``PromptLearner``).
* :class:`DeepVisualPrompts` — VPT-deep tokens (authors' ``VPTDeepPromptLearner``).
* :class:`ClassAwarePrompts` — CAVPT, one :class:`ClassAwarePromptLayer` per layer (authors'
  ``CAVPT`` "extractor").

The CLIP is frozen and not owned here; the trainable parameters are exactly the parameters of
these modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dpt_fast.config import DPTConfig
from dpt_fast.ops.class_aware_attention.reference import class_aware_attention_ref
from dpt_fast.tokenizer import ClipTokenizer

# (q (B, K, A), k (B, M, A), v (B, M, W), scale) -> (B, K, W)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def prompt_class_name(name: str) -> str:
    """Class names are written with spaces in prompts ("sea_lion" -> "sea lion")."""
    return name.replace("_", " ")


class TextPrompts(nn.Module):
    """Learnable context tokens placed around each class name in the text prompt.

    The prompt of class c is ``[SOS] ctx_1..ctx_M <name tokens> . [EOT] pad…`` for position
    "end"; "middle" splits the context in halves around the name, "front" puts the name first.

    Buffers (derived from the CLIP and the class names, not saved):
        token_ids: (C, T) token ids of the "end" layout; the EOT position is their arg-max and
            is the same in every layout.
        token_prefix: (C, 1, D) embedding of [SOS].
        token_suffix: (C, T - 1 - M, D) embeddings of the name, ".", [EOT] and padding.
    Parameter:
        ctx: (M, D) generic or (C, M, D) class-specific context.
    """

    token_ids: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor

    def __init__(
        self,
        token_embedding: nn.Embedding,
        tokenizer: ClipTokenizer,
        classnames: Sequence[str],
        config: DPTConfig,
        param_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        width = token_embedding.weight.shape[1]
        device = token_embedding.weight.device
        names = [prompt_class_name(c) for c in classnames]

        if config.text_ctx_init:
            words = config.text_ctx_init.replace("_", " ")
            n_ctx = len(words.split(" "))
            n_tokens = len(tokenizer.encode(words))
            if n_tokens != n_ctx:
                # The authors' code takes one embedding per word; a word split into several BPE
                # tokens would silently shift the class name. Refuse instead.
                raise ValueError(
                    f"DPTConfig.text_ctx_init {config.text_ctx_init!r} has {n_ctx} words but "
                    f"{n_tokens} BPE tokens; use words that are single tokens"
                )
            with torch.no_grad():
                init = token_embedding(tokenizer(words).to(device))[0, 1 : 1 + n_ctx]
            ctx = init.detach().clone()
            prefix_text = words
        else:
            n_ctx = config.n_text_ctx
            shape = (len(names), n_ctx, width) if config.class_specific_ctx else (n_ctx, width)
            ctx = torch.empty(shape, device=device, dtype=param_dtype)
            nn.init.normal_(ctx, std=config.init_std)
            prefix_text = " ".join(["X"] * n_ctx)

        prompts = [f"{prefix_text} {name}." for name in names]
        try:
            token_ids = tokenizer(prompts).to(device)
        except ValueError as err:
            raise ValueError(f"a class name is too long for the text prompt: {err}") from None
        with torch.no_grad():
            embedding = token_embedding(token_ids)

        self.ctx = nn.Parameter(ctx.to(param_dtype))
        self.n_ctx = n_ctx
        self.position = config.class_token_position
        self.name_lens = [len(tokenizer.encode(name)) for name in names]
        # Positions up to the last EOT: nothing after a prompt's EOT reaches its feature.
        self.used_length = int(token_ids.argmax(dim=-1).max()) + 1
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)

    @property
    def eot_index(self) -> torch.Tensor:
        """(C,) position of the end-of-text token in every prompt."""
        return self.token_ids.argmax(dim=-1)

    def class_context(self) -> torch.Tensor:
        """The context of every class, (C, M, D), in the embedding dtype."""
        ctx = self.ctx.to(self.token_prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return ctx

    def forward(self) -> torch.Tensor:
        """Prompt embeddings (C, T, D) before positional embeddings."""
        ctx = self.class_context()
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, name_len in enumerate(self.name_lens):
            name, rest = suffix[i, :name_len], suffix[i, name_len:]
            if self.position == "middle":
                parts = [prefix[i], ctx[i, :half], name, ctx[i, half:], rest]
            else:  # "front"
                parts = [prefix[i], name, ctx[i], rest]
            rows.append(torch.cat(parts, dim=0))
        return torch.stack(rows)


class DeepVisualPrompts(nn.Module):
    """VPT-deep: P learnable tokens for each of the first ``n_layers`` vision layers.

    Parameter:
        ctx: (n_layers, P, W), the same tokens for every image.
    """

    def __init__(self, n_layers: int, n_tokens: int, width: int, init_std: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        ctx = torch.empty(n_layers, n_tokens, width, device=device, dtype=dtype)
        nn.init.normal_(ctx, std=init_std)
        self.ctx = nn.Parameter(ctx)

    @property
    def n_layers(self) -> int:
        return self.ctx.shape[0]


class ClassAwarePromptLayer(nn.Module):
    """CAVPT for one vision layer: K class-aware prompt tokens per image and a layer classifier.

    Submodules (authors' names in brackets, see :mod:`dpt_fast.official`):
        query_proj: Linear(E -> W) [meta_nets.i] turns a selected class's learned text feature
            into a query token.
        attn_q, attn_k: Linear(W -> A, no bias) [attns.i.qmlp / kmlp]; attn_v: Linear(W -> W,
            no bias) [attns.i.vmlp], applied after the attention.
        norm_logits: LayerNorm(W) [lns.i] before ``classifier``: Linear(W -> C, no bias)
            [classfiers.i].
        norm_prompt: LayerNorm(W) [lns2.i] on attention output + query: the prompt tokens.
        ctx: (cavpt_n_ctx, W) learnable key/value tokens [ctx[i]].
    """

    def __init__(self, embed_dim: int, width: int, n_classes: int, config: DPTConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_proj = nn.Linear(embed_dim, width, **kw)
        self.attn_q = nn.Linear(width, config.cavpt_attn_dim, bias=False, **kw)
        self.attn_k = nn.Linear(width, config.cavpt_attn_dim, bias=False, **kw)
        self.attn_v = nn.Linear(width, width, bias=False, **kw)
        self.norm_logits = nn.LayerNorm(width, **kw)
        self.classifier = nn.Linear(width, n_classes, bias=False, **kw)
        self.norm_prompt = nn.LayerNorm(width, **kw)
        ctx = torch.empty(config.cavpt_n_ctx, width, **kw)
        nn.init.normal_(ctx, std=config.init_std)
        self.ctx = nn.Parameter(ctx)
        self.scale = 1.0 / math.sqrt(config.cavpt_attn_dim)

    def forward(
        self, tokens: torch.Tensor, class_text: torch.Tensor,
        attention: AttentionFn = class_aware_attention_ref,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens and layer logits for one layer.

        Args:
            tokens: (B, N, W) the layer's input image tokens; detached here (the authors' code
                does not let the CAVPT branch change the image path's gradients).
            class_text: (B, K, E) learned, unnormalised text features of the selected classes.
            attention: the softmax attention ``softmax(q kᵀ · scale) · v``; the
                reference formula by default, the fast model passes its fused op.
        Returns:
            prompts (B, K, W) to append to the layer's input, logits (B, K, C).
        """
        dtype = tokens.dtype
        kv = torch.cat(
            [tokens.detach(), self.ctx.to(dtype).expand(tokens.shape[0], -1, -1)], dim=1
        )  # (B, N + cavpt_n_ctx, W)
        query = self.query_proj(class_text.to(self.query_proj.weight.dtype))  # (B, K, W)
        q = self.attn_q(query)
        k = self.attn_k(kv.to(self.attn_k.weight.dtype))
        out = attention(q, k, kv.to(q.dtype), self.scale)
        out = self.attn_v(out.to(self.attn_v.weight.dtype))
        logits = self.classifier(self.norm_logits(out))
        prompts = self.norm_prompt(out + query)
        return prompts.to(dtype), logits


class ClassAwarePrompts(nn.Module):
    """CAVPT over the layers ``start..L-1`` (0-based): ``layers[i]`` serves layer start + i."""

    def __init__(self, n_layers: int, embed_dim: int, width: int, n_classes: int,
                 config: DPTConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ClassAwarePromptLayer(embed_dim, width, n_classes, config, device, dtype)
            for _ in range(n_layers)
        )
