"""What ``dpt-fast sweep --emit-slurm`` writes and refuses, without a cluster (the script on a
real SLURM: ``test_slurm.py``): a script that runs from any folder (its working directory
pinned, its log folder made), the Python that wrote it, no GPU request for a CPU job, and one
error line for bad SLURM options before anything is written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import make_split_dataset

import dpt_fast
from dpt_fast.cli import main
from dpt_fast.sweeps.slurm import check_slurm_time
from dpt_fast.sweeps.submitit_launcher import slurm_minutes

# sbatch --time formats (test_slurm.py checks these against sbatch itself).
GOOD_TIMES = ("90", "0", "30:00", "12:00:00", "2-00", "2-12:30", "1-00:00:00", "INFINITE")
BAD_TIMES = ("1h", "1:2:3:4", "1-", "-5", "1.5", "2-1-0", "", "12:00:00 ")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    make_split_dataset(folder / "data", "dtd")
    monkeypatch.chdir(folder)
    return folder


def _flags(clip_files, *extra: str) -> list[str]:
    config, weights = clip_files
    return ["sweep", "--root", "data", "--backbone", config, "--pretrained", weights,
            "--datasets", "dtd", "--shots", "1", "--seeds", "1", "2", "--num-workers", "0",
            "--output-dir", "out", *extra]


def test_script_runs_from_any_folder_with_its_python(clip_files, workdir, capsys):
    assert main([*_flags(clip_files, "--device", "cpu"), "--emit-slurm", "jobs/job.sh",
                 "--slurm-shards", "5"]) == 0
    script = (workdir / "jobs" / "job.sh").read_text()
    assert "#SBATCH --array=0-1" in script  # at most one task per run
    assert "--gpus" not in script  # --device cpu: no GPU request
    assert f'#SBATCH --chdir="{workdir}"\n' in script  # relative --root means what it meant here
    assert f'#SBATCH --output="{workdir / "out" / "slurm"}/%A_%a.log"' in script
    assert (workdir / "out" / "slurm").is_dir()  # slurmd opens the log before the script runs
    assert f"PYTHON={sys.executable}\n" in script
    assert f"DPT_FAST_PACKAGE={Path(dpt_fast.__file__).resolve().parent}\n" in script
    assert f'srun "$PYTHON" -m dpt_fast sweep {" ".join(_flags(clip_files)[1:])}' in script
    assert os.access(workdir / "jobs" / "job.sh", os.X_OK)
    assert f"sbatch {workdir / 'jobs' / 'job.sh'}" in capsys.readouterr().out

    # --slurm-gpus 0 with the default device; 2 GPUs run each shard under torchrun
    assert main([*_flags(clip_files), "--emit-slurm", "cpu.sh", "--slurm-gpus", "0"]) == 0
    assert "--gpus" not in (workdir / "cpu.sh").read_text()
    assert main([*_flags(clip_files), "--emit-slurm", "gpu.sh", "--slurm-gpus", "2"]) == 0
    gpu = (workdir / "gpu.sh").read_text()
    assert "#SBATCH --gpus-per-task=2" in gpu
    assert '"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m dpt_fast' in gpu
    assert "#SBATCH --gpus-per-task=1" in _emitted(clip_files, workdir)  # the default


def _emitted(clip_files, workdir: Path) -> str:
    assert main([*_flags(clip_files), "--emit-slurm", "default.sh"]) == 0
    return (workdir / "default.sh").read_text()


@pytest.mark.parametrize("what", ["python", "package"])
def test_script_stops_with_one_line_without_its_dpt_fast(clip_files, workdir, what):
    assert main([*_flags(clip_files, "--device", "cpu"), "--emit-slurm", "job.sh"]) == 0
    script = (workdir / "job.sh").read_text()
    if what == "python":
        script = re.sub(r"^PYTHON=.*$", "PYTHON=/nonexistent/bin/python", script, flags=re.M)
        expected = "dpt-fast job: /nonexistent/bin/python (the Python that wrote this script) "\
                   "is missing"
    else:
        script = re.sub(r"^DPT_FAST_PACKAGE=.*$", "DPT_FAST_PACKAGE=/elsewhere/dpt_fast", script,
                        flags=re.M)
        expected = f"dpt-fast job: {sys.executable} imports dpt_fast from "
    (workdir / "job.sh").write_text(script)
    # Run as a task would (its #SBATCH lines are comments to bash); it stops before srun.
    result = subprocess.run(["bash", "job.sh"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"}, check=False)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


@pytest.mark.parametrize("value", GOOD_TIMES)
def test_slurm_time_formats_accepted(value):
    assert check_slurm_time(value) is None


@pytest.mark.parametrize("value", BAD_TIMES)
def test_slurm_time_formats_refused(value):
    assert "is not a SLURM time" in check_slurm_time(value)


@pytest.mark.parametrize(("extra", "message"), [
    (("--slurm-gpus", "-1"), "--slurm-gpus must be >= 0, got -1"),
    (("--slurm-shards", "0"), "--slurm-shards and --slurm-cpus must be >= 1"),
    (("--slurm-time", "1h"), "--slurm-time '1h' is not a SLURM time"),
    (("--device", "cpu", "--slurm-gpus", "1"), "--slurm-gpus 1 with --device cpu"),
    (("--device", "cuda", "--slurm-gpus", "0"), "--slurm-gpus 0 with --device cuda"),
    (("--emit-slurm", "a_file/job.sh"), "--emit-slurm: cannot make "),
    (("--output-dir", "100%"), "a '%' in the jobs' log path"),
])
def test_bad_slurm_input_is_one_line_before_anything_is_written(clip_files, workdir, capsys,
                                                                 extra, message):
    (workdir / "a_file").write_text("not a folder")
    emit = () if "--emit-slurm" in extra else ("--emit-slurm", "job.sh")
    assert main([*_flags(clip_files, *extra), *emit]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpt-fast: error: ") and message in err[0], err
    assert "a_file" not in message or str(workdir / "a_file") in err[0]  # names the folder
    assert not (workdir / "job.sh").exists() and not (workdir / "out").exists()
    assert not (workdir / "100%").exists()


@pytest.mark.parametrize(("value", "minutes"), [
    ("90", 90), ("30:00", 30), ("30:01", 31), ("12:00:00", 720), ("2-00", 2880),
    ("2-12:30", 3630), ("1-00:00:01", 1441), ("INFINITE", 0)])
def test_submitit_time_in_minutes(value, minutes):
    assert slurm_minutes(value) == minutes


def test_submitit_launcher_refuses_what_it_cannot_submit(clip_files, workdir, capsys):
    assert main([*_flags(clip_files), "--launcher", "submitit", "--dry-run"]) == 2
    assert "--launcher submitit submits the whole array" in capsys.readouterr().err
