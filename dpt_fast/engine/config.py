"""Typed configuration of a training / evaluation run; the CLI fills it, nothing reads globals.

Defaults are the authors' recipe (``fanrena/DPT``: ``train_single.sh`` and
``configs/trainers/VPT/vit_b32_deep.yaml`` on Dassl): SGD with momentum 0.9 and weight decay
5e-4, batch 32, 60 epochs of cosine schedule; visual prompts and CAVPT at lr 0.01 after 10
constant warm-up epochs at 1e-5; text context at lr 0.002 after 1 warm-up epoch. What changes
per dataset (1 visual warm-up epoch on ImageNet) and the backbone of each recipe live in
:mod:`dpt_fast.engine.recipe`; the CLI applies them to the fields the user does not set.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import EVAL, REPEAT, REPORT_KEY, RESUMABLE, with_roles
from dpt_fast.engine.progress import PROGRESS_MODES, ProgressMode, ProgressSettings
from dpt_fast.engine.recipe import RECIPE_BACKBONES, RecipeName
from dpt_fast.methods import get_method

if TYPE_CHECKING:
    from dpt_fast.data.disk_cache import CacheSettings

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything a run needs besides the model config (``model``).

    Field roles (:mod:`dpt_fast.config_fields`): RESUMABLE fields may change when a run is
    resumed, EVAL fields are flags of ``dpt-fast eval`` too, REPORT_KEY fields are columns of
    ``dpt-fast report``, REPEAT (the seed) tells repetitions of one experiment apart.
    """

    dataset: str = with_roles("oxford_pets", EVAL, REPORT_KEY)  # a DATASETS name, or "folder"
    root: str = with_roles("data", EVAL, RESUMABLE)  # folder holding the datasets in CoOp's layout
    shots: int = with_roles(16, REPORT_KEY)  # training images per class (-1: all; zeroshot: 0)
    seed: int = with_roles(1, EVAL, REPEAT)  # seed of the few-shot split, data order, prompt init
    # classes to train on (base-to-new)
    subsample: Literal["all", "base", "new"] = with_roles("all", EVAL, REPORT_KEY)
    # training recipe: dpt_fast (ViT-B/16) or authors (ViT-B/32, as the authors' script); it
    # fills the backbone and the dataset's values of the fields you do not set
    recipe: RecipeName = with_roles("dpt_fast", EVAL)
    # open_clip model name or config .json; OpenAI's weights need a -quickgelu model
    backbone: str = with_roles("ViT-B-16-quickgelu", EVAL, REPORT_KEY)
    # open_clip pretrained tag, weights file (open_clip's, or OpenAI's ViT-B-16.pt), or none
    pretrained: str = with_roles("openai", EVAL)
    epochs: int = 60  # training epochs
    batch_size: int = 32  # global batch size (split evenly over DDP processes)
    eval_batch_size: int = with_roles(100, EVAL, RESUMABLE)  # evaluation batch size per process
    lr: float = 0.01  # lr of the visual prompts and CAVPT
    text_lr: float = 0.002  # lr of the text context
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    # constant warm-up epochs of the visual groups (recipe: 1 on ImageNet for vlp and dpt)
    warmup_epochs: int = 10
    text_warmup_epochs: int = 1  # constant warm-up epochs of the text context
    warmup_lr: float = 1e-5  # lr during the constant warm-up
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler
    precision: Precision = with_roles("auto", EVAL)
    num_workers: int = with_roles(4, EVAL, RESUMABLE)  # data-loading processes per training process
    device: str = with_roles("auto", EVAL, RESUMABLE)  # auto, cpu, cuda, cuda:N
    output_dir: str = with_roles("runs/dpt", EVAL, RESUMABLE)  # checkpoints, logs and results
    eval_every: int = with_roles(0, RESUMABLE)  # test-split accuracy every N epochs (0: at the end)
    resume: bool = with_roles(False, RESUMABLE)  # continue from output_dir's last checkpoint
    # progress of long loops: a bar on a terminal, log lines otherwise (auto); bar, lines, none
    progress: ProgressMode = with_roles("auto", EVAL, RESUMABLE)
    # lines mode: a progress line every N steps (0: about every 30 s)
    log_every: int = with_roles(0, EVAL, RESUMABLE)
    # write TensorBoard summaries to output_dir/tensorboard (needs the tensorboard extra)
    tensorboard: bool = with_roles(False, RESUMABLE)
    # keep test crops and frozen CLIP features on disk (--no-cache: decode and compute each time)
    cache: bool = with_roles(True, EVAL, RESUMABLE)
    # folder of the disk caches ("": $DPT_FAST_CACHE_DIR, else ~/.cache/dpt_fast)
    cache_dir: str = with_roles("", EVAL, RESUMABLE)
    # decoded training images kept in memory per loader process, GiB (0: a quarter of the RAM
    # shared by the processes, at most 4 GiB each); beyond it images are decoded again
    cache_ram_gb: float = with_roles(0.0, RESUMABLE)
    # leave unreadable test images out (counted in results.json) instead of stopping the run
    skip_unreadable: bool = with_roles(False, EVAL, RESUMABLE)
    model: DPTConfig = field(default_factory=DPTConfig)  # the DPT model

    def __post_init__(self) -> None:
        """Refuse values no run can use, naming the field (before any work starts)."""
        rules = (
            ("recipe", self.recipe in RECIPE_BACKBONES, f"one of {sorted(RECIPE_BACKBONES)}"),
            # 0: no training image, for the methods that read none (zeroshot)
            ("shots", self.shots == -1 or self.shots >= 1 or (
                self.shots == 0 and not get_method(self.model.method).uses_shots),
             "-1 (all images) or >= 1 (0 only for a method without training images)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("lr", _finite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("text_lr", _finite(self.text_lr) and self.text_lr > 0, "a finite number > 0"),
            ("warmup_lr", _finite(self.warmup_lr) and self.warmup_lr > 0, "a finite number > 0"),
            ("momentum", _finite(self.momentum) and self.momentum >= 0, "a finite number >= 0"),
            ("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0,
             "a finite number >= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("text_warmup_epochs", self.text_warmup_epochs >= 0, ">= 0"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0: evaluate at the end only)"),
            ("progress", self.progress in PROGRESS_MODES, f"one of {list(PROGRESS_MODES)}"),
            ("log_every", self.log_every >= 0, ">= 0 (0: about every 30 s)"),
            ("cache_ram_gb", _finite(self.cache_ram_gb) and self.cache_ram_gb >= 0,
             "a finite number >= 0 (0: automatic)"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")


def progress_settings(config: TrainConfig) -> ProgressSettings:
    return ProgressSettings(mode=config.progress, log_every=config.log_every)


def cache_settings(config: TrainConfig) -> CacheSettings:
    """The disk caches' settings of a run (``--cache``, ``--cache-dir``)."""
    from dpt_fast.data.disk_cache import CacheSettings

    return CacheSettings.from_options(config.cache_dir or None, no_cache=not config.cache)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def field_help(cls: type) -> dict[str, str]:
    """The documentation of each dataclass field in ``cls``'s source: its trailing comment, or
    the comment lines right above it when the line has no room for one."""
    help_text: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^\s+(\w+): [^=]+=(.*)$", line)
        if match:
            trailing = re.search(r"#\s*(.+)$", match.group(2))
            text = trailing.group(1).strip() if trailing else " ".join(above)
            if text:
                help_text[match.group(1)] = text
        above = []
    return help_text


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
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


def _coerced(cls: type, values: dict[str, Any]) -> dict[str, Any]:
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
