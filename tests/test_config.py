"""DPTConfig: the authors' defaults and refusal of invalid combinations."""

from __future__ import annotations

import pytest

from dpt_fast import DPTConfig
from dpt_fast.config import METHODS


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
