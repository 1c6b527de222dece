"""The logic of ``benchmarks/cocoop_speed.py``: the peak-memory accounting and the ratios."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load

speed = load("cocoop_speed")
MB = 10**6


def test_peak_activation_counts_live_tensors_only():
    def work() -> None:
        a = torch.ones(MB // 4)  # 1 MB
        b = a * 2  # 2 MB live
        del a
        c = b + 1  # 2 MB live again (a was freed)
        del b, c

    assert speed.peak_activation_bytes(work) == pytest.approx(2 * MB, rel=1e-3)


def _result(case: str, cpu: float, mib: float | None) -> dict:
    mode, impl, batch = case.split(":")
    return {"case": case, "mode": mode, "impl": impl, "batch": int(batch), "seconds": cpu,
            "cpu_seconds": cpu, "peak_activation_mib": mib}


def test_ratios_same_batch_and_per_image():
    results = [_result("train:fast:1", 2.0, 100.0), _result("train:reference:1", 60.0, 2000.0),
               _result("train:fast:8", 8.0, 400.0), _result("eval:fast:100", 10.0, None),
               _result("eval:reference:10", 20.0, None), {"case": "x", "error": ["boom"]}]
    out = speed.ratios(results)
    assert out["train:fast:1"] == {"speedup": 30.0, "wall_speedup": 30.0,
                                   "activation_memory_fraction": 0.05}
    # batch 8 against 8 reference images at batch 1: 480 s and 16000 MiB
    assert out["train:fast:8"]["speedup"] == 60.0
    assert out["train:fast:8"]["activation_memory_fraction"] == 400.0 / 16000.0
    assert out["train:fast:8"]["per_image_from"] == "train:reference:1"
    assert out["eval:fast:100"]["speedup"] == 20.0
    assert "activation_memory_fraction" not in out["eval:fast:100"]
