"""CoCoOp as a registered method: the builder, its recipe values, refused options, and a run
through ``dpt-fast train --method cocoop`` and ``dpt-fast eval`` on the tiny CLIP."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import COLOURS

from dpt_fast import CoCoOp, CoCoOpConfig
from dpt_fast import checkpoint as ckpt
from dpt_fast.cli import main
from dpt_fast.config import DPTConfig
from dpt_fast.engine.config import TrainConfig
from dpt_fast.engine.recipe import apply_recipe
from dpt_fast.methods import METHOD_NAMES, create_method, get_method


def test_builder_maps_the_text_options(tiny_clip_model, classnames):
    model = create_method("cocoop", tiny_clip_model, classnames,
                          DPTConfig(method="cocoop", n_text_ctx=6, text_ctx_init="",
                                    init_std=0.1))
    assert type(model) is CoCoOp
    assert model.config == CoCoOpConfig(n_ctx=6, ctx_init="", init_std=0.1)
    declared = {p for g in get_method("cocoop").param_groups for p in g.parts}
    assert set(model.parameter_groups()) == declared == {"prompt_learner"}
    assert "cocoop" in METHOD_NAMES


@pytest.mark.parametrize("recipe", ["authors", "dpt_fast"])
def test_authors_recipe(recipe):
    base = TrainConfig(recipe=recipe, model=DPTConfig(method="cocoop"))
    config = apply_recipe(base, frozenset())
    assert (config.batch_size, config.epochs, config.text_lr, config.text_warmup_epochs,
            config.warmup_lr) == (1, 10, 0.002, 1, 1e-5)
    assert (config.model.n_text_ctx, config.model.text_ctx_init) == (4, "a photo of a")
    # what the user sets wins (a larger batch is allowed)
    mine = apply_recipe(dataclasses.replace(base, batch_size=8), frozenset({"batch_size"}))
    assert mine.batch_size == 8


@pytest.mark.parametrize(("flags", "named"), [
    (("--cavpt-top-k", "2"), "--method cocoop does not read --cavpt-top-k"),
    (("--lr", "0.1", "--n-visual-ctx", "3"),
     "--method cocoop does not read --lr, --n-visual-ctx"),
])
def test_options_cocoop_does_not_read_are_refused(capsys, flags, named):
    args = ["train", "--dataset", "folder", "--root", "nowhere", "--device", "cpu",
            "--method", "cocoop", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_train_and_eval_through_the_cli(clip_files, colour_folder, tmp_path):
    config, weights = clip_files
    out = tmp_path / "run"
    common = ["--dataset", "folder", "--root", str(colour_folder), "--backbone", config,
              "--pretrained", weights, "--device", "cpu", "--method", "cocoop"]
    assert main(["train", *common, "--shots", "-1", "--epochs", "3", "--batch-size", "6",
                 "--num-workers", "0", "--text-warmup-epochs", "0", "--text-lr", "0.05",
                 "--output-dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n"] == 4 * len(COLOURS)
    state = ckpt.model_state(ckpt.read_checkpoint(out / "checkpoint-last.safetensors")[0])
    assert {k for k in state if not k.startswith("dpt_meta.")} == {
        "prompt_learner.ctx", "prompt_learner.meta_net.linear1.weight",
        "prompt_learner.meta_net.linear1.bias", "prompt_learner.meta_net.linear2.weight",
        "prompt_learner.meta_net.linear2.bias"}
    # the recipe's 4 context tokens from "a photo of a"
    assert state["prompt_learner.ctx"].shape == (4, 32)
    assert torch.isfinite(state["prompt_learner.ctx"]).all()
    evaluated = tmp_path / "eval"
    assert main(["eval", *common, "--checkpoint", str(out / "checkpoint-last.safetensors"),
                 "--num-workers", "0",
                 "--output-dir", str(evaluated)]) == 0
    again = json.loads(next(evaluated.glob("eval_*.json")).read_text())
    assert again["test"]["accuracy"] == results["test"]["accuracy"]
