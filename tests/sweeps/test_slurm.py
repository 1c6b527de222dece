"""The script of ``dpt-fast sweep --emit-slurm`` on a real SLURM: a single-node cluster on
localhost (``slurm_cluster.py``; Debian's ``slurm-wlm`` and ``munge``), the script emitted for
a fresh folder with a relative ``--root`` and ``--device cpu``, submitted with ``sbatch`` from
another folder, its array tasks' runs equal to a local ``dpt-fast sweep``; one task resubmitted
reruns only its run; a task cancelled mid-run is resumed by resubmission.

Marked ``slurm``: not in the default ``pytest`` run (addopts), run by ``.ci/run``'s slurm stage
as ``DPT_FAST_REQUIRE_SLURM=1 pytest -m slurm``, where a cluster that cannot start is a failure;
elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import comparable_results, run_prompts
from data_fixtures import make_split_dataset
from slurm_cluster import LocalSlurm, missing_programs
from test_slurm_script import BAD_TIMES, GOOD_TIMES

import dpt_fast
from dpt_fast.cli import main
from dpt_fast.sweeps.plan import run_subpath
from dpt_fast.sweeps.slurm import check_slurm_time

pytestmark = pytest.mark.slurm

# Set by .ci/run: there a SLURM that is missing or does not start fails the stage.
REQUIRE_SLURM = os.environ.get("DPT_FAST_REQUIRE_SLURM", "0") == "1"
JOB_TIMEOUT_S = 600.0  # one submission, queued to finished (each task starts python + torch)
# Long enough for scancel to land inside the run: the run takes ~45 s on the 2-core CI machine
# under load (~1 s an epoch), its first checkpoint comes after one epoch.
KILL_EPOCHS = 40
POLL_S = 0.2


@pytest.fixture(autouse=True)
def _threads_of_a_fresh_process():
    """The local sweep each test compares with runs in this process, and results must equal
    the array tasks' bit for bit: so it runs with the thread count of a fresh process started
    with this environment, as the tasks are (an xdist worker runs with its share of the cores,
    which rounds differently)."""
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True, timeout=120)
    before = torch.get_num_threads()
    torch.set_num_threads(int(fresh.stdout))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    missing = missing_programs()
    if missing:
        reason = f"SLURM is not installed (missing {', '.join(missing)}): apt-get install " \
                 "slurm-wlm munge"
        if REQUIRE_SLURM:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        started = LocalSlurm.start(cpus=2)
    except (RuntimeError, OSError) as err:
        if REQUIRE_SLURM:
            raise
        pytest.skip(f"a local SLURM did not start: {str(err)[:2000]}")
    try:
        yield started
    finally:
        started.stop()


# Not among sbatch's documented formats, but sbatch 22.05 takes them; dpt-fast refuses them.
SBATCH_LENIENT = frozenset({"1-", "-5"})


def test_time_formats_agree_with_sbatch(cluster, tmp_path):
    """What dpt-fast accepts as --slurm-time, sbatch accepts; what sbatch refuses, so does
    dpt-fast (tests/sweeps/test_slurm_script.py: the lists)."""
    for value in (*GOOD_TIMES, *BAD_TIMES):
        test_only = cluster.run("sbatch", "--test-only", f"--time={value}", "--wrap", "true",
                                cwd=tmp_path, check=False)
        sbatch_takes = test_only.returncode == 0
        ours = check_slurm_time(value) is None
        assert sbatch_takes == ours or (value in SBATCH_LENIENT and sbatch_takes), \
            (value, test_only.stderr)


def test_this_cluster_refuses_a_gpu_request(cluster, tmp_path):
    """Why --slurm-gpus 0 writes no GPU line: a cluster without GPUs refuses any request."""
    asked = cluster.run("sbatch", "--test-only", "--gpus-per-task=1", "--wrap", "true",
                        cwd=tmp_path, check=False)
    assert asked.returncode != 0 and "gres" in asked.stderr.lower(), asked.stderr


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh folder holding a dataset under the relative root ``data``; the test runs in it,
    as a user emitting the script would. A space in its path: #SBATCH lines quote it."""
    folder = tmp_path / "work dir"
    make_split_dataset(folder / "data", "dtd")
    monkeypatch.chdir(folder)
    return folder


def _flags(clip_files, output_dir: str, epochs: int, seeds: tuple[int, ...]) -> list[str]:
    config, weights = clip_files
    return ["sweep", "--root", "data", "--backbone", config, "--pretrained", weights,
            "--datasets", "dtd", "--shots", "1", "--seeds", *map(str, seeds),
            "--epochs", str(epochs), "--batch-size", "2", "--num-workers", "0",
            "--warmup-epochs", "0", "--text-warmup-epochs", "0", "--lr", "0.05",
            "--text-lr", "0.05", "--device", "cpu", "--n-text-ctx", "4", "--cavpt-top-k", "2",
            "--progress", "none", "--output-dir", output_dir]


def _emit(flags: list[str], shards: int) -> Path:
    job = Path("jobs/job.sh")
    assert main([*flags, "--emit-slurm", str(job), "--slurm-shards", str(shards),
                 "--slurm-gpus", "0", "--slurm-cpus", "1", "--slurm-time", "0:30:00"]) == 0
    return job.absolute()


def _results(folder: Path, seed: int) -> dict:
    return json.loads((folder / run_subpath("dpt", "few-shot", "dtd", 1, seed)
                       / "results.json").read_text())


def _job_logs(output_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((output_dir / "slurm").glob("*.log")))


