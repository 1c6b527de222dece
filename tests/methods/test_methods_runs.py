"""Zero-shot CLIP and the linear probe as runs: `dpt-fast train --method`, a sweep with every
kind of method, and the report's rows for them (tiny random CLIP, CoOp-layout datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_split_dataset

from dpt_fast.cli import main
from dpt_fast.sweeps.plan import run_subpath

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """dtd in CoOp's layout: 3 classes, train 5/3/1, val 2/1/3, test 1/2/2 images."""
    root = tmp_path_factory.mktemp("methods_data")
    make_split_dataset(root, "dtd")
    return root


def _flags(clip_files, root: Path, tmp_path: Path) -> list[str]:
    config, weights = clip_files
    return ["--root", str(root), "--backbone", config, "--pretrained", weights,
            "--num-workers", "0", "--device", "cpu", "--progress", "none",
            "--cache-dir", str(tmp_path / "cache")]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_sweep_with_every_kind_of_method_and_its_report(clip_files, data_root, tmp_path,
                                                         capsys):
    out = tmp_path / "sweep"
    sgd = ["--epochs", "1", "--batch-size", "2", "--text-lr", "0.05", "--n-text-ctx", "4"]
    assert main(["sweep", *_flags(clip_files, data_root, tmp_path), *sgd, "--datasets", "dtd",
                 "--shots", "1", "--seeds", "1", "2", "--methods", "zeroshot", "linear_probe",
                 "coop", "--output-dir", str(out)]) == 0
    zero = _results(out / run_subpath("zeroshot", "few-shot", "dtd", 0, 1))
    assert zero["config"]["shots"] == 0 and zero["data"]["train_images"] == 0
    assert not (out / "zeroshot" / "dtd" / "shots_0" / "seed_2").exists()
    probe = _results(out / run_subpath("linear_probe", "few-shot", "dtd", 1, 2))
    assert probe["data"]["train_images"] == 3 and probe["linear_probe"]["val_images"] == 3
    assert len(probe["linear_probe"]["steps"]) == 8 and probe["linear_probe"]["C"] > 0
    # each is the single `train` run
    single = tmp_path / "single_zeroshot"
    assert main(["train", *_flags(clip_files, data_root, tmp_path), "--dataset", "dtd",
                 "--method", "zeroshot", "--output-dir", str(single)]) == 0
    assert _results(single)["test"] == zero["test"]
    single = tmp_path / "single_probe"
    assert main(["train", *_flags(clip_files, data_root, tmp_path), "--dataset", "dtd",
                 "--method", "linear_probe", "--shots", "1", "--seed", "2",
                 "--output-dir", str(single)]) == 0
    assert _results(single)["linear_probe"] == probe["linear_probe"]
    assert _results(single)["test"] == probe["test"]
    capsys.readouterr()
    plot = tmp_path / "curves.png"
    assert main(["report", str(out), "--format", "markdown", "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "### linear_probe" in table and "### coop" in table
    assert table.index("### linear_probe") < table.index("### coop")  # the registry's order
    zero_part = table[table.index("## Zero-shot CLIP"):]
    assert f"| dtd | {zero['test']['accuracy']:.2f} ± 0.00 (1) |" in zero_part
    assert plot.stat().st_size > 0


def test_zero_shot_base_to_new(clip_files, data_root, tmp_path):
    out = tmp_path / "b2n"
    assert main(["train", *_flags(clip_files, data_root, tmp_path), "--dataset", "dtd",
                 "--method", "zeroshot", "--subsample", "base", "--output-dir", str(out)]) == 0
    results = _results(out)
    assert len(results["classes"]) == 2 and "test_new" in results
    base, new = results["test"]["accuracy"], results["test_new"]["accuracy"]
    expected = 2 * base * new / (base + new) if base + new else 0.0
    assert np.isclose(results["harmonic_mean"], expected)


def test_linear_probe_with_too_few_validation_images_is_one_line(clip_files, data_root,
                                                                  tmp_path, capsys):
    # 2 shots take 2 validation images per class (lpclip's rule); the second class has 1
    assert main(["train", *_flags(clip_files, data_root, tmp_path), "--dataset", "dtd",
                 "--method", "linear_probe", "--shots", "2",
                 "--output-dir", str(tmp_path / "few")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "linear_probe on dtd: class" in err and "has 1 validation image(s), fewer than " \
        "the 2 that lpclip's rule takes for 2 shots" in err


def test_linear_probe_refuses_base_to_new(clip_files, data_root, tmp_path, capsys):
    assert main(["train", *_flags(clip_files, data_root, tmp_path), "--dataset", "dtd",
                 "--method", "linear_probe", "--shots", "1", "--subsample", "base",
                 "--output-dir", str(tmp_path / "b2n")]) == 2
    assert "no classifier for new classes" in capsys.readouterr().err
