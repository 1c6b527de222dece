"""``dpt-fast report --format markdown|csv|latex [--plot]``: the paper's tables, from results
files written by hand (no training)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpt_fast.cli import main
from dpt_fast.engine.run_folder import write_zero_shot_result
from dpt_fast.reports.render import latex_escape, report_tables


def _write_run(root: Path, method: str, dataset: str, shots: int, seed: int, acc: float, *,
               new: float | None = None, lr: float = 0.01, backbone: str = "ViT-B-16",
               evals: dict[str, float] | None = None, name: str = "") -> Path:
    """A results.json as `dpt-fast train` writes it, in the sweep's layout."""
    subsample = "all" if new is None else "base"
    folder = root / (name or method) / dataset / f"shots_{shots}" / f"seed_{seed}"
    folder.mkdir(parents=True)
    results = {
        "dataset": dataset,
        # Settings that differ between datasets and shot counts (the template, per-shot
        # epochs) belong to the cell, not to a variant of the method.
        "config": {"dataset": dataset, "shots": shots, "seed": seed, "subsample": subsample,
                   "backbone": backbone, "lr": lr, "epochs": 10 * shots,
                   "output_dir": str(folder),
                   "model": {"method": method, "template": f"a photo of a {dataset} {{}}."}},
        "test": {"accuracy": acc, "macro_f1": acc - 1},
    }
    if new is not None:
        results["test_new"] = {"accuracy": new, "macro_f1": new - 1}
        results["harmonic_mean"] = 2 * acc * new / (acc + new)
    (folder / "results.json").write_text(json.dumps(results))
    for target, accuracy in (evals or {}).items():
        (folder / f"eval_{target}_all.json").write_text(json.dumps({
            "dataset": target, "checkpoint": str(folder / "checkpoint-last.safetensors"),
            "clip": {}, "test": {"accuracy": accuracy, "macro_f1": accuracy - 1}}))
    return folder


@pytest.fixture
def few_shot(tmp_path) -> Path:
    for seed, acc in ((1, 70.0), (2, 72.0), (3, 74.0)):
        _write_run(tmp_path, "dpt", "eurosat", 1, seed, acc)
    _write_run(tmp_path, "dpt", "eurosat", 2, 1, 80.0)
    _write_run(tmp_path, "dpt", "dtd", 1, 1, 60.0)  # no 2-shot run of dtd
    _write_run(tmp_path, "coop", "eurosat", 1, 1, 50.0)
    return tmp_path


def test_few_shot_markdown_cells_and_average(few_shot):
    out = report_tables(few_shot, "markdown")
    dpt = out[out.index("### dpt"):]
    assert "| Dataset | 1-shot | 2-shot |" in dpt
    assert "| eurosat | 72.00 ± 2.00 (3) | 80.00 ± 0.00 (1) |" in dpt
    assert "| dtd | 60.00 ± 0.00 (1) | - |" in dpt
    # Average: the mean of the per-dataset means; the 2-shot one lacks dtd, and says so.
    assert "| Average | 66.00 | 80.00† |" in dpt
    assert "† 2-shot: average over 1 of 2 datasets (no runs of dtd)" in dpt
    # The paper's method order: CoOp's block first.
    coop = out[out.index("### coop"):out.index("### dpt")]
    assert "| eurosat | 50.00 ± 0.00 (1) | - |" in coop
    assert "| Average | 50.00 | - |" in coop
    assert "Notes:" not in out


def test_csv_is_one_line_per_cell(few_shot):
    rows = list(csv.DictReader(io.StringIO(report_tables(few_shot, "csv"))))
    assert list(rows[0]) == ["table", "method", "backbone", "variant", "dataset", "shots",
                             "metric", "mean", "std", "n"]
    cell = {(r["method"], r["dataset"], r["shots"]): r for r in rows}
    assert cell["dpt", "eurosat", "1"] == {
        "table": "few_shot", "method": "dpt", "backbone": "ViT-B-16", "variant": "",
        "dataset": "eurosat", "shots": "1", "metric": "accuracy", "mean": "72.0000",
        "std": "2.0000", "n": "3"}
    assert (cell["dpt", "Average", "1"]["mean"], cell["dpt", "Average", "1"]["std"],
            cell["dpt", "Average", "1"]["n"]) == ("66.0000", "", "2")
    assert ("dpt", "dtd", "2") not in cell  # no run: no line
    assert len(rows) == 7  # dpt: 3 cells + 2 averages; coop: 1 cell + 1 average


