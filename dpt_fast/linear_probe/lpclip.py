"""``python -m dpt_fast.linear_probe``: a drop-in for lpclip's ``linear_probe.py``.

Reads lpclip's feature files ``FEATURE_DIR/DATASET/{train,val,test}.npz`` (arrays
``feature_list`` (N, E) and ``label_list`` (N,), as ``lpclip/feat_extractor.py`` writes them)
and does what the script does: for 1, 2, 4, 8 and 16 shots and seeds 1 … ``--num-run``, the
same few-shot draws (``np.random.seed(seed)``, then ``np.random.choice`` per label, training
then validation images), the same search of C (:mod:`dpt_fast.linear_probe.search`), the same
test accuracies, printed in the same lines and appended to the same report files
(``report/<feature_dir>_s<steps>r<runs>_details.txt`` and ``…_s<steps>r<runs>.txt``).

Unlike the script, a missing or malformed ``.npz`` and a class with too few images to draw
stop with one line naming the file or the class (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dpt_fast.linear_probe.search import NUM_STEPS, VAL_SHOTS, draw_per_class, search_c

SPLITS = ("train", "val", "test")
SHOT_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16)  # lpclip's loop
NUM_RUNS = 10  # lpclip's default --num_run: seeds 1 … 10
SEED_RULE_WIDTH = 62  # dashes after "-- Seed: N " in lpclip's seed line
EXIT_USAGE = 2

Features = tuple[np.ndarray, np.ndarray]


class FeatureFileError(ValueError):
    """A feature file that is missing or not lpclip's format; the message names it."""


