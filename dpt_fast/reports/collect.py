"""What ``dpt-fast report`` reads: the runs' results and the evaluations beside them.

Everything is read from the JSON files, nothing from folder names:

* ``results.json`` of ``dpt-fast train`` (:func:`dpt_fast.engine.run.train_run`), read and keyed
  by :mod:`dpt_fast.reports.summary` (the ``--format summary`` table);
* ``eval_<target>_<subsample>.json`` of ``dpt-fast eval`` (:func:`dpt_fast.engine.run.eval_run`)
  in the folder of a results.json: that run's prompts evaluated on another dataset
  (cross-dataset transfer, domain generalisation);
* the results.json of a ``zeroshot`` run (shots 0, all classes): zero-shot CLIP on a dataset,
  as are ``zeroshot_<dataset>.json`` files anywhere in the tree, written by
  :func:`dpt_fast.engine.run_folder.write_zero_shot_result` (and by sweeps of earlier versions)
  as ``{"dataset": str, "backbone": str, "test": report}`` where ``report`` is an evaluation
  report like the ``"test"`` of a results.json (only its ``"accuracy"``, in %, is read).

A file that is not what it should be is skipped and named (:attr:`Found.skipped`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpt_fast.files import is_finite_number
from dpt_fast.reports.summary import (
    differing_settings,
    missing_key_fields,
    read_run_results,
    run_key_values,
    run_settings,
    settings_label,
)

_EVAL_FILE = re.compile(r"eval_(?P<target>.+)_(?P<subsample>all|base|new)\.json")


@dataclass(frozen=True)
class Run:
    """What the tables use of one results.json (and the eval_*.json files beside it)."""

    path: Path
    dataset: str
    method: str
    shots: int
    subsample: str
    backbone: str
    seed: object
    settings: dict
    accuracy: float
    new_accuracy: float | None = None
    harmonic: float | None = None
    transfers: dict[str, float] = field(default_factory=dict)  # target column -> accuracy
    variant: str = ""  # the settings that set it apart from runs of its cell, see _label_variants


@dataclass(frozen=True)
class ZeroShot:
    path: Path
    dataset: str
    backbone: str
    accuracy: float


@dataclass
class Found:
    """The runs and zero-shot results under a folder, and what was noticed reading them."""

    runs: list[Run]
    zero_shot: list[ZeroShot]
    skipped: list[str] = field(default_factory=list)
    older: list[str] = field(default_factory=list)


def _read_report(path: Path, need: Iterable[str] = ("dataset",)) -> dict | str:
    """An eval or zero-shot file: its JSON, or why it is not one (a string)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if not isinstance(data, dict) or not isinstance(data.get("test"), dict) \
            or not is_finite_number(data["test"].get("accuracy")):
        return "no test accuracy in it"
    lacking = [name for name in need if not isinstance(data.get(name), str)]
    if lacking:
        return f"no {' or '.join(repr(n) for n in lacking)} in it"
    return data


def _read_transfers(folder: Path, skipped: list[str]) -> dict[str, float]:
    """``{target column: accuracy}`` of the eval_*.json files in a run's folder."""
    transfers = {}
    for path in sorted(folder.glob("eval_*.json")):
        data = _read_report(path)
        if isinstance(data, str):
            skipped.append(f"{path}: {data}")
            continue
        # The classes evaluated: eval_run names them only in the default file name
        # (eval_<dataset>_<subsample>.json); a name given by the caller means all classes.
        match = _EVAL_FILE.fullmatch(path.name)
        subsample = data.get("subsample", match["subsample"] if match else "all")
        column = data["dataset"] if subsample == "all" else f"{data['dataset']} ({subsample})"
        transfers[column] = float(data["test"]["accuracy"])
    return transfers


def _run(path: Path, results: dict, skipped: list[str]) -> Run | None:
    key = run_key_values(results)
    if not isinstance(key["shots"], int) or isinstance(key["shots"], bool):
        skipped.append(f"{path}: config.shots is not an integer ({key['shots']!r})")
        return None
    new = results.get("test_new")
    return Run(path=path, dataset=str(key["dataset"]), method=str(key["method"]),
               shots=key["shots"], subsample=str(key["subsample"]),
               backbone=str(key["backbone"]), seed=results["config"].get("seed"),
               settings=run_settings(results), accuracy=float(results["test"]["accuracy"]),
               new_accuracy=float(new["accuracy"]) if new else None,
               harmonic=float(results["harmonic_mean"]) if new else None,
               transfers=_read_transfers(path.parent, skipped))


def _label_variants(runs: list[Run]) -> list[Run]:
    """Label each run with the settings that keep it apart from runs of its cell (same method,
    backbone, classes, dataset and shots, other lr, epochs, ...).

    The settings that differ within any cell label every run of the method (backbone, classes),
    so that one value of a swept setting makes one block across all datasets; settings that
    differ only between cells (each dataset's template, per-shot epochs) label nothing.
    """
    cells: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells[run.method, run.backbone, run.subsample][run.dataset, run.shots].append(
            run.settings)
    names = {group: sorted({name for settings in by_cell.values()
                            for name in differing_settings(settings)})
             for group, by_cell in cells.items()}
    return [replace(run, variant=settings_label(
        run.settings, names[run.method, run.backbone, run.subsample])) for run in runs]


def collect(root: Path) -> Found:
    """The runs (with their transfers) and zero-shot results under ``root``.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: neither run results nor zero-shot results under ``root``.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"report: not a folder: {root}")
    found = Found([], [])
    run_folders = set()
    for path in sorted(root.rglob("results.json")):
        results = read_run_results(path)
        if isinstance(results, str):
            found.skipped.append(f"{path}: {results}")
            continue
        run = _run(path, results, found.skipped)
        if run is None:
            continue
        run_folders.add(path.parent)
        if run.shots == 0 and run.subsample == "all":
            # A zero-shot CLIP run (--methods zeroshot): the zero-shot rows and the marker.
            found.zero_shot.append(ZeroShot(path, run.dataset, run.backbone, run.accuracy))
            continue
        found.runs.append(run)
        missing = missing_key_fields(results)
        if missing:
            found.older.append(f"{path}: {', '.join(missing)}")
    for path in sorted(root.rglob("eval_*.json")):
        if path.parent not in run_folders:
            found.skipped.append(f"{path}: no results.json of a training run beside it (the "
                                 "source run)")
    for path in sorted(root.rglob("zeroshot_*.json")):
        data = _read_report(path, need=("dataset", "backbone"))
        if isinstance(data, str):
            found.skipped.append(f"{path}: {data}")
        else:
            found.zero_shot.append(ZeroShot(path, data["dataset"], data["backbone"],
                                            float(data["test"]["accuracy"])))
    if not found.runs and not found.zero_shot:
        why = f"; skipped: {'; '.join(found.skipped)}" if found.skipped else ""
        raise ValueError(f"report: no results of a training run under {root}{why}")
    found.runs = _label_variants(found.runs)
    return found
