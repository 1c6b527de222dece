"""CoCoOp: the fast model against the reference and both against the authors' forward
(``tests/cocoop_original.py``); state_dict and ``dpt-fast`` checkpoint round trips; config errors.
"""

from __future__ import annotations

import pytest
import torch
from cocoop_original import OriginalCoCoOp

from dpt_fast import CoCoOp, CoCoOpConfig
from dpt_fast.reference import CoCoOp as ReferenceCoCoOp
from dpt_fast.testing import tiny_clip

# DESIGN §5: fp32 on CPU, relative error of outputs ≤ 1e-5, of gradients ≤ 1e-4.
OUT_RTOL, GRAD_RTOL = 1e-5, 1e-4
LONG_NAMES = ["the quite extraordinarily long-winded name of a small brown bird species",
              "x", "sea_lion", "Boeing 737-800 (émirates)"]


@pytest.fixture(scope="module")
def clip64():
    """A tiny CLIP whose image features (64) leave the authors' meta-net 4 hidden units."""
    return tiny_clip(embed_dim=64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _step(model, images, labels):
    """Logits, loss and the gradients of every trainable parameter, in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images)
    loss = model.loss(out, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), loss.detach(), grads


CONFIGS = {
    "authors": CoCoOpConfig(),
    "random-ctx": CoCoOpConfig(ctx_init="", n_ctx=6),
    "one-ctx-word": CoCoOpConfig(ctx_init="photo", meta_net_reduction=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("class_set", ["default", "one-class", "long-names"])
def test_fast_matches_reference(clip64, classnames, images, name, class_set):
    names = {"default": classnames, "one-class": ["cat"], "long-names": LONG_NAMES}[class_set]
    labels = torch.arange(images.shape[0]) % len(names)
    torch.manual_seed(1)
    ref = ReferenceCoCoOp(clip64, names, CONFIGS[name])
    torch.manual_seed(2)
    fast = CoCoOp(clip64, names, CONFIGS[name])
    fast.load_state_dict(ref.state_dict())  # strict: same keys, classes and config
    logits_r, loss_r, grads_r = _step(ref, images, labels)
    logits_f, loss_f, grads_f = _step(fast, images, labels)
    assert logits_f.shape == (images.shape[0], len(names))
    assert _rel_err(logits_f, logits_r) <= OUT_RTOL
    assert _rel_err(loss_f, loss_r) <= OUT_RTOL
    assert grads_f.keys() == grads_r.keys() == {
        "prompt_learner.ctx", "prompt_learner.meta_net.linear1.weight",
        "prompt_learner.meta_net.linear1.bias", "prompt_learner.meta_net.linear2.weight",
        "prompt_learner.meta_net.linear2.bias"}
    for key, grad in grads_r.items():
        # a zero gradient would compare trivially (one class: the cross-entropy is constant 0)
        assert grad.norm() > 0 or len(names) == 1, key
        assert _rel_err(grads_f[key], grad) <= GRAD_RTOL, key


def test_eval_with_frozen_features_is_the_same(clip64, classnames, images):
    fast = CoCoOp(clip64, classnames).eval()
    with torch.no_grad():
        frozen = fast.encode_image_frozen(images)
        a = fast(images).logits
        b = fast(images, frozen_features=frozen).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"frozen_features must have shape \(4, 64\)"):
        fast(images, frozen_features=frozen[:, :3])


def test_frozen_image_pass_keeps_no_graph(clip64, classnames, images, labels):
    # The image features reach the loss only through the meta-net: no graph in the CLIP.
    fast = CoCoOp(clip64, classnames).train()
    assert not fast.encode_image_frozen(images).requires_grad
    assert not any(p.requires_grad for p in fast.clip.parameters())
    assert set(fast.parameter_groups()) == {"prompt_learner"}
    assert len(fast.parameter_groups()["prompt_learner"]) == 5


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("name", ["authors", "random-ctx"])
def test_matches_the_authors_forward(clip64, classnames, images, labels, impl, name):
    """Same parameters in the authors' module and ours: same logits (eval) and loss (train)."""
    config = CONFIGS[name]
    torch.manual_seed(3)
    original = OriginalCoCoOp(classnames, clip64, n_ctx=config.n_ctx, ctx_init=config.ctx_init)
    cls = CoCoOp if impl == "fast" else ReferenceCoCoOp
    ours = cls(clip64, classnames, config)
    state = {k: v for k, v in original.prompt_learner.state_dict().items()
             if not k.startswith("token_")}
    with torch.no_grad():
        for key, value in state.items():
            ours.prompt_learner.get_parameter(key).copy_(value)
    # The buffers the authors build from the class names are ours too.
    assert torch.equal(ours.prompt_learner.token_prefix, original.prompt_learner.token_prefix)
    assert torch.equal(ours.prompt_learner.token_suffix, original.prompt_learner.token_suffix)
    if config.ctx_init:  # initialised from the same words
        assert torch.equal(cls(clip64, classnames, config).prompt_learner.ctx,
                           original.prompt_learner.ctx)
    original.eval()
    with torch.no_grad():
        logits_o = original(images)
        logits = ours.eval()(images).logits
    assert _rel_err(logits, logits_o) <= OUT_RTOL
    original.train()
    loss_o = original(images, labels)
    loss_o.backward()
    _, loss, grads = _step(ours, images, labels)
    assert _rel_err(loss, loss_o.detach()) <= OUT_RTOL
    for key, param in original.prompt_learner.named_parameters():
        assert _rel_err(grads[f"prompt_learner.{key}"], param.grad) <= GRAD_RTOL, key


def test_state_dict_round_trip_between_models(clip64, classnames, images):
    torch.manual_seed(4)
    fast = CoCoOp(clip64, classnames)
    with torch.no_grad():
        fast.prompt_learner.ctx.add_(0.1)
    state = fast.state_dict()
    assert not any(k.startswith("clip.") for k in state)
    ref = ReferenceCoCoOp(clip64, classnames)
    ref.load_state_dict(state)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_state_dict_of_other_config_or_classes_is_refused(clip64, classnames):
    state = CoCoOp(clip64, classnames).state_dict()
    with pytest.raises(RuntimeError, match=r"CoCoOpConfig\.ctx_init is 'a photo of a'"):
        CoCoOp(clip64, classnames, CoCoOpConfig(ctx_init="", n_ctx=4)).load_state_dict(state)
    with pytest.raises(RuntimeError, match="made for 7 classes, this model has 3"):
        CoCoOp(clip64, classnames[:3]).load_state_dict(state)


def test_from_checkpoint_round_trip(clip64, classnames, images, tmp_path):
    from dpt_fast.checkpoint import save_checkpoint

    torch.manual_seed(5)
    model = CoCoOp(clip64, classnames, CONFIGS["random-ctx"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    path = tmp_path / "checkpoint-1.safetensors"
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    epoch=0, info={"config": {"model": {"method": "cocoop"}}})
    for cls in (CoCoOp, ReferenceCoCoOp):
        loaded = cls.from_checkpoint(path, clip=clip64)
        assert not loaded.training and loaded.config == CONFIGS["random-ctx"]
        assert loaded.classnames == classnames
        with torch.no_grad():
            assert _rel_err(loaded(images).logits, model.eval()(images).logits) <= OUT_RTOL


def test_authors_defaults():
    config = CoCoOpConfig()
    assert (config.n_ctx, config.ctx_init, config.meta_net_reduction) == (4, "a photo of a", 16)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ctx_init": "", "n_ctx": 0}, r"CoCoOpConfig\.n_ctx must be >= 1"),
    ({"meta_net_reduction": 0}, r"CoCoOpConfig\.meta_net_reduction must be >= 1"),
    ({"init_std": float("nan")}, r"CoCoOpConfig\.init_std"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoCoOpConfig(**kwargs)


def test_bad_construction_names_the_problem(clip64, tiny_clip_model, classnames):
    with pytest.raises(ValueError, match=r"meta_net_reduction=128 leaves no hidden unit.*64"):
        CoCoOp(clip64, classnames, CoCoOpConfig(meta_net_reduction=128))
    with pytest.raises(ValueError, match=r"CoCoOpConfig\.ctx_init 'a photograph-like' has 2 "):
        CoCoOp(clip64, classnames, CoCoOpConfig(ctx_init="a photograph-like"))
    with pytest.raises(TypeError, match="config must be a CoCoOpConfig"):
        CoCoOp(clip64, classnames, object())  # type: ignore[arg-type]
    # the default (E // 16) on the 24-wide tiny CLIP still has one hidden unit
    assert CoCoOp(tiny_clip_model, classnames).prompt_learner.meta_net.linear1.out_features == 1
