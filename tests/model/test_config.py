"""DPTConfig: the authors' defaults and refusal of invalid combinations."""

from __future__ import annotations

import pytest

from dpt_fast import DPTConfig
from dpt_fast.config import DPT_PRESETS as METHODS


def test_defaults_are_the_authors():
    cfg = DPTConfig()
    assert (cfg.method, cfg.n_text_ctx, cfg.text_ctx_init, cfg.class_specific_ctx) == \
        ("dpt", 16, "", False)
    assert (cfg.class_token_position, cfg.n_visual_ctx, cfg.cavpt_start_layer) == \
        ("end", 10, None)
    assert (cfg.cavpt_top_k, cfg.cavpt_n_ctx, cfg.cavpt_attn_dim) == (10, 10, 32)
    assert (cfg.alpha, cfg.guidance_epochs, cfg.template) == (0.3, 30, "a photo of a {}.")


def test_method_presets():
    assert set(METHODS) == {"coop", "vpt", "vlp", "dpt"}
    assert METHODS["coop"].text_prompts and not METHODS["coop"].deep_visual_prompts
    assert METHODS["vpt"].deep_visual_prompts and not METHODS["vpt"].text_prompts
    assert METHODS["vlp"].guidance and not METHODS["vlp"].class_aware_prompts
    assert all(vars(METHODS["dpt"]).values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "maple"}, "method"),
        ({"class_token_position": "left"}, "class_token_position"),
        ({"template": "a photo of a cat."}, "template"),
        ({"n_text_ctx": 0}, "n_text_ctx"),
        ({"method": "vpt", "n_visual_ctx": 0}, "n_visual_ctx"),
        ({"method": "coop", "cavpt_start_layer": 8}, "cavpt_start_layer"),
        ({"cavpt_start_layer": 0}, "cavpt_start_layer"),
        ({"cavpt_top_k": 0}, "cavpt_top_k"),
        ({"cavpt_n_ctx": 0}, "cavpt_n_ctx"),
        ({"text_ctx_init": "a photo of a", "class_specific_ctx": True}, "text_ctx_init"),
        ({"alpha": -1.0}, "alpha"),
        ({"guidance_epochs": -1}, "guidance_epochs"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"DPTConfig\.{field}"):
        DPTConfig(**kwargs)


def test_model_fields_leave_out_loss_only_fields():
    fields = DPTConfig().model_fields()
    assert "alpha" not in fields and "guidance_epochs" not in fields
    assert fields["method"] == "dpt"


def test_field_roles_are_declared_once_on_the_fields():
    from dpt_fast.config_fields import (
        EVAL,
        INIT_ONLY,
        LOSS_ONLY,
        PER_DATASET,
        REPEAT,
        REPORT_KEY,
        RESUMABLE,
        fields_with,
    )
    from dpt_fast.engine.config import TrainConfig

    assert fields_with(DPTConfig, LOSS_ONLY) == {"alpha", "guidance_epochs"}
    assert fields_with(DPTConfig, INIT_ONLY) == {"init_std"}
    assert fields_with(DPTConfig, PER_DATASET) == {"template"}
    assert fields_with(DPTConfig, REPORT_KEY) == {"method"}
    assert fields_with(TrainConfig, RESUMABLE) == {
        "root", "num_workers", "eval_batch_size", "eval_every", "device", "output_dir", "resume",
        "progress", "log_every", "tensorboard", "cache", "cache_dir", "cache_ram_gb",
        "skip_unreadable"}
    assert fields_with(TrainConfig, REPEAT) == {"seed"}
    assert fields_with(TrainConfig, REPORT_KEY) == {"dataset", "shots", "subsample", "backbone"}
    assert {"dataset", "backbone", "pretrained", "device"} <= fields_with(TrainConfig, EVAL)
    assert not fields_with(TrainConfig, EVAL) & {"lr", "epochs", "resume", "model"}


def test_config_diff_compares_nested_fields_with_defaults_for_missing_ones():
    from dataclasses import asdict

    from dpt_fast.config_fields import LOSS_ONLY, RESUMABLE, config_diff
    from dpt_fast.engine.config import TrainConfig

    old = asdict(TrainConfig())
    new = asdict(TrainConfig(lr=0.5, root="elsewhere", model=DPTConfig(alpha=1.0)))
    changes = config_diff(TrainConfig, old, new)
    assert [str(c) for c in changes] == ["lr: 0.01 -> 0.5", "model.alpha: 0.3 -> 1.0",
                                         "root: 'data' -> 'elsewhere'"]
    assert [c.name for c in config_diff(TrainConfig, old, new, skip_roles=(RESUMABLE,))] == \
        ["lr", "model.alpha"]
    assert [c.name for c in config_diff(TrainConfig, old, new,
                                        skip_roles=(RESUMABLE, LOSS_ONLY))] == ["lr"]
    # An older checkpoint without a field: the field counts as its default.
    del old["warmup_lr"], old["model"]["cavpt_attn_dim"]
    assert config_diff(TrainConfig, old, asdict(TrainConfig())) == []
    assert [c.name for c in config_diff(TrainConfig, old, asdict(TrainConfig(warmup_lr=1e-4)))] \
        == ["warmup_lr"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"lr": float("nan")}, "lr"),
    ({"text_lr": float("inf")}, "text_lr"),
    ({"lr": 0.0}, "lr"),
    ({"warmup_lr": -1.0}, "warmup_lr"),
    ({"momentum": float("nan")}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -4}, "batch_size"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"epochs": 0}, "epochs"),
    ({"shots": 0}, "shots"),
    ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"num_workers": -1}, "num_workers"),
    ({"eval_every": -2}, "eval_every"),
])
def test_invalid_run_settings_name_the_field(kwargs, field):
    from dpt_fast.engine.config import TrainConfig

    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("field", ["alpha", "init_std"])
def test_non_finite_model_numbers_are_refused(field):
    with pytest.raises(ValueError, match=rf"DPTConfig\.{field} must be a finite number"):
        DPTConfig(**{field: float("nan")})