def test_latex_is_booktabs_and_escaped(few_shot):
    _write_run(few_shot, "dpt", "oxford_pets", 1, 1, 90.0)
    out = report_tables(few_shot, "latex")
    assert r"\begin{tabular}{lcc}" in out and r"\toprule" in out and r"\bottomrule" in out
    assert r"eurosat & 72.00 $\pm$ 2.00 (3) & 80.00 $\pm$ 0.00 (1) \\" in out
    assert r"oxford\_pets & 90.00 $\pm$ 0.00 (1) & - \\" in out
    assert r"Average & 74.00 & 80.00$^\dagger$ \\" in out
    assert r"\multicolumn{3}{l}{\textbf{dpt}} \\" in out
    assert latex_escape("n_text_ctx 5% & #1") == r"n\_text\_ctx 5\% \& \#1"
    # The headings are comments (a bare % would comment out the rest of a line).
    assert all(line.startswith("%") or "%" not in line.replace(r"\%", "")
               for line in out.splitlines())


def test_base2new_h_and_average_h(tmp_path):
    _write_run(tmp_path, "dpt", "dtd", 16, 1, 70.0, new=60.0)
    _write_run(tmp_path, "dpt", "dtd", 16, 2, 72.0, new=62.0)
    _write_run(tmp_path, "dpt", "eurosat", 16, 1, 80.0, new=40.0)
    out = report_tables(tmp_path, "markdown")
    assert "### dpt, 16 shots" in out and "| Dataset | base | new | H |" in out
    h1, h2 = 2 * 70 * 60 / 130, 2 * 72 * 62 / 134
    h_std = abs(h1 - h2) / 2 ** 0.5
    assert (f"| dtd | 71.00 ± 1.41 (2) | 61.00 ± 1.41 (2) | {(h1 + h2) / 2:.2f} ± {h_std:.2f} "
            "(2) |") in out
    # Average H: the harmonic mean of the average base (75.5) and new (50.5) accuracies.
    assert f"| Average | 75.50 | 50.50 | {2 * 75.5 * 50.5 / 126:.2f} |" in out
    assert "Few-shot" not in out  # base-class runs are not few-shot rows


def test_cross_dataset_columns_and_average_over_targets(tmp_path):
    _write_run(tmp_path, "dpt", "imagenet", 16, 1, 70.0,
               evals={"imagenetv2": 64.0, "imagenet_sketch": 48.0})
    _write_run(tmp_path, "dpt", "imagenet", 16, 2, 72.0, evals={"imagenetv2": 66.0})
    _write_run(tmp_path, "dpt", "caltech101", 16, 1, 90.0, evals={"imagenetv2": 50.0})
    out = report_tables(tmp_path, "markdown")
    cross = out[out.index("## Cross-dataset"):]
    assert "| Source | source | imagenet_sketch | imagenetv2 | Average |" in cross
    assert ("| imagenet, 16 shots | 71.00 ± 1.41 (2) | 48.00 ± 0.00 (1) | 65.00 ± 1.41 (2) "
            "| 56.50 |") in cross
    assert "| caltech101, 16 shots | 90.00 ± 0.00 (1) | - | 50.00 ± 0.00 (1) | 50.00† |" in cross
    assert "† caltech101, 16 shots: average over 1 of 2 targets (no eval of imagenet_sketch)" \
        in cross
    # The sources are few-shot runs too.
    assert "| imagenet | 71.00 ± 1.41 (2) |" in out[:out.index("## Cross-dataset")]
    rows = list(csv.DictReader(io.StringIO(report_tables(tmp_path, "csv"))))
    sketch = [r for r in rows if r["metric"] == "imagenet_sketch"]
    assert [(r["table"], r["dataset"], r["shots"], r["mean"], r["n"]) for r in sketch] == [
        ("cross_dataset", "imagenet", "16", "48.0000", "1")]


