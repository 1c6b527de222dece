"""``dpt-fast sweep --emit-slurm``: the SLURM array script of a sweep, one array task per shard.

The script runs as submitted, from any folder: the job's working directory is pinned to the
folder the script was written from (``#SBATCH --chdir``), so relative ``--root``,
``--output-dir`` and ``--config`` mean what they meant then; the log folder is made when the
script is written (slurmd opens a task's output file before the script runs, so a ``mkdir`` in
the script comes too late); the job runs the Python and the ``dpt_fast`` package that wrote it
and stops with one line when they are gone; and a CPU job (``--slurm-gpus 0``, ``--device
cpu``) asks for no GPU, which a cluster without GPUs would refuse.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from dpt_fast.files import atomic_write_bytes

DEFAULT_SHARDS = 8
DEFAULT_CPUS = 8
DEFAULT_TIME = "24:00:00"
LOG_FOLDER = "slurm"  # under the sweep's output folder: <output-dir>/slurm/<job>_<task>.log
# sbatch's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or no limit).
_TIME_FORMATS = (r"\d+", r"\d+:\d+", r"\d+:\d+:\d+", r"\d+-\d+", r"\d+-\d+:\d+",
                 r"\d+-\d+:\d+:\d+")
_NO_LIMIT = ("INFINITE", "UNLIMITED")
# The `sweep` options the script's command leaves out (with a value / without one).
SLURM_OPTIONS = frozenset({"--emit-slurm", "--slurm-shards", "--slurm-gpus", "--slurm-cpus",
                           "--slurm-time", "--slurm-partition", "--shard"})
PLAN_ONLY_FLAGS = frozenset({"--dry-run", "--estimate"})
# The job's own error lines and exit status for a missing Python or dpt_fast (bad input).
_JOB_PREFIX = "dpt-fast job"
_JOB_EXIT = 2
_PACKAGE = Path(__file__).resolve().parents[1]  # the dpt_fast folder this module is in


@dataclass(frozen=True)
class SlurmJob:
    """What one array task asks SLURM for."""

    shards: int  # array tasks (at most the number of runs)
    gpus: int  # GPUs per task; 0 writes no GPU request, > 1 runs the shard under torchrun
    cpus: int  # CPU cores per task
    time: str  # time limit per task, in one of sbatch's formats
    partition: str | None  # partition; None: the cluster's default


def check_slurm_time(value: str) -> str | None:
    """The problem with ``value`` as sbatch's ``--time``, or None when SLURM accepts it."""
    if value.upper() in _NO_LIMIT or any(re.fullmatch(f, value) for f in _TIME_FORMATS):
        return None
    return (f"--slurm-time {value!r} is not a SLURM time: use minutes, MM:SS, HH:MM:SS, D-HH, "
            "D-HH:MM or D-HH:MM:SS (e.g. 90, 12:00:00, 2-00)")


def resolve_gpus(requested: int | None, device: str, device_explicit: bool
                 ) -> tuple[int, list[str]]:
    """GPUs per task (``requested``, else 0 for ``--device cpu`` and 1 otherwise) and the
    problems of that choice with the device."""
    gpus = requested if requested is not None else (0 if device == "cpu" else 1)
    problems = []
    if gpus < 0:
        problems.append(f"--slurm-gpus must be >= 0, got {gpus}")
    elif gpus > 0 and device == "cpu":
        problems.append(f"--slurm-gpus {gpus} with --device cpu: the runs would not use the "
                        "GPUs; use --slurm-gpus 0")
    elif gpus == 0 and device_explicit and device.startswith("cuda"):
        problems.append(f"--slurm-gpus 0 with --device {device}: the job would get no GPU; "
                        "ask for one with --slurm-gpus 1 or use --device cpu")
    return gpus, problems


def sbatch_path(path: str) -> str:
    """``path`` in double quotes, as sbatch reads a value with spaces in an ``#SBATCH`` line.
    Raises ValueError for what such a line cannot hold (a double quote, a line break)."""
    if '"' in path or "\n" in path:
        raise ValueError(f"{path!r} cannot be written into an #SBATCH line (a double quote or "
                         "a line break in it); emit the script from a folder without them")
    return f'"{path}"'


