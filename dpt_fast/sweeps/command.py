"""The ``dpt-fast sweep`` command: its flags, its checks before any run, ``--dry-run`` /
``--estimate``, ``--emit-slurm``, and the run itself (:mod:`dpt_fast.sweeps.runner`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from dpt_fast.engine.config import TrainConfig
from dpt_fast.engine.recipe import template_is_fixed
from dpt_fast.methods import METHOD_NAMES, get_method
from dpt_fast.sweeps.plan import (
    PROTOCOLS,
    PlannedRun,
    SweepGrid,
    check_grid,
    check_options,
    parse_shard,
    plan_runs,
    run_state,
    shard_runs,
)
from dpt_fast.sweeps.slurm import (
    DEFAULT_CPUS,
    DEFAULT_SHARDS,
    DEFAULT_TIME,
    LAUNCHERS,
    PLAN_ONLY_FLAGS,
    SLURM_OPTIONS,
    SlurmJob,
    check_slurm_time,
    command_without,
    resolve_gpus,
    write_slurm_script,
)

if TYPE_CHECKING:
    import torch

    from dpt_fast.base import DPTBase

log = logging.getLogger("dpt_fast")

# The grid's names: list flags of `sweep` and keys of its --config YAML.
GRID_KEYS = ("datasets", "shots", "seeds", "methods", "protocol", "source", "targets")
# TrainConfig / DPTConfig fields the grid sets per run: not flags of `sweep`.
PER_RUN_FIELDS = frozenset({"dataset", "shots", "seed", "method", "subsample", "resume"})


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (each run is one `dpt-fast train`)")
    grid.add_argument("--protocol", choices=PROTOCOLS, default=argparse.SUPPRESS,
                      help="few-shot (default): every dataset x shots x seed; base2new: train "
                           "on the base classes, evaluate base and new; cross-dataset / dg: "
                           "train on --source, evaluate every target with its prompts")
    grid.add_argument("--datasets", nargs="+", default=argparse.SUPPRESS,
                      help="datasets trained on (default: the 11 CoOp datasets; with "
                           "cross-dataset, the targets are these less the source)")
    grid.add_argument("--shots", nargs="+", type=int, default=argparse.SUPPRESS,
                      help="shot counts (default: 1 2 4 8 16 for few-shot, 16 otherwise)")
    grid.add_argument("--seeds", nargs="+", type=int, default=argparse.SUPPRESS,
                      help="seeds (default: 1 2 3)")
    grid.add_argument("--methods", nargs="+", default=argparse.SUPPRESS,
                      help="registered methods (default: dpt; see docs/methods.md): "
                           + ", ".join(METHOD_NAMES))
    grid.add_argument("--source", default=argparse.SUPPRESS,
                      help="cross-dataset / dg: the dataset trained on (default: imagenet)")
    grid.add_argument("--targets", nargs="+", default=argparse.SUPPRESS,
                      help="cross-dataset / dg: the datasets evaluated (default: the other "
                           "--datasets; dg: imagenetv2 imagenet_sketch imagenet_a imagenet_r)")
    how = parser.add_argument_group("sweep")
    how.add_argument("--shard", default=None, metavar="I/N",
                     help="do the I-th of N fixed slices of the runs (0 <= I < N)")
    how.add_argument("--dry-run", action="store_true",
                     help="list the runs (done / partial / to do) and the work they need, "
                          "then stop")
    how.add_argument("--estimate", action="store_true",
                     help="with --dry-run: time 20 training steps and one evaluation batch "
                          "per method on the device and print the expected wall time")
    how.add_argument("--fail-fast", action="store_true",
                     help="stop at the first failed run (default: record it and go on)")
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--emit-slurm", type=Path, metavar="JOB.sh",
                       help="write a SLURM array script (one array task per shard) and stop")
    slurm.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: run the sweep here (default); submitit: submit it to SLURM "
                            "as an array (the --slurm-* options) through the submitit package "
                            "and stop")
    slurm.add_argument("--slurm-shards", type=int, default=DEFAULT_SHARDS,
                       help=f"array tasks (default: {DEFAULT_SHARDS}, at most the runs)")
    slurm.add_argument("--slurm-gpus", type=int, default=None,
                       help="GPUs per array task; 0 asks for none (CPU clusters and "
                            "partitions); more than 1 runs each shard with torchrun (DDP) "
                            "(default: 0 with --device cpu, else 1)")
    slurm.add_argument("--slurm-cpus", type=int, default=DEFAULT_CPUS,
                       help=f"CPU cores per array task (default: {DEFAULT_CPUS})")
    slurm.add_argument("--slurm-time", default=DEFAULT_TIME, help="time limit per array task: "
                       "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
                       f"(default: {DEFAULT_TIME})")
    slurm.add_argument("--slurm-partition", default=None, help="partition (default: the "
                       "cluster's)")


def grid_from(args: argparse.Namespace, yaml_values: dict) -> SweepGrid:
    """The grid: flags over YAML keys over the defaults."""
    values = {k: yaml_values[k] for k in GRID_KEYS if k in yaml_values}
    values.update({k: getattr(args, k) for k in GRID_KEYS if hasattr(args, k)})
    for name in ("datasets", "methods", "targets"):
        if name in values and isinstance(values[name], str):
            values[name] = values[name].split()
    for name in ("shots", "seeds"):
        if name in values and not isinstance(values[name], list | tuple):
            values[name] = [values[name]]
        if name in values:
            try:
                values[name] = [int(v) for v in values[name]]
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be integers, got {values[name]!r}") from None
    for name in ("datasets", "methods", "targets", "shots", "seeds"):
        if name in values:
            values[name] = tuple(values[name])
    return SweepGrid(**values)


def read_indexes(grid: SweepGrid, root: str) -> tuple[dict, list[str]]:
    """The index of every dataset of ``grid`` under ``root``, read once (the checks, the dry
    run and the sweep's session all use these), and the problems of those that cannot be read.
    """
    from dpt_fast.data.datasets import read_dataset_index

    indexes, problems = {}, []
    for dataset in dict.fromkeys((*grid.train_datasets(), *grid.target_datasets())):
        try:
            indexes[dataset] = read_dataset_index(dataset, root)
        except (FileNotFoundError, ValueError, KeyError) as err:
            problems.append(str(err.args[0] if isinstance(err, KeyError) else err))
    return indexes, problems


def check_data(runs: list[PlannedRun], indexes: dict) -> list[str]:
    """Shot counts no class of a run's dataset reaches (``indexes``: :func:`read_indexes`)."""
    largest = {name: max(Counter(item.label for item in index.raw.train).values(), default=0)
               for name, index in indexes.items()}
    problems = []
    for run in runs:
        most = largest.get(run.dataset)
        if most is not None and run.shots > most:
            problems.append(f"{run.dataset} cannot give {run.shots} shots: its largest class "
                            f"has {most} training images")
    return sorted(set(problems), key=problems.index)


def _work(run: PlannedRun, indexes: dict, counts: Counter) -> tuple[int, int]:
    """(training image-steps, evaluation images) of one run; ``counts``: training images per
    label of its dataset."""
    from dpt_fast.data.fewshot import select_subsample_labels

    index = indexes[run.dataset]
    kept = select_subsample_labels(list(counts), run.config.subsample)
    train = sum(min(run.shots, counts[label]) for label in kept)
    evaluated = len(index.raw.test)  # base2new: base and new halves together
    for target in run.targets:
        evaluated += len(indexes[target].raw.test)
    # The SGD loop passes over the training images each epoch; a fitted classifier reads
    # their frozen features once; zero-shot CLIP reads none.
    passes = {"sgd": run.config.epochs, "fit": 1, "none": 0}[get_method(run.method).training]
    return passes * train, evaluated


def describe_plan(runs: list[PlannedRun], template_explicit: bool, indexes: dict,
                  seconds: dict[str, tuple[float, float]] | None = None) -> str:
    """The ``--dry-run`` table: each run's state and work, totals, and with ``seconds`` (per
    method: seconds per training image, per evaluation image) the expected wall time."""
    lines = [f"{'run':<44} {'state':<8} {'image-steps':>12} {'eval images':>12}"]
    totals: Counter = Counter()
    expected = 0.0
    trained = {run.dataset for run in runs}
    counts = {name: Counter(item.label for item in index.raw.train)
              for name, index in indexes.items() if name in trained}
    for run in runs:
        state, why = run_state(run, template_explicit)
        steps, evaluated = _work(run, indexes, counts[run.dataset])
        totals[state] += 1
        if state != "done":
            totals["steps"] += steps
            totals["eval"] += evaluated
            if seconds is not None:
                per_step, per_eval = seconds[run.method]
                expected += steps * per_step + evaluated * per_eval
        lines.append(f"{run.name:<44} {state:<8} {steps:>12,} {evaluated:>12,}"
                     + (f"  ({why})" if why else ""))
    lines.append(f"{len(runs)} runs: {totals['done']} done, {totals['partial']} partial, "
                 f"{totals['to do']} to do, {totals['conflict']} conflicting | left: "
                 f"{totals['steps']:,} training image-steps, {totals['eval']:,} evaluation "
                 "images")
    if seconds is not None:
        from dpt_fast.engine.progress import format_duration

        lines.append(f"expected wall time of what is left: {format_duration(expected)} (model "
                     "time from the timings above; data loading and start-up not included)")
    return "\n".join(lines)


def emit_slurm(path: Path, argv: list[str], job: SlurmJob, n_runs: int,
               output_dir: Path) -> int:
    """Write the SLURM array script running this sweep (:mod:`dpt_fast.sweeps.slurm`)."""
    command = command_without(argv, SLURM_OPTIONS, PLAN_ONLY_FLAGS)
    script = write_slurm_script(path, job, command, n_runs, output_dir)
    print(f"wrote {script}: {job.shards} array tasks for {n_runs} runs"
          f"{f', {job.gpus} GPU(s) each' if job.gpus else ', no GPU'}; submit with "
          f"`sbatch {script}` (from any folder)")
    return 0


def submit_array(argv: list[str], job: SlurmJob, n_runs: int, output_dir: Path) -> int:
    """``--launcher submitit``: submit the array (:mod:`dpt_fast.sweeps.submitit_launcher`)."""
    from dpt_fast.sweeps.submitit_launcher import submit_with_submitit

    ids = submit_with_submitit(job, command_without(argv, SLURM_OPTIONS, PLAN_ONLY_FLAGS),
                               output_dir)
    print(f"submitted {ids[0].split('_')[0]} through submitit: {job.shards} array tasks for "
          f"{n_runs} runs (job ids {', '.join(ids)}); the same command again resumes")
    return 0


def estimate_seconds(runs: list[PlannedRun], device_name: str
                     ) -> dict[str, tuple[float, float]]:
    """Per method: (seconds per training image, seconds per evaluation image), from 20 timed
    training steps and one evaluation batch of the fast model on random images of the first
    run's shape (the device's compute only)."""
    import torch

    from dpt_fast.engine.device import autocast_dtype
    from dpt_fast.engine.session import Session
    from dpt_fast.methods import create_method

    out: dict[str, tuple[float, float]] = {}
    with Session(device_name) as session:
        for method in dict.fromkeys(run.method for run in runs):
            run = next(r for r in runs if r.method == method)
            config = run.config
            clip = session.clip(config.backbone, config.pretrained).module
            # shots -1: the full splits, which writes no few-shot file
            index_classes = session.splits(config.dataset, config.root, -1, config.seed,
                                           config.subsample).classnames
            model = create_method(method, clip, index_classes, config.model)
            size = model.geometry.image_size[0]
            device = session.device
            amp = autocast_dtype(config.precision, device)
            images = torch.randn(config.batch_size, 3, size, size, device=device)
            labels = torch.randint(len(index_classes), (config.batch_size,), device=device)
            if get_method(method).training == "sgd":
                per_train, per_eval = _time_model(model, images, labels, amp,
                                                  config.eval_batch_size)
            else:  # its "training" images go through the frozen pass, as evaluation's
                per_eval = _time_eval(model, images, amp, config.eval_batch_size)
                per_train = per_eval
            out[method] = (per_train, per_eval)
            print(f"{method}: {1 / per_train:.1f} training images/s, {1 / per_eval:.1f} "
                  f"evaluation images/s on {device} ({config.backbone})")
    return out


def _time_model(model: DPTBase, images: torch.Tensor, labels: torch.Tensor,
                amp: torch.dtype | None, eval_batch_size: int) -> tuple[float, float]:
    """Seconds per image of a training step (20 timed after 2) and of an evaluation batch."""
    import time

    import torch

    device = images.device
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model.loss(model(images), labels, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(20):
        step()
    _sync(device)
    per_train = (time.perf_counter() - start) / (20 * images.shape[0])
    return per_train, _time_eval(model, images, amp, eval_batch_size)


def _time_eval(model: torch.nn.Module, images: torch.Tensor, amp: torch.dtype | None,
               eval_batch_size: int) -> float:
    """Seconds per image of an evaluation batch."""
    import time

    import torch

    device = images.device
    model.eval()
    batch = torch.randn(eval_batch_size, *images.shape[1:], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model(batch[:2])
        _sync(device)
        start = time.perf_counter()
        model(batch)
        _sync(device)
    return (time.perf_counter() - start) / eval_batch_size


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep_main(args: argparse.Namespace, base: TrainConfig, explicit: frozenset[str],
               yaml_values: dict, argv: list[str]) -> int:
    """Plan, check and do (or describe) the sweep; returns the exit status."""
    grid = grid_from(args, yaml_values)
    problems = check_grid(grid)
    if not problems:
        problems += check_options(explicit, grid.methods)
    if args.estimate and not args.dry_run:
        problems.append("--estimate goes with --dry-run")
    shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
    if args.slurm_shards < 1 or args.slurm_cpus < 1:
        problems.append("--slurm-shards and --slurm-cpus must be >= 1")
    gpus, gpu_problems = resolve_gpus(args.slurm_gpus, base.device, "device" in explicit)
    time_problem = check_slurm_time(args.slurm_time)
    to_slurm = args.emit_slurm is not None or args.launcher == "submitit"
    if to_slurm:
        problems += gpu_problems + ([time_problem] if time_problem else [])
    if args.launcher == "submitit" and (args.emit_slurm is not None or args.dry_run
                                        or args.shard is not None):
        problems.append("--launcher submitit submits the whole array: not with --emit-slurm, "
                        "--dry-run or --shard")
    if problems:
        raise ValueError("; ".join(problems))
    output_dir = Path(base.output_dir)
    template_explicit = template_is_fixed(base, explicit)
    runs = plan_runs(base, explicit, grid, output_dir)
    indexes, problems = read_indexes(grid, base.root)
    problems += check_data(runs, indexes)
    if problems:
        raise ValueError("; ".join(problems))
    from dpt_fast.sweeps.runner import conflicts, run_sweep

    clashing = conflicts(runs, template_explicit)
    if clashing:
        raise ValueError(f"{len(clashing)} run folder(s) hold runs with other settings: "
                         f"{', '.join(clashing[:5])}{' ...' if len(clashing) > 5 else ''}; "
                         "choose another --output-dir or the settings they were run with")
    if to_slurm:
        job = SlurmJob(shards=max(1, min(args.slurm_shards, len(runs))), gpus=gpus,
                       cpus=args.slurm_cpus, time=args.slurm_time,
                       partition=args.slurm_partition)
        if args.launcher == "submitit":
            return submit_array(argv, job, len(runs), output_dir)
        return emit_slurm(args.emit_slurm, argv, job, len(runs), output_dir)
    mine = shard_runs(runs, *shard)
    if args.dry_run:
        seconds = estimate_seconds(mine, base.device) if args.estimate else None
        print(describe_plan(mine, template_explicit, indexes, seconds))
        return 0
    log.info("sweep: %d runs%s in %s", len(mine),
             f" (shard {shard[0]}/{shard[1]} of {len(runs)})" if shard[1] > 1 else "",
             output_dir)
    outcome = run_sweep(mine, template_explicit=template_explicit, fail_fast=args.fail_fast,
                        device=base.device,
                        indexes={(name, base.root): index for name, index in indexes.items()})
    print(f"sweep: {len(outcome.done)} run(s) done now, {len(outcome.skipped)} done before, "
          f"{len(outcome.busy)} held by other processes, {len(outcome.failed)} failed")
    for name in outcome.busy:
        print(f"  held by another process (its folder's lock): {name}")
    if outcome.failed:
        for name, error in outcome.failed.items():
            print(f"  FAILED {name}: {error}", file=sys.stderr)
        return 1
    return 0
