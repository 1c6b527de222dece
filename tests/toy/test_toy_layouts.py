"""The toy task in several CoOp layouts (``dpt_fast.toy.task.LAYOUTS``) and ``--recipe toy``:
each layout reads as its registered dataset, the demo's dtd images are those it always had, the
recipe is the demo's and the user's values win over it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpt_fast.cli import build_parser, main, resolve_config
from dpt_fast.config import DPTConfig
from dpt_fast.data import build_dataset
from dpt_fast.data.datasets import DATASETS
from dpt_fast.engine.recipe import (
    RECIPES,
    TOY_MODEL,
    TOY_RUN,
    describe_recipe,
    template_is_fixed,
)
from dpt_fast.toy import demo, task
from dpt_fast.toy_clip.world import vocabulary

TINY = {"train": 2, "val": 1, "test": 1}  # images per class: enough to read every split
# SHA-256 over the dtd split file (keys sorted) and the decoded pixels of every image in split
# order, as the code before the other layouts existed wrote them with TINY_DTD (computed with
# that code, before the refactor). Pixels rather than PNG bytes: the encoder may change with
# Pillow, the images may not. The full-size task was also checked by hand: byte-identical.
TINY_DTD = {"train": 2, "val": 1, "test": 2}
TINY_DTD_SHA256 = "6d3052b60343a414c640bf0cb4cdb3bc7e6b69d31be5aba814366b9fb6c538e2"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Every layout, TINY images per class, under one data root."""
    root = tmp_path_factory.mktemp("toy_layouts")
    task.write_tasks(root, per_class=TINY)
    return root


def _content_hash(dataset_dir: Path, layout: task.Layout) -> str:
    split = json.loads((dataset_dir / layout.split_file).read_text())
    digest = hashlib.sha256(json.dumps(split, sort_keys=True).encode())
    for name in ("train", "val", "test"):
        for relpath, _, _ in split[name]:
            image = Image.open(dataset_dir / layout.image_subdir / relpath).convert("RGB")
            digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("dataset", list(task.LAYOUTS))
def test_each_layout_reads_as_its_registered_dataset(tiny_root, dataset):
    layout = task.get_layout(dataset)
    assert layout.folder == DATASETS[dataset].folder
    splits = build_dataset(dataset, tiny_root, shots=-1)
    n = len(layout.classes)
    assert splits.classnames == task.classnames(dataset) and splits.num_classes == n
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2 * n, n, n)
    fewshot = build_dataset(dataset, tiny_root, shots=1, seed=1)
    assert len(fewshot.train) == n and len(fewshot.val) == n
    # the toy CLIP's tokenizer embeds every word of every prompt
    words = {w for name in splits.classnames for w in name.split()}
    assert words <= set(vocabulary())


def test_layouts_have_their_own_classes_and_sizes():
    names = {dataset: set(task.classnames(dataset)) for dataset in task.LAYOUTS}
    assert len(names) >= 3
    assert all(a == b or not names[a] & names[b] for a in names for b in names)
    counts = {dataset: layout.counts() for dataset, layout in task.LAYOUTS.items()}
    assert counts["dtd"] == {"train": 16, "val": 4, "test": 100}
    assert all(c == {"train": 16, "val": 4, "test": task.SMALL_TEST_PER_CLASS}
               for dataset, c in counts.items() if dataset != "dtd")
    with pytest.raises(KeyError, match="valid: dtd"):
        task.write_task("unused", dataset="imagenet")


def test_dtd_images_are_unchanged(tmp_path):
    folder = task.write_task(tmp_path, per_class=TINY_DTD)
    assert folder == tmp_path / "dtd"
    assert _content_hash(folder, task.get_layout("dtd")) == TINY_DTD_SHA256
    assert task.classnames()[:2] == ["red plain square", "red striped square"]