def _finished(cluster: LocalSlurm, job: int, output_dir: Path) -> dict[str, str]:
    states = cluster.wait(job, JOB_TIMEOUT_S)
    assert set(states.values()) == {"COMPLETED"}, (states, _job_logs(output_dir),
                                                    cluster.logs())
    return states


def test_array_script_runs_as_submitted_and_one_task_reruns(cluster, clip_files, workdir,
                                                           tmp_path):
    flags = _flags(clip_files, "swept", epochs=2, seeds=(1, 2))
    job_script = _emit(flags, shards=2)
    script = job_script.read_text()
    assert "--gpus-per-task" not in script and "--root data" in script
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    swept = workdir / "swept"

    job = cluster.sbatch(job_script, cwd=elsewhere)
    assert set(_finished(cluster, job, swept)) == {"0", "1"}
    assert main([*flags[:-1], "local"]) == 0  # the same grid on this machine
    for seed in (1, 2):
        assert comparable_results(_results(swept, seed)) == comparable_results(
            _results(workdir / "local", seed)), seed
    assert not list(elsewhere.iterdir())  # nothing was written where sbatch was called
    log = (swept / "slurm" / f"{job}_1.log").read_text()
    assert f"dpt-fast job: {sys.executable} -m dpt_fast ({Path(dpt_fast.__file__).parent}" in log

    # Task 1 holds the second run (every 2nd run from the 1st): delete it, resubmit task 1.
    first = swept / run_subpath("dpt", "few-shot", "dtd", 1, 1) / "results.json"
    before = first.stat().st_mtime_ns
    shutil.rmtree(swept / run_subpath("dpt", "few-shot", "dtd", 1, 2))
    again = cluster.sbatch(job_script, "--array=1", cwd=elsewhere)
    assert set(_finished(cluster, again, swept)) == {"1"}
    assert comparable_results(_results(swept, 2)) == comparable_results(
        _results(workdir / "local", 2))
    assert first.stat().st_mtime_ns == before  # the other run was not touched
    assert "sweep: 1 run(s) done now, 0 done before" in \
        (swept / "slurm" / f"{again}_1.log").read_text()


def test_cancelled_task_is_resumed_by_resubmission(cluster, clip_files, workdir, tmp_path):
    flags = _flags(clip_files, "killed", epochs=KILL_EPOCHS, seeds=(1,))
    job_script = _emit(flags, shards=1)
    killed = workdir / "killed"
    run = killed / run_subpath("dpt", "few-shot", "dtd", 1, 1)
    job = cluster.sbatch(job_script, cwd=tmp_path)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run / "checkpoint-last.safetensors").exists():  # its first epoch is done
        states = cluster.states(job)
        assert not states or "COMPLETED" not in states.values(), \
            ("the job ended before it could be cancelled", states, _job_logs(killed))
        assert time.monotonic() < deadline, (states, _job_logs(killed), cluster.logs())
        time.sleep(POLL_S)
    cluster.run("scancel", str(job))
    states = cluster.wait(job, JOB_TIMEOUT_S)
    assert set(states.values()) == {"CANCELLED"}, states
    assert not (run / "results.json").exists(), "scancel landed after the run had finished"
    assert (run / ".dpt-fast.lock").exists()  # the cancelled process held the run

    again = cluster.sbatch(job_script, cwd=tmp_path)
    _finished(cluster, again, killed)
    log = (killed / "slurm" / f"{again}_0.log").read_text()
    assert "sweep: 1 run(s) done now" in log
    resumed_at = re.search(r"resumed from \S+ at epoch (\d+)", log)
    assert resumed_at and int(resumed_at.group(1)) >= 1, log[-3000:]  # not started afresh
    assert main([*flags[:-1], "local"]) == 0
    resumed, whole = _results(killed, 1), _results(workdir / "local", 1)
    assert resumed["test"]["accuracy"] == whole["test"]["accuracy"]
    assert [r["epoch"] for r in resumed["history"]] == list(range(1, KILL_EPOCHS + 1))
    local_run = workdir / "local" / run_subpath("dpt", "few-shot", "dtd", 1, 1)
    pa, pb = run_prompts(local_run), run_prompts(run)
    for key in pa:  # a resumed run repeats the uninterrupted one
        torch.testing.assert_close(pb[key], pa[key], rtol=1e-5, atol=1e-6)
    assert not (run / ".dpt-fast.lock").exists()


def test_submitit_launcher_submits_the_same_array(cluster, clip_files, workdir, monkeypatch,
                                                  capsys):
    try:
        import submitit  # noqa: F401 - the submitit extra
    except ImportError:
        if REQUIRE_SLURM:
            raise
        pytest.skip("submitit is not installed: pip install 'dpt_fast[submitit]'")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # submitit calls sbatch from here
    flags = _flags(clip_files, "submitted", epochs=2, seeds=(1, 2))
    assert main([*flags, "--launcher", "submitit", "--slurm-shards", "2", "--slurm-cpus", "1",
                 "--slurm-time", "30"]) == 0
    job = int(re.search(r"submitted (\d+) through submitit", capsys.readouterr().out).group(1))
    states = cluster.wait(job, JOB_TIMEOUT_S)
    logs = "\n".join(p.read_text(errors="replace")[-2000:]
                     for p in (workdir / "submitted" / "slurm" / "submitit").glob("*.out"))
    assert set(states) == {"0", "1"} and set(states.values()) == {"COMPLETED"}, (states, logs)
    assert main([*flags[:-1], "local"]) == 0
    for seed in (1, 2):
        assert comparable_results(_results(workdir / "submitted", seed)) == comparable_results(
            _results(workdir / "local", seed)), seed
