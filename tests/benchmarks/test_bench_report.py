"""report.py's tables and target verdicts on a synthetic pytest-benchmark file (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_scripts import load

report = load("report")



def _bench(impl: str, batch: int, median_ms: float, device: str = "cpu") -> dict:
    """One pytest-benchmark entry of the class-aware attention suite."""
    return {
        "fullname": f"benchmarks/test_bench_class_aware_attention.py::test_forward_backward"
                    f"[{impl}-{batch}]",
        "name": f"test_forward_backward[{impl}-{batch}]",
        "stats": {"mean": median_ms * 1.1e-3, "stddev": 1e-4, "rounds": 15,
                  "median": median_ms * 1e-3},
        "extra_info": {"impl": impl, "device": device, "dtype": "float32",
                       "shape": {"B": batch, "K": 10, "M": 207, "dk": 32, "dv": 768}},
    }


def _report(tmp_path: Path, benches: list[dict]) -> str:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    return report.build_report(report.load_rows([path]), tmp_path, "bench")


def test_class_aware_target_met_when_op_is_fastest_by_median(tmp_path: Path) -> None:
    text = _report(tmp_path, [
        _bench("composition", 32, 4.0), _bench("compiled", 32, 3.9), _bench("op", 32, 3.5),
        _bench("composition", 256, 80.0), _bench("compiled", 256, 80.0), _bench("op", 256, 80.0),
    ])
    assert "at least as fast as the composition and its compile: MET" in text
    assert "B=32: op / composition = 0.875" in text
    assert "B=256: op / compiled = 1.000" in text
    assert "GPU targets not evaluated" in text
    assert "| K10 M207 dk32 dv768 | fwd_bwd | 32 | op |" in text


def test_class_aware_target_not_met_when_any_baseline_is_faster(tmp_path: Path) -> None:
    text = _report(tmp_path, [
        _bench("composition", 32, 4.0), _bench("compiled", 32, 3.0), _bench("op", 32, 3.5),
    ])
    assert "compile: NOT met" in text
    assert "B=32: op / compiled = 1.167" in text


def test_class_aware_target_per_device(tmp_path: Path) -> None:
    text = _report(tmp_path, [
        _bench("composition", 32, 4.0, "cpu"), _bench("op", 32, 3.0, "cpu"),
        _bench("composition", 32, 1.0, "cuda"), _bench("op", 32, 2.0, "cuda"),
    ])
    assert "(cpu) at least as fast as the composition and its compile: MET" in text
    assert "(cuda) at least as fast as the composition and its compile: NOT met" in text
