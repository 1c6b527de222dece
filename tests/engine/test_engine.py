"""Engine pieces: the authors' schedule, metrics, checkpoints, prompt transfer between classes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dpt_fast import DPT, DPTConfig
from dpt_fast import checkpoint as ckpt
from dpt_fast.engine.metrics import classification_report, harmonic_mean
from dpt_fast.engine.schedule import build_scheduler, dassl_lr
from dpt_fast.state_dict_transfer import load_for_classes


def _dassl_reference_lrs(base, max_epochs, warmup, warmup_lr):
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR, stepped once per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epochs))
    lrs = []
    for epoch in range(max_epochs):
        lrs.append(warmup_lr if epoch < warmup else cosine.get_last_lr()[0])
        if epoch >= warmup:
            optimizer.step()  # no gradients: only keeps the scheduler's call order honest
            cosine.step()
    return lrs


@pytest.mark.parametrize(("warmup", "epochs"), [(0, 5), (1, 10), (10, 60)])
def test_schedule_matches_dassl(warmup, epochs):
    expected = _dassl_reference_lrs(0.01, epochs, warmup, 1e-5)
    ours = [dassl_lr(e, 0.01, epochs, warmup, 1e-5) for e in range(epochs)]
    assert ours == pytest.approx(expected, rel=1e-9)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 0.01}], lr=0.01)
    scheduler = build_scheduler(optimizer, epochs, [(warmup, 1e-5)])
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-9)


def test_classification_report():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    report = classification_report(preds, labels, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(100 * 4 / 6)
    assert report["per_class_accuracy"] == {"a": 50.0, "b": 100.0, "c": pytest.approx(200 / 3)}
    f1 = [2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5, 2 * (2 / 3) * (2 / 3) / (4 / 3)]
    assert report["macro_f1"] == pytest.approx(100 * sum(f1) / 3)
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)


def test_checkpoint_write_is_atomic_and_checked(tiny_clip_model, classnames, tmp_path):
    model = DPT(tiny_clip_model, classnames, DPTConfig(cavpt_top_k=2))
    optimizer = torch.optim.SGD(model.parameter_groups()["cavpt"], lr=0.1, momentum=0.9)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler = build_scheduler(optimizer, 5, [(1, 1e-5)])
    path = tmp_path / "ckpt.safetensors"
    ckpt.save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=None, epoch=3, info={"note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    tensors, meta = ckpt.read_checkpoint(path)
    assert meta["epoch"] == 3 and meta["note"] == "x"
    restored = DPT(tiny_clip_model, classnames, DPTConfig(cavpt_top_k=2))
    restored.load_state_dict(ckpt.model_state(tensors))
    optimizer2 = torch.optim.SGD(restored.parameter_groups()["cavpt"], lr=0.1, momentum=0.9)
    scheduler2 = build_scheduler(optimizer2, 5, [(1, 1e-5)])
    assert ckpt.restore_training_state(tensors, meta, optimizer=optimizer2, scheduler=scheduler2,
                                       scaler=None) == 4
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert state.keys() == state2.keys()
    for index, values in state.items():
        assert torch.equal(values["momentum_buffer"], state2[index]["momentum_buffer"])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a dpt_fast checkpoint"):
        ckpt.read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        ckpt.read_checkpoint(tmp_path / "missing.safetensors")


def test_prompts_transfer_to_other_classes(tiny_clip_model, classnames, images):
    source = DPT(tiny_clip_model, classnames, DPTConfig(cavpt_top_k=2))
    target = DPT(tiny_clip_model, ["helicopter", "boat"], DPTConfig(cavpt_top_k=2))
    load_for_classes(target, source.state_dict())
    assert torch.equal(target.text_prompts.ctx, source.text_prompts.ctx)
    assert torch.equal(target.cavpt.layers[0].ctx, source.cavpt.layers[0].ctx)
    target(images)
    other = DPT(tiny_clip_model, ["boat"], DPTConfig(cavpt_top_k=2, n_visual_ctx=4))
    with pytest.raises(ValueError, match="n_visual_ctx"):
        load_for_classes(other, source.state_dict())
    csc = DPT(tiny_clip_model, classnames, DPTConfig(class_specific_ctx=True))
    csc_target = DPT(tiny_clip_model, ["boat"], DPTConfig(class_specific_ctx=True))
    with pytest.raises(ValueError, match="class-specific"):
        load_for_classes(csc_target, csc.state_dict())


@pytest.mark.parametrize(("n", "batch", "world"), [(17, 6, 1), (17, 6, 2), (24, 6, 3),
                                                   (11, 32, 2), (10, 32, 4), (63, 32, 2)])
def test_global_batches_do_not_depend_on_the_process_count(n, batch, world):
    from dpt_fast.engine.sampler import GlobalBatchSampler

    single = GlobalBatchSampler(n, batch, 0, 1, seed=5)
    single.set_epoch(3)
    expected = list(single)
    # Dassl's rule: the last incomplete batch goes when there is one full batch
    assert len(expected) == (n // batch if n >= batch else 1)
    shares = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, batch, rank, world, seed=5)
        sampler.set_epoch(3)
        shares.append(list(sampler))
    assert all(len(part) == len(expected) for part in shares)
    for step, batch_indices in enumerate(expected):
        assert [i for part in shares for i in part[step]] == batch_indices
        sizes = [len(part[step]) for part in shares]
        assert max(sizes) - min(sizes) <= 1
        weights = [GlobalBatchSampler(n, batch, r, world, 5).batch_weight(size)
                   for r, size in enumerate(sizes)]
        if len(set(sizes)) == 1:
            assert weights == [None] * world
        else:  # the weighted means average to the global mean
            assert sum(weights) == pytest.approx(world)


def test_global_batches_need_a_sample_per_process():
    from dpt_fast.engine.sampler import GlobalBatchSampler

    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        GlobalBatchSampler(3, 32, 0, 4, seed=1)


def test_a_torn_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "checkpoint-last.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00")
    with pytest.raises(ValueError, match="corrupt or incomplete checkpoint"):
        ckpt.read_checkpoint(path)
