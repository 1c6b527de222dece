"""Both open_clip block forms run in both models (dpt_fast.clip_interop).

open_clip ≤ 3.x blocks hold an ``nn.MultiheadAttention`` (batch-first or, before 2.24,
sequence-first); open_clip 4.x blocks hold its own batch-first ``Attention``
(tests/open_clip_next.py rebuilds a tiny CLIP to that structure). The reference model must equal
open_clip's own encoders on each; the fast model must equal the reference, or refuse the
optional features it does not decompose with a pointer to the reference.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip_next import FEATURES, next_clip, sequence_first_clip
from test_fast_parity import CONFIGS, _check_parity

from dpt_fast import DPT, DPTConfig
from dpt_fast.clip_interop import block_spec
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.testing import tiny_clip


def _encoders_match(clip, classnames, images):
    """The reference's frozen image and hand-crafted text features are open_clip's own."""
    template = "a photo of a {}."
    model = ReferenceDPT(clip, classnames, DPTConfig(template=template, cavpt_top_k=3))
    torch.testing.assert_close(model.encode_image_frozen(images), clip.encode_image(images),
                               rtol=1e-5, atol=1e-6)
    texts = [template.format(c.replace("_", " ")) for c in classnames]
    expected = F.normalize(clip.encode_text(open_clip.get_tokenizer("ViT-B-16")(texts)), dim=-1)
    torch.testing.assert_close(model.handcrafted_text_features, expected, rtol=1e-5, atol=1e-6)
    return model


def test_blocks_are_recognised_by_structure():
    spec = block_spec(tiny_clip().visual.transformer.resblocks[0])
    assert (spec.kind, spec.batch_first, spec.heads, spec.width) == ("multihead", True, 4, 64)
    spec = block_spec(sequence_first_clip().transformer.resblocks[0])
    assert (spec.kind, spec.batch_first, spec.heads, spec.width) == ("multihead", False, 2, 32)
    clip = next_clip()
    assert not hasattr(clip.visual.transformer, "batch_first")
    spec = block_spec(clip.visual.transformer.resblocks[0])
    assert spec == type(spec)("attention", True, 4, 64, ())
    spec = block_spec(next_clip(qk_norm=True, scale_attn=True).transformer.resblocks[1])
    assert [b.split(" ")[0] for b in spec.fast_blockers] == ["qk_norm", "scale_attn"]


# --- open_clip 4.x blocks -----------------------------------------------------------------------
@pytest.mark.parametrize("towers", [("vision", "text"), ("vision",), ("text",)])
def test_next_open_clip_reference_is_open_clip(classnames, images, towers):
    # Before, the layout was guessed sequence-first from the missing transformer.batch_first:
    # the text tower failed ("The size of tensor a (7) must match the size of tensor b (77)")
    # and a 4.x image tower ran silently wrong (images and tokens swapped).
    model = _encoders_match(next_clip(towers=towers), classnames, images)
    assert model(images).logits.isfinite().all()


@pytest.mark.parametrize("name", ["dpt", "dpt-all-layers", "dpt-csc-front", "vlp", "coop"])
def test_next_open_clip_fast_matches_reference(classnames, images, labels, name):
    # Before: the fast DPT refused every block that was not an nn.MultiheadAttention.
    _check_parity(next_clip(), classnames, images, labels, CONFIGS[name])


@pytest.mark.parametrize("feature", FEATURES)
def test_next_open_clip_optional_features(classnames, images, feature):
    clip = next_clip(**{feature: True})
    _encoders_match(clip, classnames, images)  # the reference runs them as open_clip does
    with pytest.raises(TypeError, match=rf"vision block 0 .*{feature}.*dpt_fast\.reference\.DPT"):
        DPT(clip, classnames)
    with pytest.raises(TypeError, match=rf"text block 0 .*{feature}.*dpt_fast\.reference\.DPT"):
        DPT(next_clip(towers=("text",), **{feature: True}), classnames)


def test_non_default_attention_scale_is_refused_by_the_fast_model(classnames, images):
    clip = next_clip()
    clip.visual.transformer.resblocks[2].attn.scale = 0.1
    _encoders_match(clip, classnames, images)
    with pytest.raises(TypeError, match=r"vision block 2 .*scale of 0\.1.*dpt_fast\.reference"):
        DPT(clip, classnames)


# --- open_clip 3.x forms ------------------------------------------------------------------------
def test_sequence_first_multihead_blocks(classnames, images, labels):
    # The layout comes from each nn.MultiheadAttention, as open_clip < 2.24 built them.
    clip = sequence_first_clip()
    _encoders_match(clip, classnames, images)
    _check_parity(clip, classnames, images, labels, CONFIGS["dpt-all-layers"])


def test_open_clip_3_custom_blocks_with_its_attention(classnames, images, labels):
    # scale_fc builds open_clip 3.x's CustomResidualAttentionBlock around its own Attention (a
    # LayerNorm inside the MLP, which the fast model runs as part of block.mlp).
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8,
                                           image_size=16, scale_fc=True),
        text_cfg=open_clip.CLIPTextCfg(width=32, heads=2, layers=1),
    ).eval()
    assert block_spec(clip.visual.transformer.resblocks[0]).kind == "attention"
    small = images[:, :, :16, :16]
    _encoders_match(clip, classnames, small)
    _check_parity(clip, classnames, small, labels, CONFIGS["dpt-all-layers"])


def test_unknown_attention_is_refused_by_both_models(classnames):
    clip = next_clip()
    clip.visual.transformer.resblocks[1].attn = torch.nn.Linear(64, 64)
    for cls in (ReferenceDPT, DPT):
        with pytest.raises(TypeError, match=r"no attention it recognises \(\.attn is Linear"):
            cls(clip, classnames)
