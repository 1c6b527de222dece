"""The recipe per dataset and method, the authors' recipe, and the backbone of the authors'
output folders (never guessed)."""

from __future__ import annotations

import json
import logging

import pytest
from data_fixtures import make_dataset

from dpt_fast.cli import build_parser, main, resolve_config
from dpt_fast.engine.official_backbone import config_value, official_backbone
from dpt_fast.engine.recipe import describe_recipe


def _config(*flags: str, yaml_text: str | None = None, tmp_path=None):
    args = ["train", *flags]
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        args += ["--config", str(path)]
    return resolve_config(build_parser().parse_args(args))[0]


@pytest.mark.parametrize(("flags", "warmup"), [
    (["--dataset", "imagenet"], 1),  # trainers/DPT.py: WARMUP_EPOCH=1 on ImageNet
    (["--dataset", "imagenet", "--method", "vlp"], 1),  # trainers/VLP.py too
    (["--dataset", "imagenet", "--method", "vpt"], 10),  # trainers/VPT.py keeps the config's
    (["--dataset", "oxford_pets"], 10),
    (["--dataset", "imagenet", "--warmup-epochs", "5"], 5),  # the user's value wins
    (["--dataset", "imagenet", "--warmup-epochs", "10"], 10),  # even when it is the default
])
def test_warmup_epochs_follow_dataset_and_method(flags, warmup):
    assert _config(*flags).warmup_epochs == warmup


def test_yaml_values_win_over_the_recipe(tmp_path):
    config = _config("--dataset", "imagenet", yaml_text="warmup_epochs: 10\n", tmp_path=tmp_path)
    assert config.warmup_epochs == 10
    config = _config(yaml_text="dataset: imagenet\nrecipe: authors\n", tmp_path=tmp_path)
    assert (config.warmup_epochs, config.backbone) == (1, "ViT-B-32-quickgelu")


def test_one_flag_selects_the_authors_backbone():
    assert _config().backbone == "ViT-B-16-quickgelu"
    assert _config("--recipe", "authors").backbone == "ViT-B-32-quickgelu"
    assert _config("--recipe", "authors", "--backbone", "ViT-B-16-quickgelu").backbone == \
        "ViT-B-16-quickgelu"


def test_the_effective_values_are_described_with_their_source():
    line = describe_recipe(_config("--dataset", "imagenet", "--lr", "0.02"))
    assert line.startswith("recipe dpt_fast for imagenet/dpt: backbone=ViT-B-16-quickgelu")
    assert "warmup_epochs=1 (imagenet, trainers/DPT.py and VLP.py" in line
    assert "lr=0.02 (yours; recipe: 0.01)" in line and "text_lr=0.002," in line


def test_a_run_logs_and_records_the_recipe_values(clip_files, tmp_path, caplog):
    make_dataset(tmp_path / "data", "imagenet")
    config, weights = clip_files
    out = tmp_path / "run"
    args = ["train", "--dataset", "imagenet", "--root", str(tmp_path / "data"), "--shots", "-1",
            "--backbone", config, "--pretrained", weights, "--epochs", "1", "--batch-size", "4",
            "--num-workers", "0", "--lr", "0.05", "--device", "cpu", "--output-dir", str(out),
            "--n-text-ctx", "4", "--cavpt-top-k", "2", "--eval-batch-size", "8"]
    with caplog.at_level(logging.INFO, logger="dpt_fast"):
        assert main(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["warmup_epochs"] == 1 and saved["recipe"] == "dpt_fast"
    assert saved["clip"] == {"backbone": config, "pretrained": weights,
                             "activation": "quick_gelu"}
    started = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("recipe dpt_fast for imagenet/dpt")]
    assert len(started) == 1 and "warmup_epochs=1 (imagenet" in started[0]
    assert f"backbone={config} (yours; recipe: ViT-B-16-quickgelu)" in started[0]


# --- the authors' output folders -----------------------------------------------------------

# What the authors' train.py prints into <output dir>/log.txt (Dassl's logger): its arguments,
# then the yacs config, then training lines (some with colons of their own).
DASSL_LOG = """\
***************
** Arguments **
***************
backbone:
config_file: ./configs/trainers/VPT/vit_b32_deep.yaml
************
** Config **
************
DATALOADER:
  NUM_WORKERS: 2
MODEL:
  BACKBONE:
    NAME: {name}
    PRETRAINED: True
  HEAD:
    NAME:
OPTIM:
  LR: 0.01
epoch [1/60] batch [5/6] time 0.216 (0.289) loss 1.4980 (1.3765) lr 1.0000e-05 eta 0:01:24
"""


def test_the_backbone_is_read_from_the_dassl_log():
    assert config_value(DASSL_LOG.format(name="ViT-B/32")) == "ViT-B/32"
    assert config_value(DASSL_LOG.format(name="ViT-B/32"), ("MODEL", "HEAD", "NAME")) is None
    assert config_value("MODEL:\n  HEAD:\n    NAME: x\n") is None


def test_official_dirs_name_their_backbone_or_refuse(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"ViT-B/16 and ViT-B/32 prompts have the same shapes.*"
                                         r"no Dassl log\.txt.*pass --backbone"):
        official_backbone(tmp_path, "ViT-B-16-quickgelu", explicit=False)
    assert official_backbone(tmp_path, "ViT-B-16-quickgelu", explicit=True) == \
        "ViT-B-16-quickgelu"
    (tmp_path / "log.txt").write_text(DASSL_LOG.format(name="ViT-B/32"))
    assert official_backbone(tmp_path, "ViT-B-16-quickgelu", explicit=False) == \
        "ViT-B-32-quickgelu"
    with caplog.at_level(logging.WARNING, logger="dpt_fast"):
        assert official_backbone(tmp_path, "ViT-B-16-quickgelu", explicit=True) == \
            "ViT-B-16-quickgelu"
    assert "trained on ViT-B/32" in caplog.records[-1].getMessage()
    (tmp_path / "log.txt-2024-01-01-10-00-00").write_text(DASSL_LOG.format(name="ViT-B/16"))
    with pytest.raises(ValueError, match="logs disagree"):
        official_backbone(tmp_path, "ViT-B-16-quickgelu", explicit=False)


def test_eval_of_an_official_dir_without_backbone_is_one_line_error(tmp_path, capsys):
    (tmp_path / "official").mkdir()
    assert main(["eval", "--official-dir", str(tmp_path / "official"), "--dataset", "folder",
                 "--root", str(tmp_path), "--device", "cpu",
                 "--output-dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpt-fast: error: --official-dir: cannot tell which CLIP")
    assert "--recipe authors" in err and len(err.strip().splitlines()) == 1
