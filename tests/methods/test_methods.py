"""The method registry: readable without torch, one factory, declared parameter groups, the
options a method does not read refused, zero-shot CLIP's one classifier."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_fast.cli import main
from dpt_fast.config import DPT_PRESETS, DPTConfig
from dpt_fast.engine.config import TrainConfig
from dpt_fast.methods import METHOD_NAMES, REGISTRY, create_method, get_method
from dpt_fast.model import DPT
from dpt_fast.sweeps.plan import SweepGrid, check_options, plan_runs
from dpt_fast.zero_shot import ZeroShotCLIP, zero_shot_classifier

ROOT = Path(__file__).resolve().parents[1]

_NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
sys.argv = ["dpt-fast"]  # the command's process: the package imports no op
from dpt_fast.methods import METHOD_NAMES, get_method, describe_methods
from dpt_fast.engine.config import TrainConfig
from dpt_fast.engine.recipe import apply_recipe
from dpt_fast.config import DPTConfig
for name in METHOD_NAMES:
    method = get_method(name)
    config = apply_recipe(TrainConfig(model=DPTConfig(method=name)), frozenset())
    print(name, method.training, config.shots)
print("torch" in sys.modules)
"""


def test_the_registry_and_the_recipes_read_without_torch():
    done = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[-2] == "False"
    assert "zeroshot none 0" in lines and "linear_probe fit 16" in lines
    assert "dpt sgd 16" in lines


def test_every_registry_line_names_its_method():
    assert METHOD_NAMES[:2] == ("zeroshot", "linear_probe")  # the baselines first
    for name in METHOD_NAMES:
        method = get_method(name)
        assert method.name == name and method.description
        assert method.training in ("sgd", "fit", "none")
        assert "method" in method.model_fields
    assert set(DPT_PRESETS) <= set(REGISTRY)
    with pytest.raises(ValueError, match=r"unknown method 'clip'.*zeroshot, linear_probe"):
        get_method("clip")
    with pytest.raises(ValueError, match=r"DPTConfig\.method must be one of"):
        DPTConfig(method="clip")


@pytest.mark.parametrize("name", sorted(DPT_PRESETS))
def test_presets_declare_groups_that_hold_every_trainable_part(tiny_clip_model, classnames,
                                                                name):
    model = create_method(name, tiny_clip_model, classnames,
                          DPTConfig(method=name, n_text_ctx=4, cavpt_top_k=2))
    assert type(model) is DPT
    declared = {part for group in get_method(name).param_groups for part in group.parts}
    parts = model.parameter_groups()
    assert set(parts) <= declared
    # the authors' optimizers: text context at text_lr, visual prompts and CAVPT at lr
    names = [g.name for g in get_method(name).param_groups]
    assert names == [n for n, on in (("text", DPT_PRESETS[name].text_prompts),
                                      ("visual", DPT_PRESETS[name].deep_visual_prompts))
                     if on]
    for group in get_method(name).param_groups:
        assert hasattr(TrainConfig, group.lr_field) or group.lr_field in TrainConfig().__dict__
        assert group.warmup_field in TrainConfig().__dict__


def test_zero_shot_classifier_is_the_one_dpt_uses(tiny_clip_model, classnames, images):
    template = "a photo of a {}."
    text = zero_shot_classifier(tiny_clip_model, classnames, template)
    dpt = DPT(tiny_clip_model, classnames, DPTConfig(method="coop", n_text_ctx=4))
    assert torch.equal(text, dpt.handcrafted_text_features)
    zero = create_method("zeroshot", tiny_clip_model, classnames,
                         DPTConfig(method="zeroshot", template=template))
    assert isinstance(zero, ZeroShotCLIP)
    logits = zero(images).logits
    # zero-shot CLIP as open_clip computes it
    with torch.no_grad():
        image = tiny_clip_model.encode_image(images)
        expected = tiny_clip_model.logit_scale.exp() * (
            image / image.norm(dim=-1, keepdim=True)) @ text.t()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the frozen pass is DPT's (so the two share the frozen-feature cache)
    assert torch.equal(zero.encode_image_frozen(images), dpt.encode_image_frozen(images))


