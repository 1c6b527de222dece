"""The ``dpt-fast`` console script as a user meets it when something is wrong: one line
``dpt-fast: error: ...`` naming the file or flag and the fix, exit status 2 for bad input and 1
for a failure while running, no traceback; and runs that are never lost or faked.

Every probe runs the installed console script in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import CHECKPOINT, DPT_FAST, cli, error_line, train_args
from data_fixtures import make_split_dataset
from safetensors import safe_open
from safetensors.torch import save_file

from dpt_fast import checkpoint as ckpt
from dpt_fast.data.fewshot import fewshot_path
from dpt_fast.data.pickling import write_datum_splits
from dpt_fast.data.records import Datum

# --- flags and config files: refused before any work, without importing torch ----------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--text-lr", "inf"], "--text-lr must be a finite number > 0, got inf"),
    (["--template", "a {} photo of {}"], "--template must contain '{}' exactly once"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--resume", "--overwrite"], "give only one of them"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    result = cli("train", "--output-dir", str(tmp_path / "run"), *flags)
    line = error_line(result, 2)
    assert line.startswith("dpt-fast: error: ") and message in line, line
    assert not (tmp_path / "run").exists()


def test_bad_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("epochs: 3\nlr: [0.1\nseed: 2\n")
    line = error_line(cli("train", "--config", str(bad)), 2)
    assert f"{bad}: invalid YAML at line" in line and "<unicode string>" not in line


def test_help_and_argument_errors_do_not_import_torch():
    # `dpt-fast --help` and flag errors answer without the seconds torch + open_clip take.
    # As the `dpt-fast` command imports the package (a plain `import dpt_fast` registers the
    # ops, which needs torch).
    code = ("import sys; sys.argv = ['dpt-fast']; import dpt_fast.cli as c; "
            "p = c.build_parser(); "
            "c.resolve_config(p.parse_args(['train'])); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- data that does not fit -------------------------------------------------------------------

@pytest.fixture
def dtd_root(tmp_path) -> Path:
    """A 3-class dataset in CoOp's DTD layout."""
    make_split_dataset(tmp_path / "data", "dtd")
    return tmp_path / "data"


def _split_file(root: Path) -> Path:
    return root / "dtd" / "split_zhou_DescribableTextures.json"


def test_malformed_split_json_names_the_file(clip_files, dtd_root, tmp_path):
    split = _split_file(dtd_root)
    split.write_text(split.read_text()[:-20])
    line = error_line(cli(*train_args(clip_files, dtd_root, tmp_path / "run", dataset="dtd")), 2)
    assert str(split) in line and "not a valid JSON split file" in line


def test_non_integer_label_names_the_file(clip_files, dtd_root, tmp_path):
    split = _split_file(dtd_root)
    data = json.loads(split.read_text())
    data["train"][0][1] = "one"
    split.write_text(json.dumps(data))
    line = error_line(cli(*train_args(clip_files, dtd_root, tmp_path / "run", dataset="dtd")), 2)
    assert str(split) in line and "train[0] has the label 'one'" in line


@pytest.mark.parametrize(("content", "state"), [(b"", "empty"), (None, "corrupt")])
def test_broken_fewshot_cache_names_the_file_and_the_fix(clip_files, dtd_root, tmp_path,
                                                         content, state):
    args = train_args(clip_files, dtd_root, tmp_path / "run", dataset="dtd")
    args[args.index("--shots") + 1] = "1"
    path = fewshot_path(dtd_root / "dtd", 1, 1)
    path.parent.mkdir()
    valid = {"train": [Datum(str(dtd_root / "dtd" / "images" / "x.jpg"), 0, "banded")],
             "val": []}
    path.write_bytes(content if content is not None else pickle.dumps(valid)[:25])
    line = error_line(cli(*args), 2)
    assert str(path) in line and state in line and "delete" in line


def test_fewshot_cache_of_another_dataset_is_refused(clip_files, dtd_root, tmp_path):
    args = train_args(clip_files, dtd_root, tmp_path / "run", dataset="dtd")
    args[args.index("--shots") + 1] = "1"
    path = fewshot_path(dtd_root / "dtd", 1, 1)
    image = str(dtd_root / "dtd" / "images" / "banded" / "banded_train0000.jpg")
    write_datum_splits(path, {"train": [Datum(image, 9, "banded")], "val": []})
    line = error_line(cli(*args), 2)
    assert str(path) in line and "label 9, outside 0..2" in line


def test_class_names_that_tokenise_alike_are_refused(clip_files, tmp_path):
    root = tmp_path / "folder"
    for name in ("Red_Plain  square", "red plain square"):
        (root / "train" / name).mkdir(parents=True)
        shutil.copy(_any_png(tmp_path), root / "train" / name / "0.png")
    line = error_line(cli(*train_args(clip_files, root, tmp_path / "run")), 2)
    assert "'Red_Plain  square'" in line and "same prompt tokens" in line


def _any_png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(path)
    return path


