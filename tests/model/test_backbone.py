"""Which CLIP a run builds: QuickGELU for OpenAI's weights, by name, tag or file format."""

from __future__ import annotations

import json
import logging
import warnings

import open_clip
import pytest
import torch
from conftest import TINY_CONFIG
from torch import nn

from dpt_fast.backbone import (
    build_clip,
    clip_activation,
    load_clip,
    openai_backbone,
    resolve_clip,
    weights_format,
)
from dpt_fast.cli import build_parser, resolve_config
from dpt_fast.testing import tiny_clip

CPU = torch.device("cpu")


def _activations(clip: nn.Module) -> set[str]:
    """The class names of the activation in every MLP of both towers."""
    towers = [clip.visual.transformer, clip.transformer]
    return {type(module).__name__ for tower in towers for block in tower.resblocks
            for module in block.mlp.children()
            if isinstance(module, (open_clip.transformer.QuickGELU, nn.GELU))}


@pytest.fixture
def offline_create_model(monkeypatch):
    """open_clip.create_model that records its arguments and builds random weights, so that
    what the CLI would build (with a download) is built offline."""
    calls = []
    original = open_clip.create_model

    def create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        return original(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create)
    return calls


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_cli_defaults_build_a_quickgelu_clip(offline_create_model, caplog, command):
    extra = ["--checkpoint", "x.safetensors"] if command == "eval" else []
    config, _ = resolve_config(build_parser().parse_args([command, *extra]))
    assert config.pretrained == "openai"
    with caplog.at_level(logging.WARNING):
        clip = load_clip(config.backbone, config.pretrained, CPU)
    assert offline_create_model == [("ViT-B-16-quickgelu", "openai")]
    assert _activations(clip) == {"QuickGELU"}
    assert clip_activation(clip) == "quick_gelu"
    assert not [r for r in caplog.records if "mismatch" in r.getMessage()]


def test_the_authors_recipe_resolves_to_quickgelu_vit_b32():
    config, _ = resolve_config(build_parser().parse_args(["train", "--recipe", "authors"]))
    spec = resolve_clip(config.backbone, config.pretrained)
    assert (spec.model_name, spec.quick_gelu, spec.weights_quick_gelu) == \
        ("ViT-B-32-quickgelu", True, True)
    assert openai_backbone("ViT-B/32") == "ViT-B-32-quickgelu"
    assert openai_backbone("ViT-L/14@336px") == "ViT-L-14-336-quickgelu"


def test_an_explicit_gelu_model_with_openai_weights_is_built_with_a_loud_warning(
        offline_create_model, caplog):
    with caplog.at_level(logging.WARNING):
        clip = load_clip("ViT-B-16", "openai", CPU)
    assert _activations(clip) == {"GELU"}  # the user's choice is honoured
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "dpt_fast"]
    assert len(warnings) == 1
    assert "ViT-B-16 runs GELU" in warnings[0] and "QUICK_GELU" in warnings[0]
    assert "use ViT-B-16-quickgelu" in warnings[0]


def test_weights_trained_with_gelu_on_a_gelu_model_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        spec = resolve_clip("ViT-B-16", "laion2b_s34b_b88k")
    assert (spec.quick_gelu, spec.weights_quick_gelu, spec.mismatch) == (False, False, False)
    assert not caplog.records


def test_unknown_names_and_tags_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-61'.*ViT-B-16"):
        resolve_clip("ViT-B-61", "openai")
    with pytest.raises(ValueError, match="ViT-B-16 has the tag 'laion2b_s34b_b88k'"):
        resolve_clip("ViT-B-16-quickgelu", "laion2b_s34b_b88k")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_clip("ViT-B-16-quickgelu", "/nowhere/ViT-B-16.pt")


class _OpenAIArchive(nn.Module):
    """A CLIP's tensors under OpenAI's names, plus the size entries of OpenAI's archives."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, size in (("input_resolution", 32), ("context_length", 77),
                           ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """(GELU config .json, QuickGELU config .json, TorchScript archive, state_dict with the
    size entries, plain open_clip state_dict, the source CLIP) of a tiny CLIP, weights in
    fp16 as OpenAI ships them."""
    folder = tmp_path_factory.mktemp("openai")
    source = tiny_clip(seed=5)
    configs = []
    for name, quick in (("tiny-gelu", False), ("tiny-quick", True)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps({**TINY_CONFIG, "quick_gelu": quick}))
        configs.append(str(path))
    archive = _OpenAIArchive(tiny_clip(seed=5)).half()
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated (FutureWarning in torch 2.14, DeprecationWarning in
        # 2.11); OpenAI's files are TorchScript all the same.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(archive, torch.ones(1, dtype=torch.half))
    traced.save(str(folder / "ViT-tiny.pt"))
    torch.save(archive.state_dict(), folder / "openai-state.pt")
    torch.save(source.state_dict(), folder / "open-clip.pt")
    return (*configs, str(folder / "ViT-tiny.pt"), str(folder / "openai-state.pt"),
            str(folder / "open-clip.pt"), source)


def test_openai_file_formats_are_recognised(openai_files):
    *_, archive, state, plain, _ = openai_files
    assert weights_format(archive) == "openai_archive"
    assert weights_format(state) == "openai_state_dict"
    assert weights_format(plain) == "file"


@pytest.mark.parametrize("kind", ["archive", "state"])
def test_openai_files_load_and_want_quickgelu(openai_files, caplog, kind):
    gelu, quick, archive, state, _, source = openai_files
    weights = archive if kind == "archive" else state
    with caplog.at_level(logging.WARNING):
        clip = build_clip(resolve_clip(quick, weights))
    assert not caplog.records  # neither a mismatch nor open_clip's "initialized randomly"
    assert clip_activation(clip) == "quick_gelu"
    expected = source.state_dict()
    for key, value in clip.state_dict().items():  # fp16 weights, loaded into fp32
        torch.testing.assert_close(value, expected[key].half().float(), rtol=0, atol=0,
                                   msg=key)
    with caplog.at_level(logging.WARNING):
        spec = resolve_clip(gelu, weights)
    assert spec.mismatch
    message = caplog.records[-1].getMessage()
    assert f"{gelu} runs GELU" in message and "OpenAI's weights" in message
    assert '"quick_gelu": true' in message


def test_a_plain_state_dict_follows_the_model(openai_files, caplog):
    gelu, quick, *_, plain, _ = openai_files
    with caplog.at_level(logging.WARNING):
        for config in (gelu, quick):
            spec = resolve_clip(config, plain)
            assert spec.weights == "file" and spec.weights_quick_gelu is None
    assert not [r for r in caplog.records if r.name == "dpt_fast"]


def test_an_openai_file_of_another_architecture_is_refused(openai_files, tmp_path):
    *_, archive, _, _, _ = openai_files
    other = tmp_path / "wider.json"
    other.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 16}))
    with pytest.raises(ValueError, match="does not fit open_clip's model"):
        build_clip(resolve_clip(str(other), archive))
