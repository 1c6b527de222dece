"""The fast DPT is a drop-in for the reference: same state_dict, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from prompt_attention_checks import require_triton

import dpt_fast
from dpt_fast import DPT, DPTConfig
from dpt_fast.reference import DPT as ReferenceDPT

OUTPUT_FIELDS = ("logits", "layer_logits", "topk_indices", "logits_zeroshot_image",
                 "logits_handcrafted_text")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CONFIGS = {
    "dpt": DPTConfig(cavpt_top_k=3),
    "dpt-all-layers": DPTConfig(cavpt_start_layer=1, cavpt_top_k=4),
    "dpt-csc-front": DPTConfig(class_specific_ctx=True, class_token_position="front"),
    "dpt-middle": DPTConfig(class_token_position="middle", n_text_ctx=5),
    "coop": DPTConfig(method="coop"),
    "vpt": DPTConfig(method="vpt"),
    "vlp": DPTConfig(method="vlp"),
    "vlp-csc-middle": DPTConfig(method="vlp", class_specific_ctx=True,
                                class_token_position="middle"),
    "coop-init-words": DPTConfig(method="coop", text_ctx_init="a photo of a"),
}
LONG_NAMES = ["the quite extraordinarily long-winded name of a small brown bird species",
              "x", "sea_lion", "Boeing 737-800 (émirates)"]
CLASS_SETS = {"default": None, "one-class": ["cat"], "long-names": LONG_NAMES}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_reference(tiny_clip_model, classnames, images, labels, name):
    _check_parity(tiny_clip_model, classnames, images, labels, CONFIGS[name])


@pytest.mark.parametrize("class_set", ["one-class", "long-names"])
@pytest.mark.parametrize("name", ["dpt", "dpt-csc-front", "dpt-middle", "vlp"])
def test_fast_matches_reference_on_awkward_classes(tiny_clip_model, images, class_set, name):
    names = CLASS_SETS[class_set]
    labels = torch.arange(images.shape[0]) % len(names)
    _check_parity(tiny_clip_model, names, images, labels, CONFIGS[name])


def _check_parity(tiny_clip_model, classnames, images, labels, config):
    torch.manual_seed(1)
    ref = ReferenceDPT(tiny_clip_model, classnames, config)
    torch.manual_seed(2)
    fast = DPT(tiny_clip_model, classnames, config)
    fast.load_state_dict(ref.state_dict())  # strict: same keys, classes and config

    out_ref, out_fast = ref(images), fast(images)
    for field in OUTPUT_FIELDS:
        a, b = getattr(out_fast, field), getattr(out_ref, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        if field == "topk_indices":
            assert torch.equal(a, b)
        else:
            assert _rel_err(a, b) <= 1e-5, field
    loss_ref = ref.loss(out_ref, labels, epoch=0)
    loss_fast = fast.loss(out_fast, labels, epoch=0)
    assert _rel_err(loss_fast, loss_ref) <= 1e-5
    loss_ref.backward()
    loss_fast.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert grads_ref.keys() == grads_fast.keys()
    for key, g in grads_ref.items():
        if g.abs().sum() == 0:
            assert grads_fast[key].abs().sum() == 0, key
        else:
            assert _rel_err(grads_fast[key], g) <= 1e-4, key


def test_public_api_names():
    assert dpt_fast.DPT is DPT and dpt_fast.DPTConfig is DPTConfig
    from dpt_fast import DPTOutput
    from dpt_fast.reference import DPTOutput as RefOutput

    assert DPTOutput is RefOutput
    assert issubclass(DPT, torch.nn.Module)


def test_fast_matches_reference_through_the_triton_kernels(tiny_clip_model, classnames, images,
                                                           labels, monkeypatch):
    # The model-level check of the Triton path on CPU: kernels run in Triton's interpreter.
    require_triton("cpu")
    monkeypatch.setenv("DPT_FAST_BACKEND", "triton")
    _check_parity(tiny_clip_model, classnames, images[:2], labels[:2],
                  DPTConfig(cavpt_start_layer=3, cavpt_top_k=3, n_text_ctx=4))