def read_features(path: Path) -> Features:
    """``(feature_list (N, E), label_list (N,))`` of one lpclip ``.npz``.

    Raises:
        FeatureFileError: the file is missing, unreadable, lacks an array, or its arrays do
            not fit together; the message names the file.
    """
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such feature file (lpclip's feat_extractor.py "
                               "writes train.npz, val.npz and test.npz under FEATURE_DIR/DATASET)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("feature_list", "label_list") if k not in data.files]
            if missing:
                raise FeatureFileError(f"{path}: no array {', '.join(missing)} (it has "
                                       f"{', '.join(data.files) or 'none'})")
            features, labels = data["feature_list"], data["label_list"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, FeatureFileError):
            raise
        raise FeatureFileError(f"{path}: not a readable .npz file ({err})") from None
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise FeatureFileError(f"{path}: feature_list must be (N, E) and label_list (N,), got "
                               f"{features.shape} and {labels.shape}")
    if len(labels) == 0:
        raise FeatureFileError(f"{path}: holds no samples")
    if not np.issubdtype(features.dtype, np.number) or not np.issubdtype(labels.dtype,
                                                                          np.integer):
        raise FeatureFileError(f"{path}: feature_list must be numbers and label_list integers, "
                               f"got {features.dtype} and {labels.dtype}")
    return features, labels


def read_feature_dir(feature_dir: str, dataset: str) -> dict[str, Features]:
    """The three splits of ``feature_dir/dataset`` (lpclip's ``os.path.join`` of the two)."""
    folder = Path(os.path.join(feature_dir, dataset))
    splits = {split: read_features(folder / f"{split}.npz") for split in SPLITS}
    widths = {split: f.shape[1] for split, (f, _) in splits.items()}
    if len(set(widths.values())) != 1:
        raise FeatureFileError(f"{folder}: the splits' features differ in width {widths}")
    return splits


def report_paths(feature_dir: str, num_step: int, num_run: int,
                 report_dir: str = "report") -> tuple[Path, Path]:
    """lpclip's report files: the per-step details and the per-shot summary."""
    stem = f"{feature_dir}_s{num_step}r{num_run}"
    return (Path(f"./{report_dir}/{stem}_details.txt"), Path(f"./{report_dir}/{stem}.txt"))


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as writer:
        writer.write(line)


def run_lpclip(splits: dict[str, Features], dataset: str, feature_dir: str, *,
               num_step: int = NUM_STEPS, num_run: int = NUM_RUNS, report_dir: str = "report",
               shot_counts: Sequence[int] = SHOT_COUNTS,
               echo: Callable[[str], None] = print) -> dict[int, np.ndarray]:
    """lpclip's experiment on ``splits``; returns, per shot count, the test accuracies (%) of
    every seed (row) and step (column)."""
    (train_f, train_l), (val_f, val_l) = splits["train"], splits["val"]
    test = splits["test"]
    details, summary = report_paths(feature_dir, num_step, num_run, report_dir)
    out: dict[int, np.ndarray] = {}
    for num_shot in shot_counts:
        accuracies = np.zeros([num_run, num_step])
        for seed in range(1, num_run + 1):
            # lpclip's draws come from numpy's global legacy generator, seeded per run.
            np.random.seed(seed)  # noqa: NPY002
            echo(f"-- Seed: {seed} {'-' * SEED_RULE_WIDTH}")
            classes = np.unique(train_l)
            train_idx = draw_per_class(train_l, classes, num_shot,
                                       f"{dataset} train.npz ({num_shot} shots, seed {seed})")
            val_idx = draw_per_class(val_l, classes, VAL_SHOTS[num_shot],
                                     f"{dataset} val.npz ({num_shot} shots, seed {seed})")
            result = search_c((train_f[train_idx], train_l[train_idx]),
                              (val_f[val_idx], val_l[val_idx]), num_step, test)
            echo(str(result.grid_accuracies))
            for step, done in enumerate(result.steps):
                echo(f"{dataset}, {num_shot} Shot, Round {step}: {done.c_left}/{done.c_right}")
                echo(f"Val accuracy (Left): {100 * done.val_left:.2f}")
                echo(f"Val accuracy (Right): {100 * done.val_right:.2f}")
                echo(f"Test Accuracy: {done.test_accuracy:.2f}")
                accuracies[seed - 1, step] = done.test_accuracy
                _append(details, (f"{dataset}, seed {seed}, {num_shot} shot, weight {done.c}, "
                                  f"test_acc {done.test_accuracy:.2f}\n"))
        last = accuracies[:, -1]
        line = (f"{dataset}, {num_shot} Shot, Test acc stat: {np.mean(last):.2f} "
                f"({np.std(last):.2f})\n")
        echo(line)
        _append(summary, line)
        out[num_shot] = accuracies
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpt_fast.linear_probe",
        description="lpclip's linear probe (KaiyangZhou/CoOp lpclip/linear_probe.py) on its "
                    "feature files: same draws, same C, same accuracies, same report lines.")
    # lpclip's own spellings (--num_step) are accepted too, so its commands run unchanged.
    parser.add_argument("--dataset", default="",
                        help="the dataset's folder under FEATURE_DIR")
    parser.add_argument("--num-step", "--num_step", type=int, default=NUM_STEPS,
                        dest="num_step", help=f"bisection steps (default: {NUM_STEPS})")
    parser.add_argument("--num-run", "--num_run", type=int, default=NUM_RUNS, dest="num_run",
                        help=f"seeds 1 … N (default: {NUM_RUNS})")
    parser.add_argument("--feature-dir", "--feature_dir", default="clip_feat",
                        dest="feature_dir", help="lpclip's feature folder (default: clip_feat)")
    parser.add_argument("--report-dir", default="report",
                        help="where the report files go (default: report, as lpclip)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_step < 1 or args.num_run < 1:
            raise ValueError(f"--num-step and --num-run must be >= 1, got {args.num_step} and "
                             f"{args.num_run}")
        splits = read_feature_dir(args.feature_dir, args.dataset)
        os.makedirs(args.report_dir, exist_ok=True)
        run_lpclip(splits, args.dataset, args.feature_dir, num_step=args.num_step,
                   num_run=args.num_run, report_dir=args.report_dir,
                   echo=lambda line: print(line, flush=True))
    except ValueError as err:
        print(f"python -m dpt_fast.linear_probe: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


__all__ = ["FeatureFileError", "main", "read_feature_dir", "read_features", "run_lpclip"]
