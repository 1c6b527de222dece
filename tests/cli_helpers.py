"""Running the installed ``dpt-fast`` console script as a user would, and reading its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DPT_FAST = shutil.which("dpt-fast", path=str(Path(sys.executable).parent)) or "dpt-fast"
CHECKPOINT = "checkpoint-last.safetensors"


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``dpt-fast ARGS`` (one thread: the probes are tiny) and capture its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([DPT_FAST, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def error_line(result: subprocess.CompletedProcess, status: int) -> str:
    """The single error line of a failed command (asserting its status and no traceback)."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpt-fast:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def train_args(clip_files, root: Path, out: Path, *extra: str, dataset: str = "folder",
               epochs: int = 1) -> list[str]:
    config, weights = clip_files
    return ["train", "--dataset", dataset, "--root", str(root), "--shots", "-1",
            "--backbone", config, "--pretrained", weights, "--epochs", str(epochs),
            "--batch-size", "6", "--num-workers", "0", "--warmup-epochs", "0",
            "--text-warmup-epochs", "0", "--lr", "0.05", "--text-lr", "0.05",
            "--device", "cpu", "--output-dir", str(out), "--n-text-ctx", "4",
            "--cavpt-top-k", "2", *extra]
