"""A sweep's grid as data: protocols, the runs they make, their folders and their state.

Each run of a sweep is exactly one ``dpt-fast train`` run (its :class:`TrainConfig` is the
sweep's flags with the run's dataset, shots, seed and method, the recipe applied as the CLI
applies it), in its own folder::

    <output-dir>/<method>/<dataset>/shots_<K>/seed_<S>/             few-shot, cross-dataset
    <output-dir>/<method>/<protocol>/<dataset>/shots_<K>/seed_<S>/  base2new, dg

Cross-dataset and domain generalisation train on the source (all its classes: the few-shot
run of the source, so a few-shot sweep that holds it is reused) and evaluate every target with
the source's prompts, writing ``eval_<target>_all.json`` in the run folder.

Pure Python (no torch): the CLI plans and checks a sweep before any heavy import.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import RESUMABLE, config_diff
from dpt_fast.engine.config import TrainConfig, config_to_dict
from dpt_fast.engine.recipe import apply_recipe
from dpt_fast.engine.run_folder import CONFIG_FILE, LAST_CHECKPOINT, RESULTS_FILE
from dpt_fast.methods import METHOD_NAMES, get_method
from dpt_fast.methods.base import option_flags
from dpt_fast.reports.summary import read_run_results

if TYPE_CHECKING:
    from dpt_fast.data.fewshot import Subsample  # dpt_fast.data imports torch

Protocol = Literal["few-shot", "base2new", "cross-dataset", "dg"]
PROTOCOLS: tuple[str, ...] = ("few-shot", "base2new", "cross-dataset", "dg")
# The 11 datasets of CoOp's few-shot and base-to-new tables.
COOP_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
DG_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
DEFAULT_SHOTS: dict[str, tuple[int, ...]] = {
    # CoOp's few-shot table; the other protocols train on 16 shots, as CoOp/CoCoOp do.
    "few-shot": (1, 2, 4, 8, 16), "base2new": (16,), "cross-dataset": (16,), "dg": (16,)}
DEFAULT_SEEDS: tuple[int, ...] = (1, 2, 3)
DEFAULT_METHODS: tuple[str, ...] = ("dpt",)
DEFAULT_SOURCE = "imagenet"
MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(DPTConfig))
ERROR_FILE = "error.json"  # a failed run's error, written by the sweep (removed on success)

RunState = Literal["done", "partial", "to do", "conflict"]


@dataclass(frozen=True)
class SweepGrid:
    """The runs of a sweep: every (method, dataset, shots, seed) of the protocol."""

    protocol: Protocol = "few-shot"  # few-shot, base2new, cross-dataset, dg
    datasets: tuple[str, ...] = COOP_DATASETS  # trained on (few-shot, base2new)
    shots: tuple[int, ...] | None = None  # None: the protocol's (DEFAULT_SHOTS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS  # one run per seed
    methods: tuple[str, ...] = DEFAULT_METHODS  # registered methods (dpt_fast.methods)
    source: str = DEFAULT_SOURCE  # cross-dataset / dg: the dataset trained on
    targets: tuple[str, ...] | None = None  # cross-dataset / dg: None: the protocol's

    def shot_counts(self) -> tuple[int, ...]:
        return self.shots if self.shots is not None else DEFAULT_SHOTS[self.protocol]

    def train_datasets(self) -> tuple[str, ...]:
        return (self.source,) if self.transfers() else self.datasets

    def target_datasets(self) -> tuple[str, ...]:
        if not self.transfers():
            return ()
        if self.targets is not None:
            return self.targets
        if self.protocol == "dg":
            return DG_TARGETS
        return tuple(d for d in self.datasets if d != self.source)

    def transfers(self) -> bool:
        return self.protocol in ("cross-dataset", "dg")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: what ``dpt-fast train`` it is, and where it lives."""

    method: str
    dataset: str
    shots: int
    seed: int
    protocol: str
    config: TrainConfig  # the run's whole config (output_dir = its folder)
    targets: tuple[str, ...] = ()  # evaluated with its prompts after training

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def name(self) -> str:
        """``dpt/dtd/shots_4/seed_1`` (with the protocol level for base2new and dg)."""
        return run_subpath(self.method, self.protocol, self.dataset, self.shots, self.seed)

    def eval_file(self, target: str) -> Path:
        return self.folder / f"eval_{target}_all.json"