def test_base_subsample_without_new_classes_is_refused_before_training(clip_files, tmp_path):
    root = tmp_path / "data"
    make_split_dataset(root, "dtd")
    split = _split_file(root)
    data = json.loads(split.read_text())
    split.write_text(json.dumps({k: [e for e in v if e[1] == 0] for k, v in data.items()}))
    out = tmp_path / "run"
    line = error_line(cli(*train_args(clip_files, root, out, "--subsample", "base",
                                      dataset="dtd")), 2)
    assert "leaves no new classes" in line and not (out / CHECKPOINT).exists()


def test_eval_into_an_unwritable_folder_is_refused_first(clip_files, colour_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config, weights = clip_files
    result = cli("eval", "--official-dir", str(tmp_path), "--dataset", "folder", "--root",
                 str(colour_folder), "--backbone", config, "--pretrained", weights,
                 "--device", "cpu", "--output-dir", str(blocker / "out"))
    assert "cannot write to the output folder" in error_line(result, 2)


def test_garbage_official_checkpoint_is_not_loadable(clip_files, colour_folder, tmp_path):
    for part in ("prompt_learner", "VPT_prompt_learner", "extractor"):
        (tmp_path / "official" / part).mkdir(parents=True)
        (tmp_path / "official" / part / "model-best.pth.tar").write_bytes(b"\x00garbage")
    config, weights = clip_files
    line = error_line(cli("eval", "--official-dir", str(tmp_path / "official"), "--dataset",
                          "folder", "--root", str(colour_folder), "--backbone", config,
                          "--pretrained", weights, "--device", "cpu", "--n-text-ctx", "4",
                          "--cavpt-top-k", "2", "--output-dir", str(tmp_path / "eval")), 2)
    assert "is not loadable as the authors' checkpoint" in line
    assert "weights_only" not in line


# --- runs: never clobbered, never faked ------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(clip_files, colour_folder, tmp_path_factory) -> Path:
    """A finished 1-epoch run (its folder must not be changed by the tests that use it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli(*train_args(clip_files, colour_folder, out)).returncode == 0
    return out


def test_folder_holding_a_run_is_refused_without_resume_or_overwrite(
        clip_files, colour_folder, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = error_line(cli(*train_args(clip_files, colour_folder, out, "--lr", "0.01")), 2)
    assert "holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    # --overwrite removes the old run's files first: no stale results under new settings.
    (out / "results.json").write_text('{"stale": true}')
    assert cli(*train_args(clip_files, colour_folder, out, "--lr", "0.01",
                           "--overwrite")).returncode == 0
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 0.01


def test_resume_without_a_checkpoint_is_refused(clip_files, colour_folder, tmp_path):
    line = error_line(cli(*train_args(clip_files, colour_folder, tmp_path / "run",
                                      "--resume")), 2)
    assert "--resume: no run in" in line


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(
        clip_files, colour_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".dpt-fast.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    line = error_line(cli(*train_args(clip_files, colour_folder, out)), 1)
    assert "being written by another dpt-fast process" in line and str(os.getpid()) in line
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert cli(*train_args(clip_files, colour_folder, out)).returncode == 0
    assert not lock.exists()  # released at the end


def test_orphan_temporary_files_are_removed_at_the_next_start(
        clip_files, colour_folder, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    orphan = out / f".{CHECKPOINT}.x1y2z3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    assert cli(*train_args(clip_files, colour_folder, out, "--resume")).returncode == 0
    assert not orphan.exists()


def test_divergence_stops_the_run_with_an_error(clip_files, colour_folder, tmp_path):
    out = tmp_path / "run"
    result = cli(*train_args(clip_files, colour_folder, out, "--lr", "1e30", "--text-lr",
                             "1e30", epochs=2))
    line = error_line(result, 1)
    assert "training diverged" in line and "at epoch 1, step" in line
    assert not (out / "results.json").exists()
    assert not (out / CHECKPOINT).exists()  # no good epoch finished: nothing saved
    def strict(constant: str):
        pytest.fail(f"bare {constant} in a JSON file of {out}")

    for path in out.glob("*.json*"):  # whatever was written is valid JSON
        texts = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for text in texts:
            json.loads(text, parse_constant=strict)


def test_checkpoint_with_nan_is_refused_by_eval(clip_files, colour_folder, finished_run,
                                                tmp_path):
    path = tmp_path / CHECKPOINT
    with safe_open(str(finished_run / CHECKPOINT), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.text_prompts.ctx"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    line = error_line(cli("eval", "--checkpoint", str(path), "--dataset", "folder", "--root",
                          str(colour_folder), "--device", "cpu", "--num-workers", "0",
                          "--output-dir", str(tmp_path / "eval")), 2)
    assert "text_prompts.ctx holds NaN or infinite values" in line


def test_start_line_says_what_runs_and_open_clip_logs_stay_quiet(finished_run, clip_files,
                                                                colour_folder, tmp_path):
    result = cli(*train_args(clip_files, colour_folder, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    start = [line for line in result.stderr.splitlines() if "3 classes" in line]
    assert start and "train /" in start[0] and "shots all" in start[0] and "cpu" in start[0]
    assert "fp32" in start[0] and "tiny-test-clip" in start[0]
    assert "root INFO" not in result.stderr  # open_clip's loading messages (shown with -v)
    verbose = cli("-v", *train_args(clip_files, colour_folder, tmp_path / "run2"))
    assert "root INFO" in verbose.stderr


def test_report_skips_and_lists_files_that_are_not_run_results(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "runs" / "a")
    (tmp_path / "runs" / "demo").mkdir()
    (tmp_path / "runs" / "demo" / "results.json").write_text(
        json.dumps({"zero_shot_accuracy": 40.0, "methods": []}))
    (tmp_path / "runs" / "torn").mkdir()
    (tmp_path / "runs" / "torn" / "results.json").write_text('{"config": {"seed"')
    result = cli("report", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "| folder | dpt |" in result.stdout
    assert "Skipped 2 file(s)" in result.stdout
    assert "demo/results.json: not the results of a training run" in result.stdout
    assert "torn/results.json: unreadable" in result.stdout


def test_checkpoint_files_are_strict_json(finished_run):
    _, meta = ckpt.read_checkpoint(finished_run / CHECKPOINT)
    assert meta["train_stats"]["epoch"] == 1  # the epoch's whole record is kept
    results = json.loads((finished_run / "results.json").read_text())
    assert results["data"]["classes"] == 3 and results["data"]["train_images"] == 18
    assert torch.isfinite(torch.tensor(results["history"][0]["loss"]))


def test_shots_beyond_the_images_available_are_said_and_recorded(clip_files, colour_folder,
                                                                 tmp_path):
    args = train_args(clip_files, colour_folder, tmp_path / "run")
    args[args.index("--shots") + 1] = "50"
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fewer than 50 training images" in result.stderr
    data = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    assert data["shots"] == 50 and data["effective_shots_max"] < 50


# --- CLIP weights files, devices, the version -------------------------------------------------

def _unloadable_weights(folder: Path, kind: str) -> Path:
    """A file torch cannot load with its safe (weights-only) unpickler."""
    import argparse

    path = folder / f"{kind}.pt"
    if kind == "random-bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "text":
        path.write_text("these are not weights\n")
    else:  # a pickle of an arbitrary object, as torch.save writes it
        torch.save(argparse.Namespace(lr=0.1), path)
    return path


def _assert_names_the_unloadable_file(line: str, result: subprocess.CompletedProcess,
                                      weights: Path) -> None:
    assert f"{weights} is not a loadable CLIP weights file" in line, line
    assert ".safetensors" in line and "OpenAI's CLIP archives" in line  # what is accepted
    # never torch's advice to switch its safe loader off
    assert "weights_only" not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["random-bytes", "text", "pickled-object"])
def test_unloadable_pretrained_file_is_named_by_train(clip_files, colour_folder, tmp_path,
                                                      kind):
    weights = _unloadable_weights(tmp_path, kind)
    result = cli(*train_args((clip_files[0], str(weights)), colour_folder, tmp_path / "run"))
    _assert_names_the_unloadable_file(error_line(result, 2), result, weights)


def test_unloadable_pretrained_file_is_named_by_eval_and_predict(finished_run, colour_folder,
                                                                 tmp_path):
    weights = _unloadable_weights(tmp_path, "pickled-object")
    checkpoint = str(finished_run / CHECKPOINT)
    for args in (["eval", "--checkpoint", checkpoint, "--dataset", "folder", "--root",
                  str(colour_folder), "--output-dir", str(tmp_path / "eval")],
                 ["predict", "--checkpoint", checkpoint, str(colour_folder / "test")]):
        result = cli(*args, "--pretrained", str(weights), "--device", "cpu", "--num-workers",
                     "0")
        _assert_names_the_unloadable_file(error_line(result, 2), result, weights)


def _missing_cuda_device() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("device", ["tpu9", "missing-cuda"])
@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo"])
def test_a_device_this_machine_lacks_is_bad_input_naming_its_devices(tmp_path, command,
                                                                     device):
    device = _missing_cuda_device() if device == "missing-cuda" else device
    out = tmp_path / "out"
    args = {"train": ["train", "--output-dir", str(out)],
            "eval": ["eval", "--checkpoint", str(tmp_path / CHECKPOINT), "--output-dir",
                     str(out)],
            "predict": ["predict", "--checkpoint", str(tmp_path / CHECKPOINT), str(tmp_path)],
            "demo": ["demo", "--output-dir", str(out)]}[command]
    line = error_line(cli(*args, "--device", device), 2)
    assert f"device {device!r}" in line and "devices: cpu" in line, line
    assert "internal error" not in line
    assert not out.exists()  # refused before any work


def test_version_is_printed_without_importing_torch():
    from importlib.metadata import version

    import dpt_fast

    expected = f"dpt-fast {dpt_fast.__version__}"
    assert version("dpt_fast") == dpt_fast.__version__
    for command in ([DPT_FAST, "--version"], [sys.executable, "-m", "dpt_fast", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip() == expected, result
    timed = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpt_fast", "--version"],
                           capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in timed.stderr.splitlines()}
    assert not {"torch", "open_clip"} & imported
