"""The CLI end to end on a generated image folder and a tiny CLIP saved to disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS

from dpt_fast import checkpoint as ckpt
from dpt_fast.cli import build_parser, main
from dpt_fast.engine import trainer as trainer_module


def _train_args(clip_files, root, out, epochs=4, extra=()):
    config, weights = clip_files
    return ["train", "--dataset", "folder", "--root", str(root), "--shots", "-1",
            "--backbone", config, "--pretrained", weights, "--epochs", str(epochs),
            "--batch-size", "6", "--num-workers", "0", "--warmup-epochs", "0",
            "--text-warmup-epochs", "0", "--lr", "0.05", "--text-lr", "0.05",
            "--device", "cpu", "--output-dir", str(out), "--n-text-ctx", "4",
            "--cavpt-top-k", "2", *extra]


def _prompts(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.read_checkpoint(path)
    return ckpt.model_state(tensors)


def test_help_documents_fields_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--n-text-ctx" in text and "learnable text context tokens" in text
    assert "(default: 0.002)" in text and "--cavpt-start-layer" in text


def test_train_resume_and_eval(clip_files, colour_folder, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(_train_args(clip_files, colour_folder, full)) == 0
    log = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"]  # it learns the colours
    results = json.loads((full / "results.json").read_text())
    assert results["test"]["n"] == 12 and 0 <= results["test"]["accuracy"] <= 100
    assert set(results["test"]["per_class_accuracy"]) == set(COLOURS)

    # Interrupt a second run after two epochs, resume it: same prompts as uninterrupted.
    part = tmp_path / "part"
    original = trainer_module.Trainer.train_epoch

    def stop_at_third(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", stop_at_third)
    capsys.readouterr()
    assert main(_train_args(clip_files, colour_folder, part)) == 130  # Ctrl-C
    assert "dpt-fast: interrupted; continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", original)
    _, meta = ckpt.read_checkpoint(part / "checkpoint-last.safetensors")
    assert meta["epoch"] == 1
    assert main(_train_args(clip_files, colour_folder, part, extra=["--resume"])) == 0
    a, b = _prompts(full / "checkpoint-last.safetensors"), _prompts(
        part / "checkpoint-last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)

    # eval of the saved checkpoint reproduces the accuracy saved at the end of training
    capsys.readouterr()
    config, weights = clip_files
    assert main(["eval", "--checkpoint", str(full / "checkpoint-last.safetensors"),
                 "--dataset", "folder", "--root", str(colour_folder), "--backbone", config,
                 "--pretrained", weights, "--device", "cpu", "--num-workers", "0",
                 "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_folder_all.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert f"{results['test']['accuracy']:.2f}%" in capsys.readouterr().out


def test_resume_refuses_other_settings_and_keeps_the_history(clip_files, colour_folder,
                                                            tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(clip_files, colour_folder, out, epochs=2,
                            extra=["--eval-every", "1"])) == 0
    results = json.loads((out / "results.json").read_text())
    # --eval-every 1: epoch 1 evaluated on the test split; the last epoch by the final report
    assert "test_accuracy" in results["history"][0] and "test_accuracy" not in \
        results["history"][1]
    assert [r["epoch"] for r in results["history"]] == [1, 2]
    assert results["history"][0]["lr"] == [0.05, 0.05]  # the epoch's own lr, before stepping

    capsys.readouterr()
    assert main(_train_args(clip_files, colour_folder, out, epochs=3,
                            extra=["--resume", "--lr", "0.5"])) == 2
    assert re.search(r"epochs: 2 -> 3.*lr: 0.05 -> 0.5", capsys.readouterr().err)
    # Resuming a finished run with the same settings keeps the whole history.
    assert main(_train_args(clip_files, colour_folder, out, epochs=2,
                            extra=["--resume", "--eval-every", "1"])) == 0
    history = json.loads((out / "results.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    # A crash that tore the log's last line (and lost epoch 2's record) before a resume: the
    # log is repaired, epoch 2's record restored from the checkpoint.
    log_path = out / "train_log.jsonl"
    first = log_path.read_text().splitlines()[0]
    log_path.write_text(first + "\n" + '{"epoch": 2, "loss": 1.')
    assert main(_train_args(clip_files, colour_folder, out, epochs=2,
                            extra=["--resume", "--eval-every", "1"])) == 0
    history = json.loads((out / "results.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2] and "loss" in history[1]
    assert oct((out / "results.json").stat().st_mode & 0o777) != oct(0o600)
    # A fresh run in the same folder is refused; with --overwrite it starts a new log.
    assert main(_train_args(clip_files, colour_folder, out, epochs=1)) == 2
    assert main(_train_args(clip_files, colour_folder, out, epochs=1,
                            extra=["--overwrite"])) == 0
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1]


def test_eval_of_a_checkpoint_honours_template_and_refuses_model_flags(
        clip_files, colour_folder, tmp_path, monkeypatch, capsys):
    from dpt_fast.engine import run as run_module

    out = tmp_path / "run"
    assert main(_train_args(clip_files, colour_folder, out, epochs=1)) == 0
    built = []
    original = run_module.create_method  # the one factory the runs build models with

    def spy(name, clip, classnames, config):
        built.append(config)
        return original(name, clip, classnames, config)

    monkeypatch.setattr(run_module, "create_method", spy)
    base = ["eval", "--checkpoint", str(out / "checkpoint-last.safetensors"), "--dataset",
            "folder", "--root", str(colour_folder), "--device", "cpu", "--num-workers", "0",
            "--output-dir", str(tmp_path / "eval")]
    # backbone and weights default to the checkpoint's; the explicit template is used
    assert main([*base, "--template", "a blurry photo of a {}."]) == 0
    assert built[-1].template == "a blurry photo of a {}."
    assert built[-1].cavpt_top_k == 2
    capsys.readouterr()
    assert main([*base, "--cavpt-top-k", "3"]) == 2
    assert "drop the model settings ['cavpt_top_k']" in capsys.readouterr().err
    assert main([*base, "--cavpt-top-k", "2", "--n-text-ctx", "4"]) == 0  # the same values


def test_train_on_a_test_only_dataset_is_refused(clip_files, colour_folder, tmp_path,
                                                 monkeypatch, capsys):
    from dpt_fast.engine.session import Session

    original = Session.splits

    def test_only(*args, **kwargs):
        splits = original(*args, **kwargs)
        splits.train = []
        return splits

    monkeypatch.setattr(Session, "splits", test_only)
    assert main(_train_args(clip_files, colour_folder, tmp_path / "run", epochs=1)) == 2
    assert "no training images" in capsys.readouterr().err


def test_yaml_config_and_flag_precedence(clip_files, colour_folder, tmp_path):
    from dpt_fast.cli import resolve_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 3\nmethod: vlp\nmodel:\n  n_visual_ctx: 4\nseed: 7\n")
    args = build_parser().parse_args(["train", "--config", str(yaml_file), "--seed", "9"])
    config, explicit = resolve_config(args)
    assert (config.epochs, config.seed) == (3, 9)
    assert (config.model.method, config.model.n_visual_ctx) == ("vlp", 4)
    assert explicit == {"epochs", "method", "n_visual_ctx", "seed"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve_config(build_parser().parse_args(["train", "--config", str(bad)]))


@pytest.mark.parametrize(("text", "match"), [
    ("model: dpt\n", "'model' .* must be a mapping"),
    ("epochs: many\n", "epochs must be int, got 'many'"),
    ("subsample: some\n", "subsample must be one of"),
    ("resume: yes please\n", "resume must be bool"),
])
def test_yaml_values_of_the_wrong_type_name_the_field(tmp_path, text, match):
    from dpt_fast.cli import resolve_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_config(build_parser().parse_args(["train", "--config", str(bad)]))


def test_yaml_numbers_in_exponent_notation_are_floats(tmp_path):
    from dpt_fast.cli import resolve_config

    good = tmp_path / "run.yaml"
    good.write_text("lr: 1e-3\nwarmup_lr: 1e-5\nepochs: 2\nmodel:\n  alpha: 1\n")
    config, _ = resolve_config(build_parser().parse_args(["train", "--config", str(good)]))
    assert (config.lr, config.warmup_lr, config.epochs) == (1e-3, 1e-5, 2)
    assert isinstance(config.model.alpha, float)


def test_missing_dataset_names_the_layout(clip_files, tmp_path, capsys):
    assert main(_train_args(clip_files, tmp_path / "nowhere", tmp_path / "out")) == 2
    assert "expected <root>/train/<class>/<image>" in capsys.readouterr().err


def _write_result(folder: Path, seed: int, acc: float, lr: float = 0.01) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "dataset": "eurosat", "config": {"seed": seed, "shots": 16, "subsample": "all",
                                         "backbone": "ViT-B-16", "lr": lr,
                                         "output_dir": str(folder), "model": {"method": "dpt"}},
        "test": {"accuracy": acc, "macro_f1": acc - 1}}))


def test_report_aggregates_seeds(tmp_path, capsys):
    for seed, acc in ((1, 80.0), (2, 90.0)):
        _write_result(tmp_path / f"seed{seed}", seed, acc)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| eurosat | dpt | 16 | all | ViT-B-16 | - | 2 | 85.00 ± 7.07 |" in out


def test_report_keeps_other_settings_apart_and_flags_repeated_seeds(tmp_path, capsys):
    _write_result(tmp_path / "a" / "s1", 1, 80.0)
    _write_result(tmp_path / "a" / "s2", 2, 90.0)
    _write_result(tmp_path / "b" / "s1", 1, 50.0, lr=0.5)
    _write_result(tmp_path / "copy" / "s1", 1, 50.0, lr=0.5)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| ViT-B-16 | lr=0.01 | 2 | 85.00 ± 7.07 |" in out
    assert "| ViT-B-16 | lr=0.5 | 2 | 50.00 ± 0.00 |" in out
    assert "seed(s) [1] appear more than once" in out


@pytest.mark.slow
@pytest.mark.e2e
def test_two_process_ddp_equals_one_process(clip_files, odd_folder, tmp_path):
    # 15 training images under a global batch of 16: one global batch of 15 per epoch, which the
    # two processes split 8 + 7 (their cross-entropies are weighted to the global mean).
    single, double = tmp_path / "single", tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--batch-size", "16"]
    args = _train_args(clip_files, odd_folder, single, epochs=2, extra=extra)
    subprocess.run([sys.executable, "-m", "dpt_fast", *args], check=True, env=env,
                   capture_output=True, timeout=600)
    args = _train_args(clip_files, odd_folder, double, epochs=2, extra=extra)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dpt_fast", *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a = _prompts(single / "checkpoint-last.safetensors")
    b = _prompts(double / "checkpoint-last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    ra = json.loads((single / "results.json").read_text())["test"]["accuracy"]
    rb = json.loads((double / "results.json").read_text())["test"]["accuracy"]
    assert ra == pytest.approx(rb)


def test_base_to_new_and_cross_dataset(clip_files, tmp_path, capsys):
    from data_fixtures import make_split_dataset

    root = tmp_path / "data"
    make_split_dataset(root, "eurosat")
    make_split_dataset(root, "dtd")
    out = tmp_path / "b2n"
    args = _train_args(clip_files, root, out, epochs=1)
    args[args.index("folder")] = "eurosat"
    args[args.index("-1")] = "2"  # 2 shots
    assert main([*args, "--subsample", "base"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["AnnualCrop", "Forest"]  # base: first ceil(3/2)
    assert set(results["test_new"]["per_class_accuracy"]) == {"SeaLake"}
    a, b = results["test"]["accuracy"], results["test_new"]["accuracy"]
    assert results["harmonic_mean"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
    assert "H:" in capsys.readouterr().out

    # cross-dataset: the eurosat prompts on DTD's (other) classes
    config, weights = clip_files
    assert main(["eval", "--checkpoint", str(out / "checkpoint-last.safetensors"),
                 "--dataset", "dtd", "--root", str(root), "--backbone", config,
                 "--pretrained", weights, "--device", "cpu", "--num-workers", "0",
                 "--output-dir", str(out)]) == 0
    evaluated = json.loads((out / "eval_dtd_all.json").read_text())
    assert set(evaluated["test"]["per_class_accuracy"]) <= {"banded", "blotchy", "braided"}


def test_eval_of_the_authors_checkpoint(clip_files, colour_folder, tmp_path, capsys):
    from official_fixtures import _write_official

    from dpt_fast import DPT, DPTConfig
    from dpt_fast.backbone import load_clip

    config, weights = clip_files
    clip = load_clip(config, weights, torch.device("cpu"))
    model = DPT(clip, ["blue", "green", "red"], DPTConfig(n_text_ctx=4, cavpt_top_k=2))
    _write_official(model, tmp_path / "official")
    assert main(["eval", "--official-dir", str(tmp_path / "official"), "--dataset", "folder",
                 "--root", str(colour_folder), "--backbone", config, "--pretrained", weights,
                 "--device", "cpu", "--num-workers", "0", "--n-text-ctx", "4",
                 "--cavpt-top-k", "2", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval_folder_all.json").read_text())["test"]
    assert report["n"] == 12
    capsys.readouterr()
    assert main(["eval", "--official-dir", str(tmp_path / "official"), "--dataset", "folder",
                 "--root", str(colour_folder), "--backbone", config, "--pretrained", weights,
                 "--device", "cpu", "--num-workers", "0", "--method", "vlp",
                 "--output-dir", str(tmp_path / "eval")]) == 2
    assert re.search(r"ctx: checkpoint tensor has shape \(4, 32\)", capsys.readouterr().err)


@pytest.mark.parametrize("dies_in", ["evaluation", "log_append"])
def test_resume_keeps_the_periodic_test_accuracy_wherever_the_run_dies(
        clip_files, colour_folder, tmp_path, monkeypatch, dies_in):
    """A run killed during epoch 1's --eval-every evaluation, or after its checkpoint but
    before its log line, resumes to the very history an uninterrupted run records."""
    from dpt_fast.engine import run as run_module

    args = ["--eval-every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_train_args(clip_files, colour_folder, full, epochs=2, extra=args)) == 0
    expected = json.loads((full / "results.json").read_text())["history"]
    assert expected[0]["test_accuracy"] is not None

    calls = {"n": 0}
    if dies_in == "evaluation":
        original = run_module._eval_split

        def dying(*a, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(run_module, "_eval_split", dying)
    else:
        original = trainer_module.append_record

        def dying(path, record):
            calls["n"] += 1
            raise KeyboardInterrupt

        monkeypatch.setattr(trainer_module, "append_record", dying)
    assert main(_train_args(clip_files, colour_folder, part, epochs=2, extra=args)) == 130
    monkeypatch.undo()
    assert main(_train_args(clip_files, colour_folder, part, epochs=2,
                            extra=[*args, "--resume"])) == 0
    history = json.loads((part / "results.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["test_accuracy"] == expected[0]["test_accuracy"]
    assert history[0]["loss"] == pytest.approx(expected[0]["loss"], rel=1e-6)
    del original