@pytest.mark.parametrize("n_classes", [2, 4])
def test_linear_probe_layer_predicts_what_scikit_learn_predicts(tiny_clip_model, n_classes):
    from dpt_fast.linear_probe.search import fit

    model = create_method("linear_probe", tiny_clip_model, [f"c{i}" for i in range(n_classes)],
                          DPTConfig(method="linear_probe"))
    width = model.geometry.embed_dim
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, width))
    labels = np.arange(40) % n_classes
    classifier = fit(features, labels, 1.0)
    model.set_classifier(classifier)
    test = rng.normal(size=(50, width))
    ours = model.logits_from_features(torch.from_numpy(test)).argmax(-1).numpy()
    assert (ours == classifier.predict(test)).all()


def _train(*flags: str) -> list[str]:
    return ["train", "--dataset", "folder", "--root", "nowhere", "--device", "cpu", *flags]


@pytest.mark.parametrize(("flags", "named"), [
    (("--method", "coop", "--cavpt-top-k", "2"), "--method coop does not read --cavpt-top-k"),
    (("--method", "vpt", "--n-text-ctx", "4", "--alpha", "1"),
     "--method vpt does not read --alpha, --n-text-ctx: drop them"),
    (("--method", "zeroshot", "--lr", "0.1", "--shots", "4"),
     "--method zeroshot does not read --lr, --shots"),
    (("--method", "linear_probe", "--epochs", "3"), "--method linear_probe does not read "
                                                    "--epochs"),
    (("--method", "coop", "--lr", "0.1", "--warmup-epochs", "2"),
     "--method coop does not read --lr, --warmup-epochs"),
    (("--method", "vpt", "--text-lr", "0.1"), "--method vpt does not read --text-lr"),
])
def test_options_a_method_does_not_read_are_refused_in_one_line(capsys, flags, named):
    assert main(_train(*flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_a_sweep_gives_each_method_only_the_options_it_reads(tmp_path):
    explicit = frozenset({"cavpt_top_k", "n_text_ctx", "lr"})  # lr: the visual group's
    base = TrainConfig(lr=0.05, model=DPTConfig(cavpt_top_k=2, n_text_ctx=4))
    grid = SweepGrid(datasets=("dtd",), shots=(1, 2), seeds=(1, 2),
                     methods=("zeroshot", "linear_probe", "coop", "dpt"))
    runs = plan_runs(base, explicit, grid, tmp_path)
    by_method: dict[str, list] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    # zero-shot CLIP reads no training image: once per dataset, shots 0, the first seed
    assert [(r.shots, r.seed, r.name) for r in by_method["zeroshot"]] == [
        (0, 1, "zeroshot/dtd/shots_0/seed_1")]
    assert len(by_method["linear_probe"]) == len(by_method["coop"]) == 4
    defaults = TrainConfig()
    coop, dpt = by_method["coop"][0].config, by_method["dpt"][0].config
    assert (coop.model.n_text_ctx, coop.model.cavpt_top_k, coop.lr) == (
        4, defaults.model.cavpt_top_k, defaults.lr)
    assert (dpt.model.n_text_ctx, dpt.model.cavpt_top_k, dpt.lr) == (4, 2, 0.05)
    probe = by_method["linear_probe"][0].config
    assert (probe.lr, probe.model.n_text_ctx) == (defaults.lr, defaults.model.n_text_ctx)
    assert check_options(explicit, grid.methods) == []
    problems = check_options(frozenset({"cavpt_top_k", "text_lr"}), ("zeroshot", "coop"))
    assert problems == ["none of the methods zeroshot, coop reads --cavpt-top-k: drop it "
                        "(see docs/methods.md)"]


def test_a_method_without_training_images_takes_shots_zero_only():
    assert TrainConfig(shots=0, model=DPTConfig(method="zeroshot")).shots == 0
    with pytest.raises(ValueError, match=r"TrainConfig\.shots must be -1"):
        TrainConfig(shots=0, model=DPTConfig(method="coop"))
    assert dataclasses.replace(TrainConfig(), shots=-1).shots == -1
