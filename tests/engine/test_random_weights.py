"""Random CLIP weights (``--pretrained none``) reproduce: they come from a fixed seed, not from
whatever the process drew before (this torch seeds its default generator differently in every
process), so two processes train the same run, evaluation uses the CLIP training used, and a
sweep's run equals the same ``dpt-fast train`` run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import DPT_FAST, comparable_results, run_prompts
from conftest import COLOURS
from data_fixtures import make_split_dataset

from dpt_fast.backbone import build_clip, resolve_clip
from dpt_fast.cli import main
from dpt_fast.seeding import random_weights
from dpt_fast.sweeps.plan import run_subpath
from dpt_fast.toy_clip.model import load_toy_backbone


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _draw_something() -> None:
    """Advance torch's global generator, as whatever ran before in a process would."""
    torch.rand(1000)


def test_random_clip_weights_do_not_depend_on_the_global_generator(clip_files):
    spec = resolve_clip(clip_files[0], "none")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = build_clip(spec).state_dict()
    # the global generator is left as it was found
    assert torch.equal(torch.get_rng_state(), state)
    _draw_something()
    second = build_clip(spec).state_dict()
    _assert_same_state(first, second)
    toy = load_toy_backbone("none").state_dict()
    _draw_something()
    _assert_same_state(toy, load_toy_backbone("none").state_dict())


def test_random_weights_restores_the_generator():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with random_weights():
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with random_weights():
        assert torch.equal(torch.rand(3), inside)


def _train_flags(clip_files, root: Path, out: Path) -> list[str]:
    return ["train", "--dataset", "folder", "--root", str(root), "--shots", "-1",
            "--backbone", clip_files[0], "--pretrained", "none", "--epochs", "1",
            "--batch-size", "6", "--num-workers", "0", "--warmup-epochs", "0",
            "--text-warmup-epochs", "0", "--device", "cpu", "--n-text-ctx", "2",
            "--cavpt-top-k", "2", "--progress", "none", "--output-dir", str(out)]


def _dpt_fast(*args: str) -> None:
    # this process's thread count: the sums of a run round alike with the same threads
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([DPT_FAST, *args], capture_output=True, text=True, timeout=600,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.e2e
def test_two_processes_train_and_evaluate_the_same_random_weights_run(
        clip_files, colour_folder, tmp_path):
    # One run in a fresh process, the same run and the evaluation in this one.
    runs = [tmp_path / "other_process", tmp_path / "this_process"]
    _dpt_fast(*_train_flags(clip_files, colour_folder, runs[0]))
    _draw_something()
    assert main(_train_flags(clip_files, colour_folder, runs[1])) == 0
    results = [json.loads((out / "results.json").read_text()) for out in runs]
    assert comparable_results(results[0]) == comparable_results(results[1])
    _assert_same_state(run_prompts(runs[0]), run_prompts(runs[1]))
    assert set(results[0]["test"]["per_class_accuracy"]) == set(COLOURS)

    # Evaluated uncached in another process than training's: training's CLIP and accuracy.
    evaluated = tmp_path / "eval"
    _draw_something()
    assert main(["eval", "--checkpoint", str(runs[0] / "checkpoint-last.safetensors"),
                 "--dataset", "folder", "--root", str(colour_folder), "--backbone",
                 clip_files[0], "--pretrained", "none", "--device", "cpu", "--num-workers",
                 "0", "--no-cache", "--output-dir", str(evaluated)]) == 0
    scores = json.loads((evaluated / "eval_folder_all.json").read_text())["test"]
    assert scores == results[0]["test"]


def test_a_sweep_run_equals_the_train_run_with_random_weights(clip_files, tmp_path):
    root = tmp_path / "data"
    make_split_dataset(root, "dtd")
    flags = ["--root", str(root), "--backbone", clip_files[0], "--pretrained", "none",
             "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--warmup-epochs",
             "0", "--text-warmup-epochs", "0", "--device", "cpu", "--n-text-ctx", "2",
             "--cavpt-top-k", "2", "--progress", "none"]
    out = tmp_path / "sweep"
    assert main(["sweep", *flags, "--datasets", "dtd", "--shots", "1", "--seeds", "1", "2",
                 "--output-dir", str(out)]) == 0
    _draw_something()
    # the sweep's second run: its CLIP was built before the sweep's first run
    single = tmp_path / "single"
    assert main(["train", *flags, "--dataset", "dtd", "--shots", "1", "--seed", "2",
                 "--output-dir", str(single)]) == 0
    swept = out / run_subpath("dpt", "few-shot", "dtd", 1, 2)
    assert comparable_results(json.loads((swept / "results.json").read_text())) == \
        comparable_results(json.loads((single / "results.json").read_text()))
    _assert_same_state(run_prompts(swept), run_prompts(single))
