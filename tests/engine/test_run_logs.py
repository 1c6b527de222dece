"""What a run leaves where it lives: a log file a person can read, TensorBoard summaries."""

from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
from cli_helpers import DPT_FAST, train_args

from dpt_fast.engine.progress import Progress, ProgressSettings, format_duration

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) loss [\d.]+ acc [\d.]+ [\d.]+ img/s lr text \S+ "
                        r"visual \S+ \| \S+ elapsed, ETA \S+")


def test_a_train_log_file_has_lines_not_bars(clip_files, colour_folder, tmp_path):
    """stdout and stderr to a file, as a SLURM job or nohup has them: no carriage return, one
    INFO line per epoch, progress lines every --log-every steps, the evaluation's line."""
    log_file = tmp_path / "train.log"
    args = train_args(clip_files, colour_folder, tmp_path / "run", "--log-every", "1",
                      epochs=3)
    with open(log_file, "w") as out:
        result = subprocess.run([DPT_FAST, *args], stdout=out, stderr=subprocess.STDOUT,
                                timeout=600, check=False)
    text = log_file.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    epochs = [m.groups() for m in EPOCH_LINE.finditer(text)]
    assert epochs == [("1", "3"), ("2", "3"), ("3", "3")], text[-3000:]
    # 18 training images at batch 6: 3 steps an epoch; a line after steps 1 and 2 (step 3 has
    # the epoch's own line).
    assert len(re.findall(r"epoch 1/3 [12]/3 steps", text)) == 2, text[-3000:]
    assert re.search(r"test: accuracy [\d.]+% on 12 images", text), text[-3000:]
    assert len(text.splitlines()) < 40  # a readable file, not a stream of redraws


def test_progress_none_is_quiet(clip_files, colour_folder, tmp_path):
    args = train_args(clip_files, colour_folder, tmp_path / "run", "--progress", "none",
                      epochs=1)
    result = subprocess.run([DPT_FAST, *args], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps (" not in result.stderr and "\r" not in result.stderr
    assert "epoch 1/1 loss" in result.stderr  # the epoch's summary is a log line, not progress


def test_progress_lines_every_n_steps_and_auto_timing(caplog):
    settings = ProgressSettings(mode="lines", log_every=2)
    with caplog.at_level(logging.INFO, logger="dpt_fast"):
        with Progress(5, "eval", settings, unit="batches",
                      describe=lambda: {"acc": "50.0"}) as progress:
            for _ in range(5):
                progress.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" |")[0] for line in lines] == [
        "eval 2/5 batches (40%) acc 50.0", "eval 4/5 batches (80%) acc 50.0"]
    assert all("ETA" in line for line in lines)
    assert ProgressSettings(mode="auto").resolved_mode() == "lines"  # pytest's stderr is no tty
    assert ProgressSettings(mode="bar").resolved_mode() == "bar"
    with pytest.raises(ValueError, match="progress must be one of"):
        ProgressSettings(mode="loud")
    assert [format_duration(s) for s in (4.4, 65, 7500)] == ["4s", "1m05s", "2h05m"]


def test_tensorboard_summaries_are_written(clip_files, colour_folder, tmp_path):
    pytest.importorskip("tensorboard")  # the [tensorboard] extra, part of [test]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpt_fast.cli import main

    run = tmp_path / "run"
    assert main(train_args(clip_files, colour_folder, run, "--tensorboard", "--eval-every",
                           "1", "--progress", "none", epochs=2)) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "epoch/loss", "epoch/accuracy",
            "epoch/images_per_s", "lr/text", "lr/visual", "test/accuracy",
            "test/macro_f1"} <= scalars, scalars
    # 18 training images at batch 6: 3 steps an epoch
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("epoch/loss")] == [3, 6]
    # --eval-every 1 evaluates after epoch 1; the final evaluation is at the last step
    assert [e.step for e in events.Scalars("test/accuracy")] == [3, 6]
    results = json.loads((run / "results.json").read_text())
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(
        results["test"]["accuracy"])
    history = {r["epoch"]: r for r in results["history"]}
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx(
        [history[1]["loss"], history[2]["loss"]])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"epochs": 2' in config_text


def test_missing_tensorboard_is_a_clear_error(clip_files, colour_folder, tmp_path,
                                              monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from dpt_fast.cli import main

    run = tmp_path / "run"
    assert main(train_args(clip_files, colour_folder, run, "--tensorboard", epochs=1)) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[tensorboard]"' in err
    assert not (run / "checkpoint-last.safetensors").exists()  # refused before any training
