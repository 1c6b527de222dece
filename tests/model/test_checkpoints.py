"""state_dict round trips and strict refusals; the authors' checkpoint format."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from official_fixtures import _write_official

from dpt_fast.config import DPTConfig
from dpt_fast.official import TEXT_PART
from dpt_fast.reference import DPT


def _model(clip, classnames, seed, **kw):
    torch.manual_seed(seed)
    return DPT(clip, classnames, DPTConfig(**kw))


def _assert_same_prompts(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_state_dict_holds_prompts_not_clip(tiny_clip_model, classnames):
    model = _model(tiny_clip_model, classnames, 0)
    keys = set(model.state_dict())
    assert not any(k.startswith("clip.") for k in keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= keys
    assert keys - trainable == {"dpt_meta.classnames", "dpt_meta.config"}


def test_state_dict_round_trip(tiny_clip_model, classnames, images):
    a = _model(tiny_clip_model, classnames, 0)
    b = _model(tiny_clip_model, classnames, 1)
    assert not torch.equal(a.text_prompts.ctx, b.text_prompts.ctx)
    result = b.load_state_dict(a.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_prompts(a, b)
    torch.testing.assert_close(a(images).logits, b(images).logits, rtol=0, atol=0)


def test_nested_state_dict_round_trip(tiny_clip_model, classnames):
    outer_a = torch.nn.ModuleDict({"dpt": _model(tiny_clip_model, classnames, 0)})
    outer_b = torch.nn.ModuleDict({"dpt": _model(tiny_clip_model, classnames, 1)})
    state = outer_a.state_dict()
    assert "dpt.dpt_meta.config" in state and not any(".clip." in k for k in state)
    outer_b.load_state_dict(state)
    _assert_same_prompts(outer_a["dpt"], outer_b["dpt"])


def test_nested_non_strict_load_reports_instead_of_raising(tiny_clip_model, classnames):
    outer = torch.nn.ModuleDict({"dpt": _model(tiny_clip_model, classnames, 0)})
    other = torch.nn.ModuleDict(
        {"dpt": _model(tiny_clip_model, [*classnames[:-1], "helicopter"], 1)})
    with pytest.raises(RuntimeError, match="'helicopter'"):
        outer.load_state_dict(other.state_dict())
    result = outer.load_state_dict(other.state_dict(), strict=False)
    assert any("helicopter" in key for key in result.unexpected_keys)
    loaded, source = outer["dpt"].state_dict(), other["dpt"].state_dict()
    for key in (k for k in source if not k.startswith("dpt_meta.")):
        assert torch.equal(loaded[key], source[key]), key


def test_loading_other_classes_names_the_difference(tiny_clip_model, classnames):
    a = _model(tiny_clip_model, classnames, 0)
    other = _model(tiny_clip_model, [*classnames[:-1], "helicopter"], 0)
    with pytest.raises(RuntimeError, match=r"class 6 is 'helicopter'.*'airliner'"):
        a.load_state_dict(other.state_dict())
    fewer = _model(tiny_clip_model, classnames[:3], 0)
    with pytest.raises(RuntimeError, match="made for 3 classes, this model has 7"):
        a.load_state_dict(fewer.state_dict())


def test_loading_other_config_names_the_field(tiny_clip_model, classnames):
    a = _model(tiny_clip_model, classnames, 0)
    other = _model(tiny_clip_model, classnames, 0, n_text_ctx=8)
    with pytest.raises(RuntimeError, match=r"DPTConfig\.n_text_ctx is 8 in the state_dict, 16"):
        a.load_state_dict(other.state_dict())
    # the loss-only fields and the init-only std do not matter
    a.load_state_dict(_model(tiny_clip_model, classnames, 2, alpha=1.0).state_dict())
    trained = _model(tiny_clip_model, classnames, 3, init_std=0.5)
    a.load_state_dict(trained.state_dict())
    loaded, source = a.state_dict(), trained.state_dict()
    assert all(torch.equal(loaded[key], source[key]) for key in source
               if not key.startswith("dpt_meta."))


def test_loading_a_foreign_state_dict_is_refused(tiny_clip_model, classnames):
    a = _model(tiny_clip_model, classnames, 0)
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("dpt_meta")}
    with pytest.raises(RuntimeError, match="not written by dpt_fast"):
        a.load_state_dict(state)
    a.load_state_dict(state, strict=False)  # explicit opt-out loads the tensors


def test_official_checkpoint_round_trip(tiny_clip_model, classnames, tmp_path):
    source = _model(tiny_clip_model, classnames, 0, cavpt_start_layer=2)
    _write_official(source, tmp_path)
    target = _model(tiny_clip_model, classnames, 1, cavpt_start_layer=2)
    target.load_official_checkpoint(tmp_path)
    theirs = dict(target.named_parameters())
    for name, p in source.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(theirs[name], p.detach().half().float(), rtol=0, atol=0,
                                       msg=name)


def test_official_checkpoint_by_epoch(tiny_clip_model, classnames, tmp_path):
    source = _model(tiny_clip_model, classnames, 0)
    _write_official(source, tmp_path, filename="model.pth.tar-50", dtype=torch.float32)
    target = _model(tiny_clip_model, classnames, 1)
    with pytest.raises(FileNotFoundError, match=r"model-best\.pth\.tar"):
        target.load_official_checkpoint(tmp_path)
    target.load_official_checkpoint(tmp_path, epoch=50)
    _assert_same_prompts(source, target)


def test_official_checkpoint_for_other_classes(tiny_clip_model, classnames, tmp_path):
    source = _model(tiny_clip_model, classnames, 0)
    _write_official(source, tmp_path, dtype=torch.float32, n_classes=5)
    target = _model(tiny_clip_model, classnames, 1)
    before = target.cavpt.layers[0].classifier.weight.detach().clone()
    text_before = target.text_prompts.ctx.detach().clone()
    with pytest.raises(ValueError, match=r"classfiers.0.weight.*\(5, 64\).*\(7, 64\)"):
        target.load_official_checkpoint(tmp_path)
    assert torch.equal(target.text_prompts.ctx, text_before)  # nothing copied on failure
    target.load_official_checkpoint(tmp_path, load_layer_classifiers=False)
    assert torch.equal(target.cavpt.layers[0].classifier.weight, before)
    assert torch.equal(target.text_prompts.ctx, source.text_prompts.ctx)


def test_official_checkpoint_structure_mismatch(tiny_clip_model, classnames, tmp_path):
    source = _model(tiny_clip_model, classnames, 0, cavpt_start_layer=2)
    _write_official(source, tmp_path)
    target = _model(tiny_clip_model, classnames, 1)  # CAVPT in one layer only
    with pytest.raises(ValueError, match="unexpected"):
        target.load_official_checkpoint(tmp_path)


def test_official_checkpoint_refuses_code(tiny_clip_model, classnames, tmp_path):
    target = _model(tiny_clip_model, classnames, 1, method="coop")
    os.makedirs(tmp_path / TEXT_PART)
    torch.save({"state_dict": {"ctx": torch.zeros(16, 32)}, "extra": argparse.Namespace(a=1)},
               tmp_path / TEXT_PART / "model-best.pth.tar")
    with pytest.raises(ValueError, match=r"not loadable.*argparse\.Namespace") as info:
        target.load_official_checkpoint(tmp_path)
    assert "weights_only" not in str(info.value) and "allowlist" not in str(info.value)


def test_non_strict_load_takes_what_fits_and_returns_the_rest(tiny_clip_model, classnames):
    # As the docstring says: tensors of another shape are left out and reported, not raised.
    source = _model(tiny_clip_model, classnames, 0)
    target = _model(tiny_clip_model, classnames[:4], 1)
    result = target.load_state_dict(source.state_dict(), strict=False)
    classifier = "cavpt.layers.0.classifier.weight"
    assert result.missing_keys == [classifier]
    assert any(k.startswith(f"{classifier} (shape (7, ") for k in result.unexpected_keys)
    assert any("made for 7 classes" in k for k in result.unexpected_keys)
    for key, value in source.state_dict().items():
        if key != classifier and not key.startswith("dpt_meta."):
            assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match=r"classifier.weight \(shape \(7, "):
        target.load_state_dict(source.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_state_dict_with_non_finite_values_is_refused_by_name(tiny_clip_model, classnames, bad):
    model = _model(tiny_clip_model, classnames, 0)
    state = model.state_dict()
    state["visual_prompts.ctx"][1, 2, 3] = bad
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"visual_prompts\.ctx holds NaN or infinite"):
            model.load_state_dict(state, strict=strict)


def test_class_names_that_tokenise_alike_are_refused(tiny_clip_model):
    with pytest.raises(ValueError, match="same prompt tokens"):
        DPT(tiny_clip_model, ["Red_Plain  square", "red plain square"])
    with pytest.raises(ValueError, match="same prompt tokens"):
        DPT(tiny_clip_model, ["sea_lion", "Sea Lion"])
    DPT(tiny_clip_model, ["red plain square", "red plaid square"])  # distinct tokens
