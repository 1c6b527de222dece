"""The toy CLIP, toy world and toy task: shipped weights, determinism, a real few-shot gain,
and fast/reference agreement on a pretrained (not random) CLIP."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpt_fast import DPT, DPTConfig
from dpt_fast.data import ImageDataset, build_dataset, build_transforms
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.toy import task
from dpt_fast.toy.demo import run_demo
from dpt_fast.toy.model import (
    IDS_KEY,
    ROWS_KEY,
    WEIGHTS_PATH,
    WEIGHTS_SHA256,
    ChecksumError,
    load_toy_clip,
    sha256_of,
)
from dpt_fast.toy.world import IMAGE_SIZE, render, sample_scene

MAX_WEIGHTS_BYTES = 5 * 1024 * 1024
PARITY_STEPS = 20
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


CONVERGENCE_SEEDS = (1, 2)
CONVERGENCE_EPOCHS = 20
MIN_GAIN = 4.0  # percentage points


def test_dpt_few_shot_beats_zero_shot(tmp_path):
    """DPT 16-shot (the demo's settings: 20 epochs, the 360-image test split) beats the toy
    CLIP zero-shot by >= 4 points on average over seeds 1 and 2, through the real engine.

    Measured on 2 CPU cores (~50 s): zero-shot 39.2%; DPT 47.8% (seed 1) and 42.8% (seed 2),
    i.e. +8.6 and +3.6 points, mean +6.1. The toy CLIP's weak texture features cap the gain.
    """
    gains = []
    for seed in CONVERGENCE_SEEDS:
        results = run_demo(tmp_path / f"seed{seed}", device="cpu", seed=seed,
                           epochs=CONVERGENCE_EPOCHS, methods=("dpt",), timing=False,
                           echo=lambda *_: None)
        gains.append(results["methods"][0]["accuracy"] - results["zero_shot_accuracy"])
    assert sum(gains) / len(gains) >= MIN_GAIN, gains


def test_fast_and_reference_same_loss_curve(toy_clip, tmp_path):
    task.write_task(tmp_path, per_class={"train": 1, "val": 1, "test": 1})
    splits = build_dataset(task.DATASET_NAME, tmp_path, shots=1, seed=1)
    data = ImageDataset(splits.train, build_transforms(train=False, image_size=IMAGE_SIZE))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    config = DPTConfig(method="dpt", template=task.TEMPLATE, n_text_ctx=4, n_visual_ctx=4,
                       cavpt_top_k=5, cavpt_n_ctx=4)
    torch.manual_seed(0)
    fast = DPT(toy_clip, splits.classnames, config)
    reference = ReferenceDPT(toy_clip, splits.classnames, config)
    reference.load_state_dict(fast.state_dict())
    curves = []
    for model in (fast, reference):
        model.train()
        optimizer = torch.optim.SGD([p for g in model.parameter_groups().values() for p in g],
                                    lr=0.05, momentum=0.9)
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
