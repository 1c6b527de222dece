"""``dpt-fast sweep --launcher submitit``: the same SLURM array as ``--emit-slurm``'s script,
submitted from Python through the ``submitit`` package (the ``submitit`` extra): one array task
per shard, each running ``dpt-fast sweep … --shard I/N`` in the folder it was submitted from,
with the Python that submitted it. Resubmitting (the same command) skips finished runs and
resumes interrupted ones, as for the script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dpt_fast.sweeps.slurm import LOG_FOLDER, SlurmJob

SUBMITIT_FOLDER = "submitit"  # under <output-dir>/slurm: submitit's pickles and the tasks' logs
_MINUTES = {"d": 24 * 60, "h": 60}


def slurm_minutes(time: str) -> int:
    """A checked ``--slurm-time`` (:func:`dpt_fast.sweeps.slurm.check_slurm_time`) in whole
    minutes (seconds round up), as submitit takes it; 0 for no limit."""
    if time.upper() in ("INFINITE", "UNLIMITED"):
        return 0
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (*parts, 0, 0)[:3]
    elif len(parts) == 1:  # minutes
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:  # MM:SS
        hours, minutes, seconds = 0, *parts
    else:  # HH:MM:SS
        hours, minutes, seconds = parts
    total = int(days or 0) * _MINUTES["d"] + hours * _MINUTES["h"] + minutes
    return total + (1 if seconds else 0)


def run_shard(sweep_args: list[str], workdir: str, index: int, count: int) -> int:
    """One array task: ``dpt-fast sweep ARGS --shard INDEX/COUNT`` in ``workdir``, a process
    of this Python (the command's own process, exactly as the script's tasks run it; its
    output goes to the task's log). Raises RuntimeError on a non-zero exit status, so that
    submitit records the task as failed."""
    argv = [sys.executable, "-m", "dpt_fast", "sweep", *sweep_args, "--shard",
            f"{index}/{count}"]
    status = subprocess.run(argv, cwd=workdir, check=False).returncode
    if status != 0:
        raise RuntimeError(f"dpt-fast sweep --shard {index}/{count} exited with {status}")
    return status


def submit_with_submitit(job: SlurmJob, sweep_args: list[str], output_dir: Path) -> list[str]:
    """Submit the array; returns the SLURM job ids of its tasks. Raises ValueError when
    submitit is missing or the job cannot run under it."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher submitit needs the submitit package: pip install "
                         "'dpt_fast[submitit]' (or write a script with --emit-slurm)") from None
    if job.gpus > 1:
        raise ValueError("--launcher submitit runs one process per array task: for "
                         "--slurm-gpus > 1 (torchrun) write a script with --emit-slurm")
    workdir = Path.cwd()
    folder = (workdir / output_dir).absolute() / LOG_FOLDER / SUBMITIT_FOLDER
    executor = submitit.SlurmExecutor(folder=folder, python=sys.executable)
    parameters = {"job_name": "dpt-fast-sweep", "ntasks_per_node": 1,
                  "cpus_per_task": job.cpus, "time": slurm_minutes(job.time),
                  "array_parallelism": job.shards}
    if job.gpus:
        parameters["gpus_per_task"] = job.gpus
    if job.partition:
        parameters["partition"] = job.partition
    executor.update_parameters(**parameters)
    n = job.shards
    jobs = executor.map_array(run_shard, [sweep_args] * n, [str(workdir)] * n, range(n),
                              [n] * n)
    return [j.job_id for j in jobs]
