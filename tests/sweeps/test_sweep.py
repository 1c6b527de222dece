"""`dpt-fast sweep`: each run is exactly a `dpt-fast train` run; rerunning resumes; processes
sharing a grid never run one run twice; bad grids are refused before any run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import DPT_FAST, comparable_results, error_line, run_prompts
from data_fixtures import make_split_dataset

from dpt_fast.cli import main
from dpt_fast.sweeps.plan import SweepGrid, parse_shard, run_subpath, shard_runs

DATASETS = ("dtd", "eurosat")
@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """Two CoOp-layout datasets of 3 classes (5/3/1 training images per class)."""
    root = tmp_path_factory.mktemp("sweep_data")
    for name in DATASETS:
        make_split_dataset(root, name)
    return root


def _model_flags(clip_files, root: Path, epochs: int = 1) -> list[str]:
    config, weights = clip_files
    return ["--root", str(root), "--backbone", config, "--pretrained", weights,
            "--epochs", str(epochs), "--batch-size", "2", "--num-workers", "0",
            "--warmup-epochs", "0", "--text-warmup-epochs", "0", "--lr", "0.05",
            "--text-lr", "0.05", "--device", "cpu", "--n-text-ctx", "4", "--cavpt-top-k", "2",
            "--progress", "none"]


@pytest.mark.e2e
def test_each_sweep_run_is_the_single_train_run(clip_files, sweep_root, tmp_path):
    out = tmp_path / "sweep"
    flags = _model_flags(clip_files, sweep_root)
    assert main(["sweep", *flags, "--datasets", *DATASETS, "--shots", "1", "2",
                 "--seeds", "1", "2", "--output-dir", str(out)]) == 0
    runs = [(d, k, s) for d in DATASETS for k in (1, 2) for s in (1, 2)]
    for dataset, shots, seed in runs:
        folder = out / run_subpath("dpt", "few-shot", dataset, shots, seed)
        single = tmp_path / f"single_{dataset}_{shots}_{seed}"
        assert main(["train", *flags, "--dataset", dataset, "--shots", str(shots), "--seed",
                     str(seed), "--output-dir", str(single)]) == 0
        swept = json.loads((folder / "results.json").read_text())
        alone = json.loads((single / "results.json").read_text())
        assert comparable_results(swept) == comparable_results(alone), (dataset, shots, seed)
        a, b = run_prompts(folder), run_prompts(single)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (dataset, shots, seed, key)
    # the seeds and shot counts differ, so the runs do too
    first = run_prompts(out / run_subpath("dpt", "few-shot", "dtd", 1, 1))
    other = run_prompts(out / run_subpath("dpt", "few-shot", "dtd", 1, 2))
    assert not all(torch.equal(first[k], other[k]) for k in first)


def _sweep_process(clip_files, root: Path, out: Path, *extra: str,
                   epochs: int = 1) -> subprocess.Popen:
    args = ["sweep", *_model_flags(clip_files, root, epochs), "--datasets", "dtd",
            "--shots", "1", "2", "--seeds", "1", "2", "--output-dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([DPT_FAST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _done_now(stdout: str) -> int:
    match = re.search(r"sweep: (\d+) run\(s\) done now", stdout)
    assert match, stdout
    return int(match.group(1))


@pytest.mark.e2e
def test_kill_9_then_rerun_gives_the_same_results(clip_files, sweep_root, tmp_path):
    epochs = 8  # long enough for the kill to land inside the second run
    reference = tmp_path / "uninterrupted"
    whole = _sweep_process(clip_files, sweep_root, reference, epochs=epochs)
    killed = tmp_path / "killed"
    victim = _sweep_process(clip_files, sweep_root, killed, epochs=epochs)
    second = killed / run_subpath("dpt", "few-shot", "dtd", 1, 2)
    deadline = time.time() + 300
    while not (second / "checkpoint-last.safetensors").exists():  # its first epoch is done
        assert victim.poll() is None, ("the sweep ended before it could be killed",
                                       victim.communicate())
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait(timeout=600) == 0, whole.communicate()
    again = _sweep_process(clip_files, sweep_root, killed, epochs=epochs)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-3000:]
    assert _done_now(stdout) >= 3  # at least the interrupted run and those after it
    for shots in (1, 2):
        for seed in (1, 2):
            name = run_subpath("dpt", "few-shot", "dtd", shots, seed)
            a = json.loads((reference / name / "results.json").read_text())
            b = json.loads((killed / name / "results.json").read_text())
            assert a["test"]["accuracy"] == b["test"]["accuracy"], name
            assert [r["epoch"] for r in b["history"]] == list(range(1, epochs + 1))
            pa, pb = run_prompts(reference / name), run_prompts(killed / name)
            for key in pa:  # a resumed run repeats the uninterrupted one
                torch.testing.assert_close(pb[key], pa[key], rtol=1e-5, atol=1e-6)
            assert not (killed / name / ".dpt-fast.lock").exists()


@pytest.mark.e2e
def test_two_processes_on_one_grid_run_each_run_once(clip_files, sweep_root, tmp_path):
    out = tmp_path / "shared"
    # Two shards and a third process with the whole grid: every run is claimed once.
    processes = [_sweep_process(clip_files, sweep_root, out, "--shard", "0/2"),
                 _sweep_process(clip_files, sweep_root, out, "--shard", "1/2"),
                 _sweep_process(clip_files, sweep_root, out)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [e[-2000:] for _, e in outputs]
    assert sum(_done_now(stdout) for stdout, _ in outputs) == 4
    for shots in (1, 2):
        for seed in (1, 2):
            folder = out / run_subpath("dpt", "few-shot", "dtd", shots, seed)
            history = json.loads((folder / "results.json").read_text())["history"]
            assert [r["epoch"] for r in history] == [1]  # trained once, not twice


def test_bad_grids_are_refused_before_any_run(clip_files, sweep_root, tmp_path):
    out = tmp_path / "bad"
    flags = ["sweep", *_model_flags(clip_files, sweep_root), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def refused(*extra: str) -> str:
        result = subprocess.run([DPT_FAST, *flags, *extra], capture_output=True, text=True,
                                env=env, timeout=300, check=False)
        return error_line(result, 2)

    line = refused("--datasets", "dtd", "cifar", "oxford_pets", "--methods", "dpt", "clip")
    assert "unknown dataset(s) cifar" in line and "unknown method(s) clip" in line
    line = refused("--datasets", "dtd", "oxford_pets", "--shots", "1", "9")
    assert "oxford_pets: missing" in line and "dtd cannot give 9 shots" in line
    assert "shard" in refused("--datasets", "dtd", "--shard", "3/2")
    assert "shard" in refused("--datasets", "dtd", "--shard", "0/0")
    assert not out.exists()  # nothing was started


def test_a_folder_with_other_settings_is_refused_naming_the_run(clip_files, sweep_root,
                                                                 tmp_path, capsys):
    out = tmp_path / "sweep"
    flags = ["sweep", *_model_flags(clip_files, sweep_root), "--datasets", "dtd", "--shots",
             "1", "--seeds", "1", "--output-dir", str(out)]
    assert main(flags) == 0
    capsys.readouterr()
    assert main([*flags, "--lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "dpt/dtd/shots_1/seed_1 (lr: 0.05 -> 0.02)" in err
    # an older run folder whose config lacks a field: read as that field's default
    config_file = out / "dpt/dtd/shots_1/seed_1/config.json"
    config = json.loads(config_file.read_text())
    del config["log_every"], config["model"]["alpha"]
    config_file.write_text(json.dumps(config))
    assert main(flags) == 0
    assert "1 done before" in capsys.readouterr().out


def test_dry_run_and_slurm_script(clip_files, sweep_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    flags = ["sweep", *_model_flags(clip_files, sweep_root), "--datasets", *DATASETS,
             "--shots", "1", "2", "--seeds", "1", "--output-dir", str(out)]
    assert main([*flags, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 runs: 0 done, 0 partial, 4 to do" in text
    assert re.search(r"dpt/dtd/shots_2/seed_1\s+to do\s+5\s+5", text)  # 2+2+1 images, 1 epoch
    job = tmp_path / "job.sh"
    assert main([*flags, "--emit-slurm", str(job), "--slurm-shards", "3"]) == 0
    script = job.read_text()
    assert "#SBATCH --array=0-2" in script and "--gpus" not in script  # --device cpu
    assert '--shard "${SLURM_ARRAY_TASK_ID}/3"' in script  # the same slicing when resubmitted
    assert "--emit-slurm" not in script and "--slurm-shards" not in script
    assert [p.name for p in out.iterdir()] == ["slurm"]  # the jobs' log folder, no run


def test_grid_defaults_and_shards():
    grid = SweepGrid()
    assert len(grid.train_datasets()) == 11 and grid.shot_counts() == (1, 2, 4, 8, 16)
    cross = SweepGrid(protocol="cross-dataset")
    assert cross.train_datasets() == ("imagenet",) and len(cross.target_datasets()) == 10
    dg = SweepGrid(protocol="dg")
    assert dg.target_datasets() == ("imagenetv2", "imagenet_sketch", "imagenet_a",
                                    "imagenet_r")
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "0/0", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    runs = list(range(10))
    slices = [shard_runs(runs, i, 3) for i in range(3)]
    assert sorted(r for s in slices for r in s) == runs


def test_base2new_and_cross_dataset_protocols(clip_files, sweep_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    flags = ["sweep", *_model_flags(clip_files, sweep_root), "--shots", "2", "--seeds", "1",
             "--output-dir", str(out)]
    assert main([*flags, "--protocol", "base2new", "--datasets", "dtd"]) == 0
    results = json.loads((out / "dpt/base2new/dtd/shots_2/seed_1/results.json").read_text())
    assert results["config"]["subsample"] == "base" and "harmonic_mean" in results
    assert main([*flags, "--protocol", "cross-dataset", "--datasets", *DATASETS,
                 "--source", "dtd"]) == 0
    run = out / "dpt/dtd/shots_2/seed_1"
    evaluated = json.loads((run / "eval_eurosat_all.json").read_text())
    assert evaluated["dataset"] == "eurosat" and evaluated["test"]["n"] == 5
    # the few-shot run of the source is the cross-dataset run: a few-shot sweep reuses it
    capsys.readouterr()
    assert main([*flags, "--datasets", "dtd"]) == 0
    assert "1 done before" in capsys.readouterr().out
    assert main(["report", str(out), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(row.startswith("base2new,dpt,") and ",dtd,2,H," in row for row in rows)
    assert any(row.startswith("cross_dataset,dpt,") and ",dtd,2,eurosat," in row
               for row in rows)
