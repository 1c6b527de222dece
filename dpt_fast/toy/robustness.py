"""Does the toy recipe's outcome survive a change of floating-point rounding?

The demo's training is deterministic on one machine, but another CPU (AVX-512 instead of AVX2
kernels), another thread count or another library build rounds differently. A recipe whose
result hinges on that rounding (a loss that jumps, then wanders chaotically) gives every
machine a different headline. This module runs the demo's training in subprocesses under
environments that change the rounding and checks the issue's criteria on each run:

* the method's accuracy beats the toy CLIP's zero-shot accuracy by ``MIN_GAIN`` points;
* after the warm-up, no epoch's mean training loss exceeds the previous epoch's by more than
  ``MAX_LOSS_INCREASE`` (relative);
* for one seed, the accuracies across environments lie within ``MAX_SPREAD`` points.

Used by ``tests/toy/test_toy.py`` (a cross-environment check in every ``pytest`` run) and
``benchmarks/toy_robustness.py`` (the full table).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Environment variables that choose CPU kernels or thread counts, so change the rounding.
ROUNDING_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                      "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
ENVIRONMENTS: dict[str, dict[str, str]] = {
    "default": {},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    # No SIMD kernels in ATen: the most different rounding a single x86 machine offers, a
    # stand-in for "another CPU".
    "no_simd": {"ATEN_CPU_CAPABILITY": "default"},
}
MIN_GAIN = 5.0  # points over zero-shot
MAX_LOSS_INCREASE = 0.25  # relative, epoch over epoch, after the warm-up
MAX_SPREAD = 3.0  # points, across environments for one (method, seed)


def distinct_environments() -> tuple[str, ...]:
    """Three environments that round differently on this machine: the default, one thread,
    and the AVX2 kernels where the default ones are AVX-512; on a machine whose default is
    already AVX2 (the AVX2 environment would repeat the default), ATen's kernels without SIMD
    take its place."""
    import torch

    third = "avx2" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "no_simd"
    return ("default", "omp1", third)


def environment(name: str) -> dict[str, str]:
    """``os.environ`` with the rounding variables replaced by those of ``ENVIRONMENTS[name]``
    (the inherited ones removed, so "default" is the machine's default)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown rounding environment {name!r}; valid: {sorted(ENVIRONMENTS)}")
    env = {k: v for k, v in os.environ.items() if k not in ROUNDING_VARIABLES}
    env.update(ENVIRONMENTS[name])
    env["TQDM_DISABLE"] = "1"  # no progress bars in a captured subprocess
    return env


def run_demo_in(name: str, output_dir: str | Path, *, methods: tuple[str, ...],
                seeds: tuple[int, ...], data_dir: str | Path | None = None,
                epochs: int | None = None, timeout: float = 1800) -> dict:
    """Run the demo's training (no timing) in a subprocess under environment ``name``; its
    ``results.json``. The task is written to ``data_dir`` (shared between runs) if given."""
    output_dir = Path(output_dir)
    command = [sys.executable, "-m", "dpt_fast.toy.demo", "--no-timing",
               "--output-dir", str(output_dir), "--methods", *methods,
               "--seeds", *map(str, seeds)]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    result = subprocess.run(command, env=environment(name), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"demo under {name} failed ({result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return json.loads((output_dir / "results.json").read_text())


def loss_changes(epoch_loss: list[float], warmup_epochs: int) -> list[tuple[int, float]]:
    """(epoch, relative change of the mean training loss over the previous epoch) for each
    epoch after the warm-up; epochs are 1-based.

    The first epoch after the warm-up is compared with the last warm-up epoch: the jump from
    the warm-up learning rate to the full one is where an unstable recipe first shows.
    """
    return [(epoch + 1, epoch_loss[epoch] / epoch_loss[epoch - 1] - 1)
            for epoch in range(max(warmup_epochs, 1), len(epoch_loss))]


def table(results: dict[str, dict]) -> list[dict]:
    """One row per (environment, method, seed) from ``{environment: demo results}``."""
    rows = []
    for name, res in results.items():
        for run in res["runs"]:
            changes = loss_changes(run["epoch_loss"], res["recipe"]["warmup_epochs"])
            rows.append({"environment": name, "method": run["method"], "seed": run["seed"],
                         "zero_shot": res["zero_shot_accuracy"], "accuracy": run["accuracy"],
                         "gain": run["accuracy"] - res["zero_shot_accuracy"],
                         "max_loss_increase": max((c for _, c in changes), default=0.0),
                         "loss_jumps": [(e, c) for e, c in changes if c > MAX_LOSS_INCREASE]})
    return rows


def spreads(rows: list[dict]) -> dict[tuple[str, int], float]:
    """max - min accuracy across environments, per (method, seed)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["seed"]), []).append(row["accuracy"])
    return {key: max(accs) - min(accs) for key, accs in groups.items()}


def failures(rows: list[dict], gain_methods: tuple[str, ...] = ("dpt",)) -> list[str]:
    """The issue's criteria, one message per violation (empty: all hold).

    The gain criterion applies to ``gain_methods`` (the issue states it for DPT); the loss and
    spread criteria to every method.
    """
    problems = []
    for row in rows:
        where = f"{row['method']} seed {row['seed']} under {row['environment']}"
        if row["method"] in gain_methods and row["gain"] < MIN_GAIN:
            problems.append(f"{where}: {row['accuracy']:.1f}% is {row['gain']:+.1f} points over "
                            f"zero-shot, below +{MIN_GAIN}")
        for epoch, increase in row["loss_jumps"]:
            problems.append(f"{where}: loss rose {100 * increase:.0f}% at epoch {epoch}")
    for (method, seed), spread in spreads(rows).items():
        if spread > MAX_SPREAD:
            problems.append(f"{method} seed {seed}: accuracies across environments spread "
                            f"{spread:.1f} points, above {MAX_SPREAD}")
    return problems


def markdown(rows: list[dict]) -> str:
    """The table: per (method, seed), the accuracy in each environment, the spread and the
    largest epoch-over-epoch loss increase after the warm-up."""
    names = list(dict.fromkeys(row["environment"] for row in rows))
    keys = list(dict.fromkeys((row["method"], row["seed"]) for row in rows))
    cell = {(r["environment"], r["method"], r["seed"]): r for r in rows}
    spread = spreads(rows)
    zero_shot = {r["environment"]: r["zero_shot"] for r in rows}
    lines = ["| method | seed | " + " | ".join(names) + " | spread | max loss rise |",
             "|---|---|" + "---|" * len(names) + "---|---|",
             "| zero-shot | – | " + " | ".join(f"{zero_shot[n]:.1f}" for n in names)
             + " | " + f"{max(zero_shot.values()) - min(zero_shot.values()):.1f} | – |"]
    for method, seed in keys:
        accs = [cell[(n, method, seed)]["accuracy"] for n in names]
        rise = max(cell[(n, method, seed)]["max_loss_increase"] for n in names)
        lines.append(f"| {method} | {seed} | " + " | ".join(f"{a:.1f}" for a in accs)
                     + f" | {spread[(method, seed)]:.1f} | {100 * rise:+.0f}% |")
    by_method: dict[str, list[float]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row["accuracy"])
    lines.append("")
    lines.append("Mean ± std over all seeds and environments: " + "; ".join(
        f"{m} {statistics.mean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0.0:.1f}"
        for m, a in by_method.items()))
    return "\n".join(lines)
