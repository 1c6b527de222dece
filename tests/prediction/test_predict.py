"""Using trained prompts: DPT.from_checkpoint, model.predict and ``dpt-fast predict``; what a
run records about its CLIP; fast and reference models reading each other's checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, error_line
from PIL import Image

from dpt_fast import DPT
from dpt_fast import checkpoint as ckpt
from dpt_fast.backbone import load_clip
from dpt_fast.cli import main
from dpt_fast.data import build_transforms
from dpt_fast.reference import DPT as ReferenceDPT

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def trained(clip_files, colour_folder, tmp_path_factory) -> Path:
    """The output folder of a one-epoch run on the colour task."""
    config, weights = clip_files
    out = tmp_path_factory.mktemp("predict") / "run"
    assert main(["train", "--dataset", "folder", "--root", str(colour_folder), "--shots", "-1",
                 "--backbone", config, "--pretrained", weights, "--epochs", "1",
                 "--batch-size", "6", "--num-workers", "0", "--lr", "0.05", "--device", "cpu",
                 "--output-dir", str(out), "--n-text-ctx", "4", "--cavpt-top-k", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def test_images(colour_folder) -> list[Path]:
    return sorted((colour_folder / "test").rglob("*.png"))


def _batch(paths: list[Path]) -> torch.Tensor:
    transform = build_transforms(train=False, image_size=32)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def test_a_run_records_its_clip_everywhere(trained, clip_files):
    config, weights = clip_files
    expected = {"backbone": config, "pretrained": weights, "activation": "quick_gelu"}
    assert json.loads((trained / "config.json").read_text())["clip"] == expected
    assert json.loads((trained / "results.json").read_text())["clip"] == expected
    _, meta = ckpt.read_checkpoint(trained / "checkpoint-last.safetensors")
    assert meta["clip"] == expected
    assert meta["config"]["backbone"] == config


def test_from_checkpoint_rebuilds_model_classes_and_config(trained, test_images):
    path = trained / "checkpoint-last.safetensors"
    model = DPT.from_checkpoint(path)  # builds the recorded CLIP
    assert isinstance(model, DPT) and not model.training
    assert model.classnames == CLASSES
    assert (model.config.n_text_ctx, model.config.cavpt_top_k) == (4, 2)
    assert model.train_config["epochs"] == 1
    images = _batch(test_images)
    probs = model.predict(images)
    assert probs.shape == (len(test_images), 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(test_images)))
    with torch.no_grad():
        torch.testing.assert_close(probs, model(images).logits.softmax(-1))
    # PIL images go through the evaluation transform
    pil = [Image.open(p) for p in test_images[:2]]
    torch.testing.assert_close(model.predict(pil), probs[:2])
    # The accuracy the run reported is what the rebuilt model gets.
    labels = [CLASSES.index(p.parent.name) for p in test_images]
    accuracy = 100 * sum(int(a == b) for a, b in zip(probs.argmax(-1).tolist(), labels,
                                                      strict=True)) / len(labels)
    results = json.loads((trained / "results.json").read_text())
    assert accuracy == pytest.approx(results["test"]["accuracy"])


def test_from_checkpoint_on_a_given_clip_and_a_training_model(trained, clip_files, test_images):
    config, weights = clip_files
    clip = load_clip(config, weights, torch.device("cpu"))
    model = DPT.from_checkpoint(trained / "checkpoint-last.safetensors", clip, device="cpu")
    assert model.clip is clip
    images = _batch(test_images[:3])
    expected = model.predict(images)
    model.train()
    torch.testing.assert_close(model.predict(images), expected)
    assert model.training  # predict restores the mode it found
    with pytest.raises(TypeError, match="sequence of PIL images"):
        model.predict("cat.png")


def test_fast_checkpoints_load_into_the_reference_model_and_back(trained, test_images):
    path = trained / "checkpoint-last.safetensors"
    fast = DPT.from_checkpoint(path)
    reference = ReferenceDPT.from_checkpoint(path)
    assert type(reference) is ReferenceDPT
    fast_state, reference_state = fast.state_dict(), reference.state_dict()
    assert fast_state.keys() == reference_state.keys()
    for key in fast_state:
        assert torch.equal(fast_state[key], reference_state[key]), key
    images = _batch(test_images)
    torch.testing.assert_close(reference.predict(images), fast.predict(images),
                               rtol=1e-5, atol=1e-6)
    # back: prompts changed in the reference model load into a fast model
    with torch.no_grad():
        reference.text_prompts.ctx.add_(0.5)
    fast.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fast.predict(images), reference.predict(images),
                               rtol=1e-5, atol=1e-6)


def test_predict_command_table_csv_and_jsonl(trained, colour_folder, tmp_path, capsys):
    checkpoint = str(trained / "checkpoint-last.safetensors")
    base = ["predict", "--checkpoint", checkpoint, "--device", "cpu", "--num-workers", "0",
            "--batch-size", "5"]
    folder = colour_folder / "test"
    n = len(list(folder.rglob("*.png")))
    assert main([*base, str(folder), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "top-1", "top-2"] and len(lines) == 1 + n
    assert lines[1].startswith(str(folder / "blue" / "0.png"))  # folders are searched, sorted

    out = tmp_path / "preds.csv"
    assert main([*base, str(folder / "red"), str(folder / "blue" / "1.png"), "--top-k", "9",
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * (n // 3 + 1)  # top-k capped at the 3 classes
    assert [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert {r["class"] for r in rows} == set(CLASSES)
    assert rows[-1]["path"] == str(folder / "blue" / "1.png")

    # jsonl agrees with the Python API
    out = tmp_path / "preds.jsonl"
    assert main([*base, str(folder / "green"), "--top-k", "1", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    paths = sorted((folder / "green").glob("*.png"))
    model = DPT.from_checkpoint(checkpoint)
    probs = model.predict(_batch(paths))
    for record, row in zip(records, probs, strict=True):
        assert record["top"][0]["class"] == CLASSES[int(row.argmax())]
        assert record["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_unreadable_images_are_reported_never_dropped(trained, colour_folder, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((colour_folder / "test" / "red").glob("*.png"))[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    checkpoint = str(trained / "checkpoint-last.safetensors")
    base = ["predict", "--checkpoint", checkpoint, "--device", "cpu", "--num-workers", "0"]

    result = cli(*base, str(folder))
    line = error_line(result, 2)
    assert f"1 of 2 image(s) could not be read (first: {folder / 'broken.png'}" in line
    assert "--skip-unreadable" in line
    assert "good.png" in result.stdout and "unreadable" in result.stdout

    out = tmp_path / "preds.jsonl"
    result = cli(*base, str(folder), "--skip-unreadable", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cannot read {folder / 'broken.png'}" in result.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"broken.png", "good.png"}
    assert records["broken.png"]["top"] == [] and "error" in records["broken.png"]
    assert len(records["good.png"]["top"]) == 3 and "error" not in records["good.png"]


def _one_line_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpt-fast: error: "), err
    return err[0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--output", "preds.txt"], "unknown format '.txt'; use a .csv or .jsonl file"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_predict_refuses_bad_flags_before_any_work(tmp_path, capsys, flags, message):
    line = _one_line_error(capsys, "predict", "--checkpoint", "none.safetensors", str(tmp_path),
                           *flags)
    assert message in line


def test_predict_names_missing_inputs(tmp_path, capsys):
    line = _one_line_error(capsys, "predict", "--checkpoint", "none.safetensors",
                           str(tmp_path / "nowhere.jpg"))
    assert f"no such image or folder: {tmp_path / 'nowhere.jpg'}" in line
    line = _one_line_error(capsys, "predict", "--checkpoint", "none.safetensors", str(tmp_path))
    assert "no image files" in line
    (tmp_path / "a.png").write_bytes(b"x")
    line = _one_line_error(capsys, "predict", "--checkpoint", str(tmp_path / "none.safetensors"),
                           str(tmp_path))
    assert f"checkpoint not found: {tmp_path / 'none.safetensors'}" in line