def test_other_settings_make_their_own_block(tmp_path):
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 80.0)
    _write_run(tmp_path, "dpt", "eurosat", 1, 2, 90.0)
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 50.0, lr=0.5, name="dpt_lr")
    _write_run(tmp_path, "dpt", "dtd", 1, 1, 60.0)  # only the default lr
    out = report_tables(tmp_path, "markdown")
    # Only lr tells the variants apart (template and epochs differ between cells only), and
    # dtd's run joins the block of its lr.
    assert "### dpt (lr=0.01)" in out and "### dpt (lr=0.5)" in out and "### dpt\n" not in out
    first = out[out.index("### dpt (lr=0.01)"):out.index("### dpt (lr=0.5)")]
    assert "| eurosat | 85.00 ± 7.07 (2) |" in first and "| dtd | 60.00 ± 0.00 (1) |" in first
    second = out[out.index("### dpt (lr=0.5)"):]
    assert "| eurosat | 50.00 ± 0.00 (1) |" in second and "dtd" not in second
    assert "seed(s)" not in out  # seed 1 twice, but in different variants


def test_backbones_are_kept_apart_and_named(tmp_path):
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 80.0)
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 60.0, backbone="RN50", name="rn")
    out = report_tables(tmp_path, "markdown")
    assert "### dpt (RN50)" in out and "### dpt (ViT-B-16)" in out


def test_repeated_seeds_and_runs_in_no_table_are_noted(tmp_path):
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 80.0)
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 80.0, name="copy")
    full = _write_run(tmp_path, "dpt", "eurosat", -1, 1, 95.0)
    out = report_tables(tmp_path, "markdown")
    assert "| eurosat | 80.00 ± 0.00 (2) |" in out
    assert "dpt, eurosat, classes all, 1 shot: seed(s) [1] appear more than once" in out
    assert "1 run(s) fit no table here" in out and str(full) in out


def test_zero_shot_files(tmp_path):
    _write_run(tmp_path, "dpt", "eurosat", 1, 1, 80.0)
    written = write_zero_shot_result(tmp_path / "zeroshot", "eurosat", "ViT-B-16",
                                     {"accuracy": 47.5, "macro_f1": 40.0, "n": 10})
    assert written == tmp_path / "zeroshot" / "zeroshot_eurosat.json"
    assert json.loads(written.read_text()) == {
        "dataset": "eurosat", "backbone": "ViT-B-16",
        "test": {"accuracy": 47.5, "macro_f1": 40.0, "n": 10}}
    other = write_zero_shot_result(tmp_path / "zs" / "zeroshot_dtd.json", "dtd", "ViT-B-16",
                                   {"accuracy": 40.0})
    assert other.is_file()
    with pytest.raises(ValueError, match=r"zeroshot_<dataset>\.json"):
        write_zero_shot_result(tmp_path / "dtd.json", "dtd", "ViT-B-16", {"accuracy": 1.0})
    with pytest.raises(ValueError, match="accuracy"):
        write_zero_shot_result(tmp_path, "dtd", "ViT-B-16", {"accuracy": float("nan")})
    out = report_tables(tmp_path, "markdown")
    zero = out[out.index("## Zero-shot CLIP"):]
    assert "| Dataset | 0-shot |" in zero and "| eurosat | 47.50 ± 0.00 (1) |" in zero
    assert "| Average | 43.75 |" in zero