def test_main_writes_the_layouts_asked_for(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(task, "write_task", lambda root, seed, per_class, fade_amount, dataset:
                        written.append(dataset) or Path(root) / dataset)
    assert task.main([str(tmp_path)]) == 0
    assert task.main([str(tmp_path), "--datasets", "sun397", "caltech101", "sun397"]) == 0
    assert task.main([str(tmp_path), "--all"]) == 0
    assert written == ["dtd", "sun397", "caltech101", *task.LAYOUTS]
    assert "sun397 layout, 24 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        task.main([str(tmp_path), "--datasets", "imagenet"])


def _resolve(*flags: str):
    return resolve_config(build_parser().parse_args(["train", *flags]))


def test_recipe_toy_is_the_demos_recipe(tmp_path):
    for method in ("coop", "dpt"):
        config, explicit = _resolve(
            "--recipe", "toy", "--dataset", "dtd", "--root", str(tmp_path), "--method", method,
            "--shots", "16", "--seed", "1", "--eval-batch-size", "100", "--num-workers", "0",
            "--device", "cpu", "--output-dir", str(tmp_path / f"{method}_seed1"))
        assert config == demo.train_config(method, root=tmp_path, output_dir=tmp_path,
                                           shots=16, seed=1, epochs=TOY_RUN["epochs"],
                                           device="cpu")
        assert template_is_fixed(config, explicit)
    assert (config.backbone, config.pretrained) == ("toy", "toy")
    assert config.model.template == task.TEMPLATE and config.model.init_std == 0.3
    coop = _resolve("--recipe", "toy", "--method", "coop")[0].model
    assert coop.cavpt_top_k == DPTConfig().cavpt_top_k  # no CAVPT: left at its default
    line = describe_recipe(config)
    assert line.startswith("recipe toy for dtd/dpt: backbone=toy, pretrained=toy, epochs=12")
    assert "text_ctx_init='a photo of a'" in line


def test_recipe_toy_values_have_one_source():
    from dpt_fast.toy.options import DEFAULT_EPOCHS
    from dpt_fast.toy_clip import BACKBONE_NAME, PRETRAINED_TAG

    assert RECIPES["toy"].backbone == BACKBONE_NAME and TOY_RUN["pretrained"] == PRETRAINED_TAG
    assert TOY_RUN["epochs"] == DEFAULT_EPOCHS
    assert demo.MODEL_OVERRIDES == {k: v for k, v in TOY_MODEL.items() if k != "template"}


def test_explicit_values_win_over_recipe_toy(tmp_path):
    config, explicit = _resolve(
        "--recipe", "toy", "--epochs", "3", "--lr", "0.05", "--pretrained", "none",
        "--init-std", "0.1", "--cavpt-top-k", "2", "--template", "{} texture.")
    assert (config.epochs, config.lr, config.pretrained) == (3, 0.05, "none")
    assert (config.text_lr, config.batch_size, config.backbone) == (0.01, 32, "toy")
    assert (config.model.init_std, config.model.cavpt_top_k) == (0.1, 2)
    assert (config.model.template, config.model.n_visual_ctx) == ("{} texture.", 4)
    assert template_is_fixed(config, explicit)
    assert "lr=0.05 (yours; recipe: 0.01)" in describe_recipe(config)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("recipe: toy\nwarmup_epochs: 2\nmodel:\n  n_visual_ctx: 2\n")
    config, _ = _resolve("--config", str(yaml_file))
    assert (config.warmup_epochs, config.model.n_visual_ctx, config.epochs) == (2, 2, 12)


def test_other_recipes_keep_the_model_and_the_datasets_template():
    config, explicit = _resolve("--dataset", "dtd")
    assert config.model == DPTConfig() and config.pretrained == "openai"
    assert not template_is_fixed(config, explicit)


def test_cli_trains_a_new_layout_with_recipe_toy(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    task.write_task(data, dataset="sun397", per_class={"train": 1, "val": 1, "test": 1})
    assert main(["train", "--dataset", "sun397", "--root", str(data), "--recipe", "toy",
                 "--epochs", "1", "--shots", "1", "--num-workers", "0", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.startswith("sun397 test accuracy:")
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["recipe"], config["backbone"], config["pretrained"]) == ("toy", "toy", "toy")
    assert config["model"]["text_ctx_init"] == "a photo of a"
    assert config["model"]["template"] == task.TEMPLATE
    assert len(results["history"]) == 1
    assert results["test"]["n"] == len(task.classnames("sun397"))
