"""``dpt-fast sweep``: many ``dpt-fast train`` runs in one process, resumable and shardable.

One :class:`~dpt_fast.engine.session.Session` serves every run: the CLIP is built once per
backbone, each dataset's index is read once. Each run is :func:`run_in_session`, the code path
of ``dpt-fast train``, so its folder and numbers are those of the single run.

Rerunning a sweep skips finished runs, resumes interrupted ones (from their last checkpoint)
and refuses, naming the run, a folder that holds a run with other settings. Each run is claimed
through its folder's lock, so several processes (``--shard I/N``, or the same command started
twice) never run one run twice; a run another process holds is left to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass, field

from dpt_fast.engine.config import progress_settings
from dpt_fast.engine.progress import Progress, elapsed_and_eta, format_duration
from dpt_fast.engine.run import eval_in_session, run_in_session
from dpt_fast.engine.run_folder import LAST_CHECKPOINT, FolderLock
from dpt_fast.engine.session import Session
from dpt_fast.errors import RunFolderBusy, TrainingDiverged
from dpt_fast.files import write_json
from dpt_fast.sweeps.plan import (
    ERROR_FILE,
    PlannedRun,
    evaluations_left,
    finished_results,
    run_differences,
    run_started,
    run_state,
)

log = logging.getLogger("dpt_fast")


@dataclass
class SweepOutcome:
    """What one process of a sweep did with its runs."""

    done: list[str] = field(default_factory=list)  # finished now
    skipped: list[str] = field(default_factory=list)  # finished before
    busy: list[str] = field(default_factory=list)  # held by another process
    failed: dict[str, str] = field(default_factory=dict)  # run name -> its error
    accuracy: dict[str, float] = field(default_factory=dict)  # run name -> test accuracy


def conflicts(runs: list[PlannedRun], template_explicit: bool) -> list[str]:
    """The runs whose folders hold a run with other settings (name: differences)."""
    found = []
    for run in runs:
        differences = run_differences(run, template_explicit)
        if differences:
            found.append(f"{run.name} ({'; '.join(differences)})")
    return found


def run_sweep(runs: list[PlannedRun], *, template_explicit: bool, fail_fast: bool = False,
              device: str = "auto", indexes: dict | None = None) -> SweepOutcome:
    """Do ``runs`` (this process's share of a sweep) one after the other in one session.

    A failed run is recorded (its folder's ``error.json``, the outcome) and the sweep goes on,
    unless ``fail_fast``. Ctrl-C stops at once; the interrupted run resumes next time.
    Zero-shot CLIP is a method of its own (``--methods zeroshot``): its runs are runs.
    ``indexes``: dataset indexes already read, by (dataset, root), for the session.
    """
    outcome = SweepOutcome()
    if not runs:
        return outcome
    settings = progress_settings(runs[0].config)
    started = time.perf_counter()
    with Session(device, indexes=indexes) as session:
        progress = Progress(len(runs), "sweep", settings, enabled=session.info.is_main,
                            unit="runs", describe=lambda: _describe(outcome))
        with progress:
            for number, run in enumerate(runs, 1):
                run_start = time.perf_counter()
                status = _do_run(session, run, template_explicit, outcome)
                if status == "failed" and fail_fast:
                    break
                if session.info.is_main:
                    log.info("%s", _run_line(number, len(runs), run, status, outcome,
                                             time.perf_counter() - run_start, started))
                progress.update()
    return outcome


def _describe(outcome: SweepOutcome) -> dict[str, str]:
    return {"done": str(len(outcome.done) + len(outcome.skipped)),
            "failed": str(len(outcome.failed))}


def _run_line(number: int, total: int, run: PlannedRun, status: str, outcome: SweepOutcome,
              seconds: float, started: float) -> str:
    """``[3/12] dpt dtd shots 4 seed 1: 61.20% in 42s | 2m10s elapsed, ETA 6m30s``; the ETA
    from the runs done in this process so far."""
    what = f"[{number}/{total}] {run.method} {run.dataset} shots {run.shots} seed {run.seed}"
    if status == "done":
        what += f": {outcome.accuracy[run.name]:.2f}% in {format_duration(seconds)}"
    elif status == "failed":
        what += f": FAILED ({outcome.failed[run.name]})"
    else:
        what += f": {status}"
    # The pace of the runs trained here (runs found done cost nearly nothing).
    timing = elapsed_and_eta(time.perf_counter() - started, len(outcome.done), total - number)
    return f"{what} | {timing}"


def _do_run(session: Session, run: PlannedRun, template_explicit: bool,
            outcome: SweepOutcome) -> str:
    """Claim, check and do one run; returns "done", "skipped", "busy" or "failed"."""
    lock = FolderLock(run.folder)
    info = session.info
    decision = "run"
    if info.is_main:
        try:
            lock.acquire()
        except RunFolderBusy:
            decision = "busy"
    decision = session.broadcast(decision)
    if decision == "busy":
        outcome.busy.append(run.name)
        return "busy"
    try:
        # Read under the lock: another process may have finished the run meanwhile.
        state, _ = run_state(run, template_explicit)
        if state == "conflict":  # written by another sweep since this one was checked
            raise ValueError(f"{run.folder} holds a run with other settings")
        if state == "done":
            outcome.skipped.append(run.name)
            return "skipped"
        results = _train_and_evaluate(session, run, template_explicit)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded; the sweep goes on
        if info.enabled:
            # Under torchrun one process may fail where the others do not (its disk, its
            # memory): they would wait for it in a collective. Stop; a rerun resumes.
            raise
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        if isinstance(err, TrainingDiverged):
            message += (f" (in a sweep: remove {run.folder} or change the settings, then run "
                        "the sweep again)")
        outcome.failed[run.name] = message
        log.error("run %s failed: %s", run.name, message)
        if info.is_main:
            write_json(run.folder / ERROR_FILE, {
                "run": run.name, "error": message,
                "traceback": traceback.format_exc().splitlines()[-20:],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return "failed"
    finally:
        lock.release()
    (run.folder / ERROR_FILE).unlink(missing_ok=True)
    outcome.done.append(run.name)
    outcome.accuracy[run.name] = results["test"]["accuracy"]
    return "done"


def _train_and_evaluate(session: Session, run: PlannedRun, template_explicit: bool) -> dict:
    """The run's training (resumed when its folder holds one) and its target evaluations."""
    config = run.config
    started = run_started(run.folder)
    results = finished_results(run.folder) if started else None
    if results is None:
        config = dataclasses.replace(config, resume=started)
        results = run_in_session(session, config, template_explicit, lock_held=True)
    for target in evaluations_left(run):
        target_config = dataclasses.replace(config, dataset=target, subsample="all")
        explicit = frozenset({"template"}) if template_explicit else frozenset()
        eval_in_session(session, target_config, checkpoint=str(run.folder / LAST_CHECKPOINT),
                        explicit=explicit, output_name=run.eval_file(target).name)
    return results


__all__ = ["SweepOutcome", "conflicts", "run_sweep"]