def slurm_script(job: SlurmJob, sweep_args: list[str], n_runs: int, output_dir: Path,
                 script: Path, workdir: Path, python: str, package: Path) -> str:
    """The text of the array script. ``sweep_args``: the ``sweep`` options of the command,
    less the SLURM ones; ``workdir``, ``output_dir`` and ``script`` absolute; ``python`` and
    ``package``: the interpreter and the ``dpt_fast`` folder the job must run."""
    if job.gpus > 1:
        runner = f"-m torch.distributed.run --standalone --nproc_per_node={job.gpus} -m dpt_fast"
    else:
        runner = "-m dpt_fast"
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# {n_runs} runs of `dpt-fast sweep` in {job.shards} array tasks. Submit from any "
        "folder:",
        f"#   sbatch {q(str(script))}",
        "# Rerunning it (or one task: sbatch --array=I ...) skips finished runs and resumes "
        "interrupted ones.",
        f"# The job runs in {workdir} (where this script was written), so relative paths in the",
        "# command mean what they meant then; each task's log is "
        f"{output_dir / LOG_FOLDER}/<job>_<task>.log.",
        "#SBATCH --job-name=dpt-fast-sweep",
        f"#SBATCH --array=0-{job.shards - 1}",
        "#SBATCH --ntasks=1",
    ]
    if job.gpus > 0:
        lines.append(f"#SBATCH --gpus-per-task={job.gpus}")
    lines += [f"#SBATCH --cpus-per-task={job.cpus}",
              f"#SBATCH --time={job.time}",
              f"#SBATCH --chdir={sbatch_path(str(workdir))}",
              f"#SBATCH --output={sbatch_path(f'{output_dir / LOG_FOLDER}/%A_%a.log')}"]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    # The check runs the job's Python as the job will (same folder, same sys.path), without
    # importing torch: it names the dpt_fast that Python would import.
    find = ('import importlib.util as u, os; s = u.find_spec("dpt_fast"); '
            'print(os.path.realpath(os.path.dirname(s.origin)) if s and s.origin else "")')
    lines += [
        "set -euo pipefail",
        "# The dpt-fast this job runs: the Python that wrote this script and its dpt_fast.",
        f"PYTHON={q(python)}",
        f"DPT_FAST_PACKAGE={q(str(package))}",
        'if [[ ! -x "$PYTHON" ]]; then',
        f'    echo "{_JOB_PREFIX}: $PYTHON (the Python that wrote this script) is missing; emit '
        'the script again from the environment the job should use" >&2',
        f"    exit {_JOB_EXIT}",
        "fi",
        f'found=$("$PYTHON" -c {q(find)})',
        'if [[ "$found" != "$DPT_FAST_PACKAGE" ]]; then',
        f'    echo "{_JOB_PREFIX}: $PYTHON imports dpt_fast from \'${{found:-nowhere}}\', not '
        "$DPT_FAST_PACKAGE as when this script was written; submit it from that environment "
        '(PYTHONPATH included) or emit the script again" >&2',
        f"    exit {_JOB_EXIT}",
        "fi",
        f'echo "{_JOB_PREFIX}: $PYTHON -m dpt_fast ($DPT_FAST_PACKAGE), array task '
        f'${{SLURM_ARRAY_TASK_ID}} of {job.shards}, in $(pwd)"',
        f'srun "$PYTHON" {runner} sweep {shlex.join(sweep_args)} \\',
        # The count is written here, not read from SLURM: resubmitting one task
        # (sbatch --array=3 job.sh) must keep the same slicing.
        f'    --shard "${{SLURM_ARRAY_TASK_ID}}/{job.shards}"',
        "",
    ]
    return "\n".join(lines)


def write_slurm_script(path: Path, job: SlurmJob, sweep_args: list[str], n_runs: int,
                       output_dir: Path) -> Path:
    """Write the script (atomically, executable) and make its log folder; returns the
    script's absolute path. Raises ValueError naming a folder that cannot be written."""
    workdir = Path.cwd()
    script = (workdir / path).absolute()
    logs = (workdir / output_dir).absolute() / LOG_FOLDER
    if "%" in str(logs):  # sbatch would read it as one of its file name patterns (%A, %a)
        raise ValueError(f"--output-dir {logs.parent}: a '%' in the jobs' log path would be "
                         "read by SLURM as a pattern; choose a folder without '%'")
    text = slurm_script(job, sweep_args, n_runs, logs.parent, script, workdir, sys.executable,
                        _PACKAGE)
    for folder, what in ((script.parent, "--emit-slurm"), (logs, "the jobs' log folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{what}: cannot make {folder} ({err.strerror}); choose a "
                             "folder you can write") from None
    try:
        atomic_write_bytes(script, text.encode())
        script.chmod(0o755)
    except OSError as err:
        raise ValueError(f"--emit-slurm: cannot write {script} ({err.strerror}); choose a "
                         "folder you can write") from None
    return script


def command_without(argv: list[str], with_value: frozenset[str], flags: frozenset[str]
                    ) -> list[str]:
    """``argv`` after the ``sweep`` word, less the named options (and their values)."""
    args = argv[argv.index("sweep") + 1:] if "sweep" in argv else list(argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in with_value:
            skip = "=" not in arg
            continue
        if name in flags:
            continue
        kept.append(arg)
    return kept