def run_subpath(method: str, protocol: str, dataset: str, shots: int, seed: int) -> str:
    parts = [method]
    if protocol in ("base2new", "dg"):
        parts.append(protocol)
    return "/".join([*parts, dataset, f"shots_{shots}", f"seed_{seed}"])


def plan_runs(base: TrainConfig, explicit: frozenset[str], grid: SweepGrid,
              output_dir: Path) -> list[PlannedRun]:
    """Every run of ``grid``, each with the config ``dpt-fast train`` would build from the
    sweep's flags (``base``, ``explicit``: the fields the user set) and the run's values.

    Ordered by dataset, then method, shots and seed: one dataset's runs follow each other, so
    what they share (its index, its test images) is read while it is at hand.
    """
    runs = []
    subsample = "base" if grid.protocol == "base2new" else "all"
    for dataset in grid.train_datasets():
        for method in grid.methods:
            chosen = get_method(method)
            # A method that reads no training image runs once per dataset: shots 0, the first
            # seed (its result depends on neither).
            shot_counts = grid.shot_counts() if chosen.uses_shots else (0,)
            seeds = grid.seeds if chosen.uses_shots else grid.seeds[:1]
            # The sweep's options that this method does not read: the field's default.
            unread = frozenset(chosen.refused_options(explicit, MODEL_FIELDS))
            method_base = _without(base, unread)
            for shots in shot_counts:
                for seed in seeds:
                    folder = output_dir / run_subpath(method, grid.protocol, dataset, shots, seed)
                    model = dataclasses.replace(method_base.model, method=method)
                    config = dataclasses.replace(
                        method_base, dataset=dataset, shots=shots, seed=seed,
                        subsample=cast("Subsample", subsample), output_dir=str(folder),
                        resume=False, model=model)
                    # The recipe's per-dataset and per-method values, as `train` applies them.
                    config = apply_recipe(config, explicit - unread)
                    runs.append(PlannedRun(method, dataset, shots, seed, grid.protocol, config,
                                           grid.target_datasets()))
    return runs


def _without(config: TrainConfig, names: frozenset[str]) -> TrainConfig:
    """``config`` with the run and model fields ``names`` at their defaults."""
    if not names:
        return config
    run_defaults, model_defaults = TrainConfig(), DPTConfig()
    model = dataclasses.replace(config.model, **{
        name: getattr(model_defaults, name) for name in names if name in MODEL_FIELDS})
    return dataclasses.replace(config, model=model, **{
        name: getattr(run_defaults, name) for name in names if name not in MODEL_FIELDS})


def check_options(explicit: frozenset[str], methods: tuple[str, ...]) -> list[str]:
    """The sweep's options that none of its methods reads (refused: docs/methods.md)."""
    known = [m for m in methods if m in METHOD_NAMES]
    if not known:
        return []
    unread = set.intersection(*(set(get_method(m).refused_options(explicit, MODEL_FIELDS))
                                for m in known))
    if not unread:
        return []
    return [f"none of the methods {', '.join(known)} reads {option_flags(unread)}: drop "
            f"{'it' if len(unread) == 1 else 'them'} (see docs/methods.md)"]


