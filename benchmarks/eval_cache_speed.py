"""``dpt-fast eval`` of one checkpoint with a cold cache, a warm cache and ``--no-cache``.

Two test sets, both classified by the toy CLIP (64 px images) with prompts trained on the toy
task: the toy task's own test split (2,400 small PNGs) and a generated photo-sized set
(500x375 JPEGs at quality 90, the toy task's class names, ``--photos`` per class), read as an
image folder. Each round runs, as whole processes, in turn: cold (an empty cache folder: the
crops and frozen features are built), warm (the same folder again: read back) and uncached;
the order rotates from round to round. Reported per test set and mode: the median whole-process
seconds and the median of the evaluation's own seconds (its ``test: ...`` log line).

    python benchmarks/eval_cache_speed.py --rounds 3 --out benchmarks/results/eval_cache_speed.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from json_report import emit
from loader_speed import machine_info, natural_image

DPT_FAST = shutil.which("dpt-fast", path=str(Path(sys.executable).parent)) or "dpt-fast"
EVAL_LINE = re.compile(r"test: accuracy ([\d.]+)% on (\d+) images \| \S+, ([\d.]+) img/s")


def write_photo_set(root: Path, classnames: list[str], per_class: int) -> int:
    """A folder dataset of photo-sized JPEGs (train: 1 per class, test: ``per_class``)."""
    rng = np.random.default_rng(0)
    count = 0
    for split, n in (("train", 1), ("test", per_class)):
        for name in classnames:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                natural_image(rng, 500, 375).save(folder / f"{i:04d}.jpg", quality=90)
                count += 1
    return count


def run_eval(checkpoint: Path, dataset: str, root: Path, out: Path, flags: list[str],
             env: dict) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [DPT_FAST, "eval", "--checkpoint", str(checkpoint), "--dataset", dataset, "--root",
         str(root), "--device", "cpu", "--num-workers", "0", "--progress", "none",
         "--output-dir", str(out), *flags],
        capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"eval failed:\n{result.stderr[-3000:]}")
    match = EVAL_LINE.search(result.stderr)
    images = int(match.group(2))
    return {"wall_s": wall, "eval_s": images / float(match.group(3)),
            "accuracy": float(match.group(1)), "images": images}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=20, help="photo-sized test images per "
                        "class (24 classes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the timed processes (default 1: steady on a "
                             "shared machine)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from dpt_fast.toy import task

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    report: dict = {"date": date.today().isoformat(), "machine": machine_info(),
                    "settings": {k: v for k, v in vars(args).items() if k != "out"},
                    "sets": {}}
    with tempfile.TemporaryDirectory(prefix="eval_cache_speed_") as tmp:
        work = Path(tmp)
        toy_root, photo_root = work / "toy", work / "photos"
        task.write_task(toy_root)
        photos = write_photo_set(photo_root, task.classnames(), args.photos)
        train = subprocess.run(
            [DPT_FAST, "train", "--root", str(toy_root), "--recipe", "toy", "--dataset", "dtd",
             "--shots", "4", "--epochs", "2", "--num-workers", "0", "--device", "cpu",
             "--no-cache", "--progress", "none", "--output-dir", str(work / "run")],
            capture_output=True, text=True, env=env, check=False)
        if train.returncode != 0:
            raise SystemExit(f"training failed:\n{train.stderr[-3000:]}")
        checkpoint = work / "run" / "checkpoint-last.safetensors"
        for name, dataset, root in (("toy task (2400 PNG, 64 px)", "dtd", toy_root),
                                    (f"photo-sized ({photos - 24} JPEG, 500x375)", "folder",
                                     photo_root)):
            modes: dict[str, list[dict]] = {"cold": [], "warm": [], "no-cache": []}
            for number in range(args.rounds):
                cache = work / f"cache_{number}_{dataset}"
                order = ["cold", "warm", "no-cache"]
                order = order[number % 3:] + order[:number % 3]
                if order.index("warm") < order.index("cold"):  # warm needs cold's cache
                    order.remove("warm")
                    order.insert(order.index("cold") + 1, "warm")
                for mode in order:
                    flags = ["--no-cache"] if mode == "no-cache" else ["--cache-dir", str(cache)]
                    modes[mode].append(run_eval(checkpoint, dataset, root,
                                                work / f"out_{mode}", flags, env))
                shutil.rmtree(cache, ignore_errors=True)
            accuracies = {r["accuracy"] for rows in modes.values() for r in rows}
            report["sets"][name] = {
                mode: {"median_wall_s": statistics.median(r["wall_s"] for r in rows),
                       "median_eval_s": statistics.median(r["eval_s"] for r in rows),
                       "rounds": rows}
                for mode, rows in modes.items()}
            report["sets"][name]["same_accuracy_in_every_mode"] = len(accuracies) == 1
            for mode, rows in modes.items():
                print(f"{name} {mode}: wall {statistics.median(r['wall_s'] for r in rows):.1f} "
                      f"s, evaluation {statistics.median(r['eval_s'] for r in rows):.2f} s",
                      file=sys.stderr)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
