"""Token ids are those of CLIP's tokenizer (the authors' clip.tokenize), errors on overflow."""

from __future__ import annotations

import open_clip
import pytest
import torch

from dpt_fast.tokenizer import ClipTokenizer

TEXTS = [
    "a photo of a sea lion.",
    "X X X X X X X X X X X X X X X X Golden  Retriever.",
    "a centered satellite photo of Annual Crop Land.",
    "a photo of a person doing Apply_Eye_Makeup.",
    "Boeing 737-800 (émirates)",
]


def test_ids_match_open_clip_tokenizer():
    ours = ClipTokenizer()(TEXTS)
    theirs = open_clip.get_tokenizer("ViT-B-16")(TEXTS)
    assert ours.dtype == torch.long and ours.shape == (len(TEXTS), 77)
    assert torch.equal(ours, theirs)


def test_known_ids():
    ids = ClipTokenizer()("a photo of a cat.")[0]
    # [SOT] a photo of a cat . [EOT] — CLIP's BPE ids
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert ids[8:].eq(0).all()


def test_overflow_raises_instead_of_truncating():
    with pytest.raises(ValueError, match="more than the CLIP context length 77"):
        ClipTokenizer()("word " * 80)