def check_grid(grid: SweepGrid) -> list[str]:
    """The problems of the grid itself (names, counts), each naming its culprit."""
    from dpt_fast.data.datasets import DATASETS

    problems = []
    if grid.protocol not in PROTOCOLS:
        problems.append(f"unknown protocol {grid.protocol!r} (valid: {', '.join(PROTOCOLS)})")
    unknown = [d for d in (*grid.train_datasets(), *grid.target_datasets()) if d not in DATASETS]
    if unknown:
        problems.append(f"unknown dataset(s) {', '.join(sorted(set(unknown)))} (valid: "
                        f"{', '.join(DATASETS)})")
    test_only = [d for d in grid.train_datasets() if d in DATASETS and DATASETS[d].test_only]
    if test_only:
        problems.append(f"test-only dataset(s) {', '.join(test_only)} cannot be trained on "
                        "(use them as --targets of --protocol dg)")
    bad_methods = [m for m in grid.methods if m not in METHOD_NAMES]
    if bad_methods:
        problems.append(f"unknown method(s) {', '.join(bad_methods)} (valid: "
                        f"{', '.join(METHOD_NAMES)})")
    bad_shots = [k for k in grid.shot_counts() if k < 1]  # zeroshot's 0 is set per run
    if bad_shots:
        problems.append(f"shots must be >= 1, got {', '.join(map(str, bad_shots))}")
    for name, values in (("datasets", grid.datasets), ("methods", grid.methods),
                         ("seeds", grid.seeds), ("shots", grid.shot_counts())):
        if not values:
            problems.append(f"--{name} is empty")
        repeated = sorted(str(v) for v, n in Counter(values).items() if n > 1)
        if repeated:
            problems.append(f"--{name} repeats {', '.join(repeated)}")
    if grid.transfers() and not grid.target_datasets():
        problems.append(f"--protocol {grid.protocol} has no target datasets")
    return problems


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N): the I-th of N fixed slices of a sweep's runs."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered "
                         "from 0, as SLURM's array task ids)")
    return index, count


def shard_runs(runs: list[PlannedRun], index: int, count: int) -> list[PlannedRun]:
    """Every ``count``-th run from the ``index``-th: a fixed slice that spreads each dataset's
    runs over the shards."""
    return runs[index::count]


def read_json_dict(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_differences(run: PlannedRun, template_explicit: bool) -> list[str]:
    """How the run saved in ``run``'s folder (its config.json) differs from the planned run,
    ignoring the fields a resume may change; [] when the folder holds no run."""
    saved = read_json_dict(run.folder / CONFIG_FILE)
    if saved is None:
        return []
    planned = config_to_dict(run.config)
    skip = set() if template_explicit else {"template"}  # the dataset's, filled at run time
    return [str(change) for change in config_diff(TrainConfig, saved, planned,
                                                  skip_roles=(RESUMABLE,), skip=skip)]


def run_started(folder: Path) -> bool:
    """Whether a run began in ``folder`` (its config or a checkpoint is there)."""
    return any((folder / name).exists() for name in (CONFIG_FILE, LAST_CHECKPOINT))


def finished_results(folder: Path) -> dict | None:
    """The results.json of a finished training in ``folder`` (as ``dpt-fast report`` reads
    them), or None: missing, torn or without a test accuracy."""
    results = read_run_results(folder / RESULTS_FILE)
    return results if isinstance(results, dict) else None


def evaluations_left(run: PlannedRun) -> list[str]:
    """The targets whose evaluation file is missing or unreadable."""
    return [t for t in run.targets if read_json_dict(run.eval_file(t)) is None]


def run_state(run: PlannedRun, template_explicit: bool) -> tuple[RunState, str]:
    """The state of ``run``'s folder and a short reason: ``done`` (results and, for transfer
    protocols, every target's evaluation), ``partial`` (started, or trained with evaluations
    left), ``to do``, or ``conflict`` (it holds a run with other settings)."""
    folder = run.folder
    if not run_started(folder) and not (folder / RESULTS_FILE).exists():
        return "to do", ""
    differences = run_differences(run, template_explicit)
    if differences:
        return "conflict", "; ".join(differences)
    if finished_results(folder) is None:
        return "partial", "training not finished"
    missing = evaluations_left(run)
    if missing:
        return "partial", f"evaluations left: {', '.join(missing)}"
    return "done", ""
