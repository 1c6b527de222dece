"""benchmarks/cpu_precision.py end to end on a tiny configuration (seconds), so that the script
keeps running as the package changes; the numbers themselves are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmark_scripts import BENCHMARKS


def test_cpu_precision_script_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "cpu_precision.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cpu_precision.py"), "--clip", "tiny", "--classes",
         "12", "--rounds", "1", "--threads", "1", "--toy-epochs", "1", "--toy-shots", "1",
         "--toy-test-per-class", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for mode in ("train", "eval"):
        speed = report["speed"][mode]
        assert speed["fp32"]["median_s"] > 0 and speed["bf16"]["median_s"] > 0
        assert speed["bf16_over_fp32"] > 0
    accuracy = report["accuracy"]
    assert 0 <= accuracy["fp32"]["accuracy"] <= 100 and 0 <= accuracy["bf16"]["accuracy"] <= 100
    assert set(report["cpu"]["flags"]) >= {"avx512_bf16", "amx_bf16"}
    assert report["torch"] and report["date"] and report["threads"] == 1
    assert "toy DPT test accuracy" in result.stdout  # the table
