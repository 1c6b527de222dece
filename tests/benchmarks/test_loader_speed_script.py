"""benchmarks/loader_speed.py: a tiny end-to-end run, and its report logic on made-up rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load

loader_speed = load("loader_speed")

TRAIN_PIPELINES = {"uncached", "uncached_uint8", "cached", "prefilled"}


def test_tiny_run_writes_every_number(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    report = loader_speed.main([
        "--classes", "2", "--train-per-class", "3", "--test-per-class", "2", "--width", "120",
        "--height", "90", "--image-size", "32", "--batch-size", "2", "--workers", "0", "1",
        "--epochs", "1", "--root", str(tmp_path), "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(tmp_path.iterdir()) == [out]  # the images went with the temporary folder
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["torch"] == torch.__version__
    assert report["settings"]["train_images"] == 6 and report["settings"]["test_images"] == 4
    assert set(report["results"]["train"]) == TRAIN_PIPELINES
    for split in ("train", "test"):
        for name, rates in report["results"][split].items():
            if name != "cache_build":
                assert set(rates) == {"0", "1"}
                assert all(r["images_per_s"] > 0 for r in rates.values())
    assert report["results"]["test"]["cache_build"]["build_images_per_s"] > 0
    assert report["results"]["train"]["prefilled"]["1"]["prefilled"] == 6
    assert set(report["speedups"]) == {"train_uint8_output", "train_decoded_cache",
                                       "train_prefilled_cache", "test_crop_cache"}
    assert len(report["verdicts"]) == len(TRAIN_PIPELINES) + 2
    assert all("linear per-core extrapolation" in line for line in report["verdicts"])
    assert set(report["stage_ms_per_image"]) >= {"decode_jpeg_to_rgb", "totensor_normalize"}
    assert "train cached:" in capsys.readouterr().err


def test_simulated_hit_rates() -> None:
    assert loader_speed.simulated_hit_rates(10, 2, workers=1, epochs=3) == [0.0, 1.0, 1.0]
    assert loader_speed.simulated_hit_rates(10, 2, workers=0, epochs=2) == [0.0, 1.0]
    rates = loader_speed.simulated_hit_rates(400, 4, workers=4, epochs=6)
    assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] < 1.0
    assert rates[1] == pytest.approx(0.25, abs=0.1)  # ~ 1 - (1 - 1/4)^1


def test_verdicts_extrapolate_one_worker_linearly() -> None:
    results = {
        "train": {"uncached": {"0": {"images_per_s": 500.0}, "1": {"images_per_s": 100.0}},
                  "cached": {"2": {"images_per_s": 240.0}}},
        "test": {"uncached": {"1": {"images_per_s": 18.0}}, "cache_build": {}},
    }
    lines = loader_speed.verdicts(results)
    assert lines[0].startswith("train uncached: 100 img/s per core here (1 worker) -> ~1,600")
    assert lines[0].endswith("target >= 1,700: NOT met")
    assert "120 img/s per core here (2 workers / 2) -> ~1,920" in lines[1]
    assert lines[1].endswith("MET")
    assert lines[2].endswith("target >= 300: NOT met") and len(lines) == 3
    speedups = loader_speed.speedups(results)
    assert speedups["train_decoded_cache"] == {}  # no common worker count
