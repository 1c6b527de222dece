"""The toy CLIP, toy world and toy task: shipped weights, determinism, a real few-shot gain,
and fast/reference agreement on a pretrained (not random) CLIP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpt_fast import DPT
from dpt_fast.backbone import load_clip
from dpt_fast.data import ImageDataset, build_dataset, build_transforms
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.toy import robustness, task
from dpt_fast.toy.demo import format_table, model_config, summarise
from dpt_fast.toy.pretrain import PretrainConfig, pretrain
from dpt_fast.toy_clip.model import (
    IDS_KEY,
    ROWS_KEY,
    WEIGHTS_PATH,
    WEIGHTS_SHA256,
    ChecksumError,
    load_toy_clip,
    sha256_of,
)
from dpt_fast.toy_clip.world import IMAGE_SIZE, render, sample_scene

MAX_WEIGHTS_BYTES = 5 * 1024 * 1024
PARITY_STEPS = 20
# Small enough that the trajectory does not amplify rounding: the two implementations round
# differently, and at the demo's lr 0.01 on 24 images their loss curves drift apart by 1e-4
# (relative) after 16 steps, growing ~3x per step, while at 0.002 they stay within 1e-6 for
# 20 steps (measured 2026-11-30 on the 2-core AMD EPYC machine, also without SIMD kernels on
# one thread). The implementations are compared here, not the recipe.
PARITY_LR = 0.002
PARITY_RTOL = 1e-4


@pytest.fixture(scope="module")
def toy_clip():
    return load_toy_clip("cpu")


def test_shipped_weights_load_with_checksum(toy_clip):
    assert WEIGHTS_PATH.stat().st_size <= MAX_WEIGHTS_BYTES
    assert sha256_of(WEIGHTS_PATH) == WEIGHTS_SHA256
    stored = load_file(str(WEIGHTS_PATH))  # plain safetensors, no pickle
    assert stored[ROWS_KEY].dtype == torch.float16
    rows = set(stored[IDS_KEY].tolist())
    embedding = toy_clip.token_embedding.weight
    unused = torch.tensor([i for i in range(embedding.shape[0]) if i not in rows])
    assert embedding[unused].abs().sum() == 0  # rebuilt: zeros outside the stored rows
    assert toy_clip.encode_image(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[0] == 2


def test_tampered_weights_refused(tmp_path):
    copy = tmp_path / "toy_clip.safetensors"
    shutil.copyfile(WEIGHTS_PATH, copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_toy_clip("cpu", path=copy)
    with pytest.raises(FileNotFoundError):
        load_toy_clip("cpu", path=tmp_path / "missing.safetensors")


def _draw(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [s.caption() for s in scenes], [np.asarray(render(s, rng)) for s in scenes]


def test_generator_is_deterministic():
    captions, images = _draw(7)
    again_captions, again_images = _draw(7)
    assert captions == again_captions
    assert all(np.array_equal(a, b) for a, b in zip(images, again_images, strict=True))
    assert images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and images[0].dtype == np.uint8
    other_captions, other_images = _draw(8)
    assert other_captions != captions or not np.array_equal(other_images[0], images[0])


def test_task_written_in_dtd_layout(tmp_path):
    task.write_task(tmp_path, per_class={"train": 2, "val": 1, "test": 1})
    splits = build_dataset(task.DATASET_NAME, tmp_path, shots=1, seed=1)
    assert splits.classnames == task.classnames()
    assert len(splits.train) == len(splits.classnames) == len(splits.test)


CONVERGENCE_SEED = 1


@pytest.mark.e2e
def test_dpt_converges_across_rounding_environments(tmp_path):
    """DPT with the demo's recipe (seed 1), trained through the engine in three subprocesses
    that round differently (``robustness.distinct_environments``: the default, one thread, and
    AVX2 kernels on an AVX-512 machine or no SIMD kernels elsewhere). On each: DPT beats
    zero-shot by >= ``MIN_GAIN`` (5) points, no epoch's loss rises > 25 % over the previous one
    after the warm-up, and the three accuracies lie within ``MAX_SPREAD`` (3) points.

    Measured 2026-11-30 on the 2-core AMD EPYC machine (AVX2, no AVX-512; torch 2.14.1) with
    ``python benchmarks/toy_robustness.py --methods dpt`` (all four environments, seeds 1-3;
    ``benchmarks/results/toy_robustness_2026-11-30.md``), test accuracy %:

    ====  =======  ====  ====  =======  ======  ==============
    seed  default  omp1  avx2  no_simd  spread  max loss rise
    ====  =======  ====  ====  =======  ======  ==============
    1     55.1     53.9  55.1  54.5     1.2     +8 %
    2     56.4     57.0  56.4  55.7     1.2     +2 %
    3     57.8     56.6  57.8  58.4     1.8     +9 %
    ====  =======  ====  ====  =======  ======  ==============

    Zero-shot 37.9 % everywhere. The smallest gain (+16.0) clears the bar of +5 by 11 points,
    six times the largest spread (1.8); the largest loss rise (9 %) is 16 points under 25 %.
    On this machine "avx2" is the default itself (identical numbers); on an AVX-512 machine it
    is not, and this test runs it there.
    """
    data = tmp_path / "data"
    task.write_task(data)
    results = {name: robustness.run_demo_in(name, tmp_path / name, methods=("dpt",),
                                            seeds=(CONVERGENCE_SEED,), data_dir=data)
               for name in robustness.distinct_environments()}
    rows = robustness.table(results)
    assert robustness.failures(rows) == [], robustness.markdown(rows)


def test_fast_and_reference_same_loss_curve(toy_clip, tmp_path):
    task.write_task(tmp_path, per_class={"train": 1, "val": 1, "test": 1})
    splits = build_dataset(task.DATASET_NAME, tmp_path, shots=1, seed=1)
    data = ImageDataset(splits.train, build_transforms(train=False, image_size=IMAGE_SIZE))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    config = model_config("dpt")  # the demo's prompts
    torch.manual_seed(0)
    fast = DPT(toy_clip, splits.classnames, config)
    reference = ReferenceDPT(toy_clip, splits.classnames, config)
    reference.load_state_dict(fast.state_dict())
    curves = []
    for model in (fast, reference):
        model.train()
        optimizer = torch.optim.SGD([p for g in model.parameter_groups().values() for p in g],
                                    lr=PARITY_LR, momentum=0.9)
        curve = []
        for step in range(PARITY_STEPS):
            loss = model.loss(model(images), labels, epoch=step // 10)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    torch.testing.assert_close(curves[0], curves[1], rtol=PARITY_RTOL, atol=0)
    assert curves[0][-1] < curves[0][0]


def test_cli_trains_and_evaluates_on_the_shipped_toy_clip(tmp_path, capsys):
    """`dpt-fast train --backbone toy --pretrained toy` on the task `python -m
    dpt_fast.toy.task` writes: no demo run first, no other file."""
    from dpt_fast.cli import main

    data, out = tmp_path / "data", tmp_path / "run"
    assert task.main([str(data)]) == 0
    assert (data / task.DATASET_FOLDER / task.SPLIT_FILE).is_file()
    assert main(["train", "--dataset", "dtd", "--root", str(data), "--backbone", "toy",
                 "--pretrained", "toy", "--template", task.TEMPLATE, "--shots", "2",
                 "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
                 "--n-text-ctx", "4", "--n-visual-ctx", "4", "--cavpt-top-k", "5",
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["backbone"] == "toy" and len(results["history"]) == 2
    assert results["test"]["n"] == len(task.classnames()) * task.TEST_PER_CLASS
    capsys.readouterr()
    # the checkpoint remembers the backbone: eval needs no --backbone / --pretrained
    assert main(["eval", "--checkpoint", str(out / "checkpoint-last.safetensors"),
                 "--dataset", "dtd", "--root", str(data), "--device", "cpu",
                 "--num-workers", "0", "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_dtd_all.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(results["test"]["accuracy"])


def test_toy_backbone_names_its_weights():
    clip = load_clip("toy", "none", torch.device("cpu"))  # random weights, same architecture
    assert clip.visual.image_size[0] == IMAGE_SIZE
    with pytest.raises(ValueError, match="--pretrained toy"):
        load_clip("toy", "openai", torch.device("cpu"))  # the CLI's default tag


def test_loss_checks_and_spread():
    # warm-up epoch 1, then a rise of 30% at epoch 3 (flagged) and of 10% at epoch 5 (not)
    changes = robustness.loss_changes([4.0, 3.0, 3.9, 3.0, 3.3, 2.0], warmup_epochs=1)
    assert [e for e, _ in changes] == [2, 3, 4, 5, 6]
    rows = [{"environment": env, "method": "dpt", "seed": 1, "zero_shot": 40.0,
             "accuracy": acc, "gain": acc - 40.0, "max_loss_increase": 0.0,
             "loss_jumps": [(e, c) for e, c in changes if c > robustness.MAX_LOSS_INCREASE]}
            for env, acc in (("default", 50.0), ("omp1", 43.5))]
    problems = robustness.failures(rows)
    assert any("loss rose 30% at epoch 3" in p for p in problems)
    assert any("+3.5 points over zero-shot" in p for p in problems)
    assert any("spread 6.5 points" in p for p in problems)
    assert robustness.spreads(rows) == {("dpt", 1): 6.5}


def test_environment_replaces_inherited_rounding_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert "OMP_NUM_THREADS" not in robustness.environment("default")
    assert robustness.environment("omp1")["OMP_NUM_THREADS"] == "1"
    assert robustness.environment("avx2")["ATEN_CPU_CAPABILITY"] == "avx2"
    with pytest.raises(ValueError, match="valid"):
        robustness.environment("avx512")


def test_demo_table_reports_mean_and_std_over_seeds():
    runs = [{"method": m, "seed": s, "accuracy": a, "train_s": 1.0}
            for m, s, a in (("coop", 1, 50.0), ("coop", 2, 52.0), ("dpt", 1, 60.0),
                            ("dpt", 2, 64.0))]
    summary = summarise(runs)
    assert summary["dpt"]["mean"] == 62.0
    assert summary["dpt"]["std"] == pytest.approx(2 * 2 ** 0.5)
    text = format_table(40.0, runs)
    assert "62.0 ± 2.8" in text and "+22.0" in text and "1:60.0 2:64.0" in text
    assert "±" not in format_table(40.0, runs[:1])  # one seed: no std


def test_demo_flags_seed_and_seeds():
    import argparse

    from dpt_fast.toy.options import add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    assert parser.parse_args([]).seeds == [1]
    assert parser.parse_args(["--seed", "3"]).seeds == [3]
    assert parser.parse_args(["--seeds", "1", "2", "3"]).seeds == [1, 2, 3]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", "1", "--seeds", "2"])


def test_pretraining_is_reproducible_from_its_seed():
    """Deterministic kernels and a fixed thread count: two runs give identical weights."""
    config = PretrainConfig(steps=2, batch_size=8, warmup_steps=1, threads=1)
    threads = torch.get_num_threads()
    first = pretrain(config, log=lambda *_: None).state_dict()
    second = pretrain(config, log=lambda *_: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.get_num_threads() == threads  # settings restored
    assert not torch.are_deterministic_algorithms_enabled()
    other = pretrain(PretrainConfig(**{**vars(config), "seed": 1}), log=lambda *_: None)
    assert not torch.equal(other.state_dict()["visual.conv1.weight"], first["visual.conv1.weight"])
