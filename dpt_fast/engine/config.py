"""Typed configuration of a training / evaluation run; the CLI fills it, nothing reads globals.

Defaults are the authors' recipe (``fanrena/DPT``: ``train_single.sh`` and
``configs/trainers/VPT/vit_b32_deep.yaml`` on Dassl): SGD with momentum 0.9 and weight decay
5e-4, batch 32, 60 epochs of cosine schedule; visual prompts and CAVPT at lr 0.01 after 10
constant warm-up epochs at 1e-5 (1 on ImageNet); text context at lr 0.002 after 1 warm-up epoch.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from dpt_fast.config import DPTConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything a run needs besides the model config (``model``)."""

    dataset: str = "oxford_pets"  # dataset name (see dpt_fast.data.DATASETS) or "folder"
    root: str = "data"  # folder holding the datasets in CoOp's layout
    shots: int = 16  # training images per class (-1: all)
    seed: int = 1  # seed of the few-shot split, the data order and the prompt init
    subsample: Literal["all", "base", "new"] = "all"  # classes to train on (base-to-new)
    backbone: str = "ViT-B-16"  # open_clip model name, or a local open_clip config .json
    pretrained: str = "openai"  # open_clip pretrained tag, or a local checkpoint path
    epochs: int = 60  # training epochs
    batch_size: int = 32  # global batch size (split evenly over DDP processes)
    eval_batch_size: int = 100  # evaluation batch size per process
    lr: float = 0.01  # lr of the visual prompts and CAVPT
    text_lr: float = 0.002  # lr of the text context
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    warmup_epochs: int = 10  # constant warm-up epochs of the visual groups (authors: 1 on ImageNet)
    text_warmup_epochs: int = 1  # constant warm-up epochs of the text context
    warmup_lr: float = 1e-5  # lr during the constant warm-up
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a scaler
    num_workers: int = 4  # data-loading worker processes per training process
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    output_dir: str = "runs/dpt"  # where checkpoints, logs and results go
    eval_every: int = 0  # evaluate on the test split every N epochs (0: at the end only)
    resume: bool = False  # continue from output_dir's last checkpoint
    model: DPTConfig = field(default_factory=DPTConfig)  # the DPT model


def field_help(cls) -> dict[str, str]:
    """The trailing comment of each dataclass field in ``cls``'s source: the documentation."""
    source = inspect.getsource(cls)
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$", re.MULTILINE)
    return {name: text.strip() for name, text in pattern.findall(source)}


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def _coerce(owner: str, name: str, hint, value):
    """``value`` as the type ``hint`` of field ``name``: YAML reads ``1e-3`` as a string and
    ``5`` as an int where a float is meant. Anything else that does not fit raises, naming the
    field, the value and the expected type."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{owner}.{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):  # e.g. int | None
        if type(None) in args and (value is None or (isinstance(value, str)
                                                      and value.strip().lower() == "none")):
            return None  # as the CLI flag reads "none"
        inner = [a for a in args if a is not type(None)]
        return _coerce(owner, name, inner[0], value) if len(inner) == 1 else value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"{owner}.{name} must be {hint.__name__}, got {value!r} "
                     f"({type(value).__name__})")


def _coerced(cls, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    return {k: _coerce(cls.__name__, k, hints[k], v) for k, v in values.items()}


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a flat or nested dict; unknown keys or values of the wrong type raise
    naming them. Numbers given as strings (YAML's ``1e-3``) are converted."""
    values = dict(values)
    model_values = values.pop("model", {}) or {}
    if not isinstance(model_values, dict):
        raise ValueError(f"config key 'model' must be a mapping of DPTConfig fields, got "
                         f"{model_values!r}; for the method preset use 'method: {model_values}'")
    model_values = dict(model_values)
    model_fields = {f.name for f in dataclasses.fields(DPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    for key in list(values):
        if key in model_fields and key not in train_fields:
            model_values[key] = values.pop(key)
    unknown = sorted(set(values) - train_fields) + sorted(set(model_values) - model_fields)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid: {sorted(train_fields)} and "
                         f"the DPTConfig fields {sorted(model_fields)}")
    return TrainConfig(**_coerced(TrainConfig, values),
                       model=DPTConfig(**_coerced(DPTConfig, model_values)))
