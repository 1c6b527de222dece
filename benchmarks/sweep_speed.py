"""A sweep in one process against the same runs as separate ``dpt-fast train`` processes.

Each round times, as whole processes from the outside, (a) one ``dpt-fast sweep`` of the grid
and (b) one ``dpt-fast train`` process per run of the grid, one after the other; the two
alternate in order from round to round so that a drifting machine favours neither. Every
timed command starts from empty output folders and an empty cache folder (a cold start, as a
first sweep has). Reported: each round's seconds, the medians and the ratio sweep / separate
per round.

    python benchmarks/sweep_speed.py --rounds 3 --out benchmarks/results/sweep_speed.json

The task is the toy task (written once into a temporary folder), the recipe ``--recipe toy``
(the toy CLIP, the demo's training recipe).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from json_report import emit
from loader_speed import machine_info

DPT_FAST = shutil.which("dpt-fast", path=str(Path(sys.executable).parent)) or "dpt-fast"


def run_flags(args: argparse.Namespace, root: Path) -> list[str]:
    return ["--root", str(root), "--recipe", "toy", "--epochs", str(args.epochs),
            "--num-workers", str(args.num_workers), "--device", args.device,
            "--progress", "none"]


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{result.stderr[-3000:]}")
    return seconds


def sweep_seconds(args, root: Path, work: Path, env: dict) -> float:
    out = work / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    return _timed([DPT_FAST, "sweep", *run_flags(args, root), "--datasets", *args.datasets,
                   "--shots", *map(str, args.shots), "--seeds", *map(str, args.seeds),
                   "--methods", args.method, "--output-dir", str(out)], env)


def separate_seconds(args, root: Path, work: Path, env: dict) -> float:
    total = 0.0
    for dataset in args.datasets:
        for shots in args.shots:
            for seed in args.seeds:
                out = work / f"single_{dataset}_{shots}_{seed}"
                shutil.rmtree(out, ignore_errors=True)
                total += _timed([DPT_FAST, "train", *run_flags(args, root), "--dataset",
                                 dataset, "--shots", str(shots), "--seed", str(seed),
                                 "--method", args.method, "--output-dir", str(out)], env)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["dtd"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--method", default="dpt")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)

    from dpt_fast.toy import task

    with tempfile.TemporaryDirectory(prefix="sweep_speed_") as tmp:
        work = Path(tmp)
        root = work / "data"
        task.write_tasks(root, datasets=args.datasets)
        rounds = []
        for number in range(args.rounds):
            timings = {}
            order = ("sweep", "separate") if number % 2 == 0 else ("separate", "sweep")
            for name in order:
                cache = work / f"cache_{name}_{number}"
                env = {**os.environ, "DPT_FAST_CACHE_DIR": str(cache)}
                measure = sweep_seconds if name == "sweep" else separate_seconds
                timings[name] = measure(args, root, work, env)
                shutil.rmtree(cache, ignore_errors=True)
            timings["ratio"] = timings["sweep"] / timings["separate"]
            rounds.append(timings)
            print(f"round {number + 1}: sweep {timings['sweep']:.1f} s, separate "
                  f"{timings['separate']:.1f} s, ratio {timings['ratio']:.3f}", file=sys.stderr)
    runs = len(args.datasets) * len(args.shots) * len(args.seeds)
    report = {
        "what": f"{runs} runs ({args.method}, toy task, {args.epochs} epochs): one "
                "`dpt-fast sweep` vs one `dpt-fast train` process per run, cold caches",
        "date": date.today().isoformat(),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rounds,
        "median_sweep_s": statistics.median(r["sweep"] for r in rounds),
        "median_separate_s": statistics.median(r["separate"] for r in rounds),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
