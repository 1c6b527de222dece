"""The engine with the evaluation caches: the same results with and without them, unreadable
test images found before training, predictions identical with cached frozen features."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import DPT_FAST, error_line, train_args

from dpt_fast import DPT, DPTConfig
from dpt_fast.data.disk_cache import CacheSettings
from dpt_fast.engine import eval_split as test_data
from dpt_fast.engine.eval_split import frozen_features, prepare_test_set


def _corrupt_copy(colour_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(colour_folder, root)
    victim = sorted((root / "test").rglob("*.png"))[0]
    victim.write_bytes(b"not a png at all")
    return root, victim


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_an_unreadable_test_image_stops_the_run_before_training(clip_files, colour_folder,
                                                                tmp_path, cache):
    root, victim = _corrupt_copy(colour_folder, tmp_path)
    out = tmp_path / "run"
    result = subprocess.run([DPT_FAST, *train_args(clip_files, root, out, cache, "--cache-dir",
                                                   str(tmp_path / "cache"))],
                            capture_output=True, text=True, timeout=600, check=False)
    if cache == "--cache":  # read while the crops are cached, before any epoch
        line = error_line(result, 2)
        assert str(victim) in line
        assert "epoch 1/1" not in result.stderr
        assert not (out / "checkpoint-last.safetensors").exists()
    result = subprocess.run([DPT_FAST, *train_args(clip_files, root, tmp_path / "skip", cache,
                                                   "--skip-unreadable", "--cache-dir",
                                                   str(tmp_path / "cache"))],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert results["data"]["test_images_skipped"] == 1
    assert results["test"]["n"] == 11 and results["test"]["skipped_unreadable"] == [str(victim)]


def test_eval_cold_warm_and_uncached_agree(clip_files, colour_folder, tmp_path):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    result = subprocess.run([DPT_FAST, *train_args(clip_files, colour_folder, run, "--no-cache",
                                                   epochs=2)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    config, weights = clip_files
    reports = {}
    for name, flags in (("cold", ["--cache-dir", str(cache)]),
                        ("warm", ["--cache-dir", str(cache)]),
                        ("uncached", ["--no-cache"])):
        out = tmp_path / name
        result = subprocess.run(
            [DPT_FAST, "eval", "--checkpoint", str(run / "checkpoint-last.safetensors"),
             "--dataset", "folder", "--root", str(colour_folder), "--backbone", config,
             "--pretrained", weights, "--device", "cpu", "--num-workers", "0",
             "--output-dir", str(out), *flags], capture_output=True, text=True, timeout=600,
            check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads((out / "eval_folder_all.json").read_text())["test"]
        if name == "cold":
            files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.bin")}
            assert {p.parent.name for p in files} == {"test_crops", "features"}
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.bin")} == files  # warm: read only
    trained = json.loads((run / "results.json").read_text())["test"]
    for name, report in reports.items():
        assert report == trained, name


def test_cached_frozen_features_give_identical_predictions(tmp_path, monkeypatch):
    """On the toy task: the cached path (uint8 crops normalised on the device, frozen features
    from the disk cache) predicts exactly what the uncached path predicts."""
    from dpt_fast.data import build_dataset
    from dpt_fast.toy import task
    from dpt_fast.toy_clip.model import load_toy_clip

    root = tmp_path / "toy"
    task.write_task(root)
    splits = build_dataset("dtd", root, shots=1, seed=1)
    items = splits.test[::10]  # 240 of the 2400 test images: enough classes, quick
    clip = load_toy_clip("cpu")
    torch.manual_seed(0)
    model = DPT(clip, splits.classnames, DPTConfig(template=task.TEMPLATE)).eval()
    size = model.geometry.image_size[0]
    settings = CacheSettings(enabled=True, directory=tmp_path / "cache")
    clip_key = {"backbone": "toy", "pretrained": "toy", "weights_sha256": "test"}

    def predictions(test_set, frozen):
        loader = torch.utils.data.DataLoader(test_set.dataset, batch_size=100)
        out, done = [], 0
        with torch.no_grad():
            for images, _ in loader:
                if images.dtype == torch.uint8:
                    from dpt_fast.data.device_batches import normalize_uint8

                    images = normalize_uint8(images)
                features = None if frozen is None else frozen[done:done + len(images)]
                done += len(images)
                out.append(model(images, frozen_features=features).logits.argmax(-1))
        return torch.cat(out)

    plain = prepare_test_set(items, size, CacheSettings(enabled=False), skip_unreadable=False,
                             num_workers=0)
    assert frozen_features(plain, model, clip_key, torch.device("cpu"), None, settings) is None
    expected = predictions(plain, None)
    cold = prepare_test_set(items, size, settings, skip_unreadable=False, num_workers=0)
    cold_features = frozen_features(cold, model, clip_key, torch.device("cpu"), None, settings)
    assert torch.equal(predictions(cold, cold_features), expected)

    def no_compute(*args, **kwargs):
        raise AssertionError("the warm cache computed the features again")

    monkeypatch.setattr(test_data, "compute_frozen_features", no_compute)
    warm = prepare_test_set(items, size, settings, skip_unreadable=False, num_workers=0)
    warm_features = frozen_features(warm, model, clip_key, torch.device("cpu"), None, settings)
    assert torch.equal(warm_features, cold_features)
    assert torch.equal(predictions(warm, warm_features), expected)
    # The features are the frozen CLIP's, within rounding of a pass over the decoded images.
    with torch.no_grad():
        direct = torch.cat([model.encode_image_frozen(images) for images, _ in
                            torch.utils.data.DataLoader(plain.dataset, batch_size=100)])
    np.testing.assert_allclose(warm_features.numpy(), direct.numpy(), rtol=1e-5, atol=1e-5)
