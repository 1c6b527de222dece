"""CLIP BPE tokenisation exactly as the authors' ``clip.tokenize`` does it.

open_clip ships the same byte-pair vocabulary and text cleaning (ftfy, whitespace, lower case) as
OpenAI's ``clip`` package, so the same strings give the same ids. Unlike open_clip's tokenizer,
which truncates silently, a text longer than the context raises an error, as ``clip.tokenize``
does by default: a truncated prompt would lose its class name or its end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer


class ClipTokenizer:
    """Tokenises text to ``[SOT] tokens… [EOT] 0…`` id rows of a fixed context length."""

    def __init__(self, context_length: int = 77) -> None:
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id
        self.vocab_size = len(self._bpe.encoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        return self._bpe.encode(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids, shape (len(texts), context_length), dtype long."""
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                raise ValueError(
                    f"text needs {len(ids)} tokens, more than the CLIP context length "
                    f"{self.context_length}: {text!r}. Shorten the class name or use fewer "
                    "context tokens (n_text_ctx)."
                )
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows
