"""Running the installed ``dpt-fast`` console script as a user would, and reading its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dpt_fast import checkpoint as ckpt

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


# Fields of results.json that say where and how fast a run ran, not what it computed.
_WHERE_AND_WHEN = ("output_dir", "images_per_s")


def comparable_results(value):
    """results.json (or a part of it) less the fields that record where and how fast it ran."""
    if isinstance(value, dict):
        return {k: comparable_results(v) for k, v in value.items() if k not in _WHERE_AND_WHEN}
    if isinstance(value, list):
        return [comparable_results(v) for v in value]
    return value


def run_prompts(folder: Path) -> dict[str, torch.Tensor]:
    """The trained prompts in a run folder's last checkpoint."""
    tensors, _ = ckpt.read_checkpoint(folder / CHECKPOINT)
    return ckpt.model_state(tensors)
