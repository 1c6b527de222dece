"""CoCoOp's official checkpoints: files written as the authors' Dassl trainer writes them
(``prompt_learner/model-best.pth.tar`` or ``model.pth.tar-N``), loaded and compared with the
authors' forward (``tests/cocoop_original.py``); bad files give clear errors."""

from __future__ import annotations

import os

import pytest
import torch
from cocoop_original import OriginalCoCoOp
from official_fixtures import _DasslWarmup

from dpt_fast import CoCoOp, CoCoOpConfig
from dpt_fast.reference import CoCoOp as ReferenceCoCoOp
from dpt_fast.testing import tiny_clip

OUT_RTOL = 1e-5


@pytest.fixture(scope="module")
def clip64():
    return tiny_clip(embed_dim=64)


def _save_dassl(module: torch.nn.Module, directory, filename="model-best.pth.tar",
                dtype=torch.float32, state: dict | None = None) -> None:
    """What Dassl's ``save_checkpoint`` writes for the registered ``prompt_learner``: its whole
    state_dict (buffers too), the epoch, the optimizer's and the warm-up scheduler's state."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.002, momentum=0.9)
    scheduler = _DasslWarmup(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10),
                             1, 1e-5)
    if state is None:
        state = {k: v.to(dtype) for k, v in module.state_dict().items()}
    os.makedirs(directory / "prompt_learner", exist_ok=True)
    torch.save({"state_dict": state, "epoch": 10, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": 0.0},
               directory / "prompt_learner" / filename)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cls", [CoCoOp, ReferenceCoCoOp])
def test_official_checkpoint_gives_the_authors_logits_and_loss(clip64, classnames, images,
                                                                labels, tmp_path, cls):
    torch.manual_seed(7)
    original = OriginalCoCoOp(classnames, clip64)
    with torch.no_grad():  # a trained-looking context, not the initial words
        original.prompt_learner.ctx.add_(0.05 * torch.randn_like(original.prompt_learner.ctx))
    _save_dassl(original.prompt_learner, tmp_path)
    torch.manual_seed(8)
    ours = cls(clip64, classnames)
    ours.load_official_checkpoint(tmp_path)
    for key, value in original.prompt_learner.named_parameters():
        assert torch.equal(ours.prompt_learner.get_parameter(key), value), key
    original.eval()
    with torch.no_grad():
        assert _rel_err(ours.eval()(images).logits, original(images)) <= OUT_RTOL
    original.train()
    ours.train()
    loss = ours.loss(ours(images), labels)
    assert _rel_err(loss, original(images, labels)) <= OUT_RTOL


def test_fp16_checkpoint_by_epoch(clip64, classnames, tmp_path):
    torch.manual_seed(7)
    original = OriginalCoCoOp(classnames, clip64)
    _save_dassl(original.prompt_learner, tmp_path, "model.pth.tar-10", torch.float16)
    ours = CoCoOp(clip64, classnames)
    with pytest.raises(FileNotFoundError, match=r"CoCoOp checkpoint not found.*model-best"):
        ours.load_official_checkpoint(tmp_path)
    ours.load_official_checkpoint(tmp_path, epoch=10)
    for key, value in original.prompt_learner.named_parameters():
        theirs = value.detach().half().float()
        assert torch.equal(ours.prompt_learner.get_parameter(key), theirs), key


def test_checkpoint_of_other_shape_changes_nothing(clip64, classnames, tmp_path):
    source = CoCoOp(clip64, classnames, CoCoOpConfig(ctx_init="", n_ctx=6))
    state = {k.removeprefix("prompt_learner."): v for k, v in source.state_dict().items()
             if k.startswith("prompt_learner.")}
    _save_dassl(source.prompt_learner, tmp_path, state=state)
    ours = CoCoOp(clip64, classnames)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"prompt_learner/ctx: .*\(6, 32\).*\(4, 32\).*n_ctx"):
        ours.load_official_checkpoint(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checkpoint_of_another_method_is_refused(clip64, classnames, tmp_path):
    # CoOp's prompt_learner holds ctx alone: no meta-net.
    _save_dassl(torch.nn.Linear(1, 1), tmp_path, state={"ctx": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match=r"missing \['meta_net\.linear1\.bias'.*CoCoOp "):
        CoCoOp(clip64, classnames).load_official_checkpoint(tmp_path)


def test_not_a_dassl_file_is_refused(clip64, classnames, tmp_path):
    os.makedirs(tmp_path / "prompt_learner")
    torch.save({"ctx": torch.zeros(4, 32)}, tmp_path / "prompt_learner" / "model-best.pth.tar")
    with pytest.raises(ValueError, match="no 'state_dict' dict: not a Dassl checkpoint"):
        CoCoOp(clip64, classnames).load_official_checkpoint(tmp_path)