def test_cli_formats_and_default_summary(few_shot, tmp_path, capsys):
    assert main(["report", str(few_shot)]) == 0
    assert "| eurosat | dpt | 1 | all | ViT-B-16 | - | 3 | 72.00 ± 2.00 |" in \
        capsys.readouterr().out  # the per-experiment summary is still the default
    out_json = tmp_path / "summary.json"
    assert main(["report", str(few_shot), "--format", "markdown", "--out", str(out_json)]) == 0
    assert "| eurosat | 72.00 ± 2.00 (3) | 80.00 ± 0.00 (1) |" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())) == 4  # --out: the summary JSON, as before
    assert main(["report", str(few_shot), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("table,method,backbone,variant,dataset,shots,")
    assert main(["report", str(few_shot), "--format", "latex"]) == 0
    assert r"\begin{tabular}" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--format", "markdown"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpt-fast: error: ")
    assert f"no results of a training run under {empty}" in err
    assert main(["report", str(tmp_path / "missing"), "--format", "csv"]) == 2
    assert "not a folder" in capsys.readouterr().err
    _write_run(tmp_path / "full", "dpt", "eurosat", -1, 1, 95.0)
    assert main(["report", str(tmp_path / "full"), "--format", "markdown"]) == 2
    assert "fits a table of the paper" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(empty), "--format", "html"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_bad_and_older_files_are_reported_not_crashed_on(few_shot, capsys):
    torn = few_shot / "torn"
    torn.mkdir()
    (torn / "results.json").write_text('{"config": {"seed"')
    odd = few_shot / "odd"
    odd.mkdir()
    (odd / "results.json").write_text(json.dumps(
        {"config": {"model": "dpt"}, "test": {"accuracy": 1.0, "macro_f1": 1.0}}))
    lost = few_shot / "lost"
    lost.mkdir()
    (lost / "eval_dtd_all.json").write_text(json.dumps({"dataset": "dtd", "test": {}}))
    (few_shot / "dpt" / "dtd" / "shots_1" / "seed_1" / "eval_dtd_all.json").write_text("[]")
    old = few_shot / "old"  # an older version: no subsample, no method, no top-level dataset
    old.mkdir()
    (old / "results.json").write_text(json.dumps(
        {"config": {"dataset": "dtd", "shots": 1, "seed": 2, "backbone": "ViT-B-16", "lr": 0.01,
                    "epochs": 10, "model": {"template": "a photo of a dtd {}."}},
         "test": {"accuracy": 62.0, "macro_f1": 61.0}}))
    assert main(["report", str(few_shot), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| dtd | 61.00 ± 1.41 (2) | - |" in out  # the old run counts, with the defaults
    assert "1 run(s) of an older version lack key fields, taken as their defaults: " \
           f"{old / 'results.json'}: config.subsample, config.model.method" in out
    assert "Skipped 4 file(s)" in out
    assert f"{torn / 'results.json'}: unreadable" in out
    assert f"{odd / 'results.json'}: 'config.model' is not a mapping" in out
    assert f"{lost / 'eval_dtd_all.json'}: no results.json of a training run beside it" in out
    assert "eval_dtd_all.json: no test accuracy in it" in out
    # The default summary reports them too.
    assert main(["report", str(few_shot)]) == 0
    assert "'config.model' is not a mapping" in capsys.readouterr().out


def test_plot_is_written(few_shot, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_zero_shot_result(few_shot, "eurosat", "ViT-B-16", {"accuracy": 45.0})
    png = tmp_path / "figures" / "curves.png"
    assert main(["report", str(few_shot), "--format", "markdown", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "### coop" in capsys.readouterr().out


def test_plot_without_matplotlib_names_the_install(few_shot, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # also when it was never imported
    png = tmp_path / "curves.png"
    assert main(["report", str(few_shot), "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.startswith("dpt-fast: error: ")
    assert not png.exists()


def test_report_does_not_import_torch(few_shot):
    # `dpt-fast report` runs wherever the results were copied to, which need not have torch
    # (as the command, the package does not import it: see dpt_fast/__init__.py).
    code = ("import sys; sys.argv = ['dpt-fast']; from dpt_fast.cli import main; "
            f"status = main(['report', {str(few_shot)!r}, '--format', 'latex']); "
            "print(status, 'torch' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stdout.splitlines()[-1] == "0 False False", result.stderr


def test_transfer_to_other_classes_is_its_own_column(tmp_path):
    folder = _write_run(tmp_path, "dpt", "imagenet", 16, 1, 70.0, evals={"imagenetv2": 60.0})
    (folder / "eval_imagenetv2_new.json").write_text(json.dumps(
        {"dataset": "imagenetv2", "test": {"accuracy": 50.0}}))
    out = report_tables(tmp_path, "markdown")
    assert "| Source | source | imagenetv2 | imagenetv2 (new) | Average |" in out
    assert "| imagenet, 16 shots | 70.00 ± 0.00 (1) | 60.00 ± 0.00 (1) | 50.00 ± 0.00 (1) " \
           "| 55.00 |" in out
