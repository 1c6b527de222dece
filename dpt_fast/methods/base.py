"""What a method is: how its model is built, what it trains and how, which options it reads.

Pure Python (no torch at import): the CLI checks options and applies recipes before any heavy
import. A method's model is built by ``Method.build``, which imports its builder then.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# How a method gets its classifier: the engine's SGD loop over its parameter groups ("sgd"), a
# classifier fitted on the frozen CLIP's features of the training images ("fit"), or none.
Training = Literal["sgd", "fit", "none"]
TRAININGS: tuple[str, ...] = ("sgd", "fit", "none")

# TrainConfig fields that only the engine's SGD loop reads. A method that does not train with
# it refuses them when the user sets them.
SGD_FIELDS: frozenset[str] = frozenset({
    "epochs", "batch_size", "lr", "text_lr", "momentum", "weight_decay", "warmup_epochs",
    "text_warmup_epochs", "warmup_lr", "eval_every", "resume", "tensorboard", "cache_ram_gb"})
# TrainConfig fields that set a parameter group's learning rate or warm-up (ParamGroup): an SGD
# method reads those of its own groups only.
GROUP_FIELDS: frozenset[str] = frozenset({"lr", "text_lr", "warmup_epochs", "text_warmup_epochs"})
# TrainConfig fields of the few-shot draw: a method that uses no training image refuses them.
SHOT_FIELDS: frozenset[str] = frozenset({"shots"})
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer group of a method trained by the engine's SGD loop."""

    name: str  # the group's name in logs and TensorBoard (lr/<name>)
    parts: tuple[str, ...]  # keys of the model's parameter_groups() that go in it
    lr_field: str  # the TrainConfig field of its learning rate
    warmup_field: str  # the TrainConfig field of its constant warm-up epochs (at warmup_lr)


@dataclass(frozen=True)
class RecipeValues:
    """What a method sets in one recipe on top of the recipe's own values."""

    # TrainConfig fields of the recipe's RECIPE_FIELDS (epochs, lr, ...)
    run: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    model: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # model-config fields


@dataclass(frozen=True)
class Method:
    """A registered method (:mod:`dpt_fast.methods`).

    A model option (a field of ``config_class``) that the method does not read, or a run
    option of training it does not do (``SGD_FIELDS`` for a method without the SGD loop,
    ``shots`` for one without training images), set by the user, is refused: see
    :meth:`refused_options`.
    """

    name: str  # the registry name (DPTConfig.method, the run folder's first level)
    description: str  # one line for --help and the docs
    training: Training  # "sgd" (the engine's loop), "fit" (a fitted classifier), "none"
    builder: str  # "module:callable" (clip, classnames, config) -> nn.Module, imported lazily
    model_fields: frozenset[str]  # model-config fields the method reads (method itself too)
    param_groups: tuple[ParamGroup, ...] = ()  # the optimizer's groups, in order ("sgd")
    # recipe name -> the method's own values in it (--recipe authors / toy / dpt_fast)
    recipes: Mapping[str, RecipeValues] = field(default_factory=lambda: _EMPTY)
    uses_shots: bool = True  # reads training images (else a sweep runs it once per dataset)
    # the config class of the model (its fields are the model options); None: DPTConfig
    config_class: type | None = None

    def __post_init__(self) -> None:
        if self.training not in TRAININGS:
            raise ValueError(f"Method {self.name!r}: training must be one of {TRAININGS}, "
                             f"got {self.training!r}")
        if self.training == "sgd" and not self.param_groups:
            raise ValueError(f"Method {self.name!r} trains with the SGD loop but declares no "
                             "parameter groups")

    def build(self, clip: Any, classnames: Sequence[str], config: Any) -> Any:
        """The method's model for ``classnames`` on the frozen ``clip`` (an ``nn.Module``)."""
        module_name, attribute = self.builder.split(":")
        return getattr(importlib.import_module(module_name), attribute)(clip, classnames, config)

    def unused_run_fields(self) -> frozenset[str]:
        """The run (TrainConfig) fields this method never reads: the SGD loop's (a method
        without it), the lr and warm-up fields of groups it lacks, ``shots`` (no training
        image)."""
        unused: set[str] = set()
        if self.training != "sgd":
            unused |= SGD_FIELDS
        else:  # the learning rates and warm-ups of groups it does not have (CoOp: --lr)
            used = {name for group in self.param_groups
                    for name in (group.lr_field, group.warmup_field)}
            unused |= GROUP_FIELDS - used
        if not self.uses_shots:
            unused |= SHOT_FIELDS
        return frozenset(unused)

    def refused_options(self, explicit: Iterable[str], model_field_names: Iterable[str]
                        ) -> list[str]:
        """The options among ``explicit`` (field names the user set) that this method does not
        read, sorted: model fields (``model_field_names``) outside :attr:`model_fields`, and
        run fields of :meth:`unused_run_fields`."""
        model_names = set(model_field_names)
        unused = self.unused_run_fields()
        return sorted(name for name in set(explicit)
                      if (name in model_names and name not in self.model_fields)
                      or name in unused)

    def recipe_values(self, recipe: str) -> RecipeValues:
        """The method's own values in ``recipe`` (empty when it has none)."""
        return self.recipes.get(recipe, RecipeValues())


def option_flags(names: Iterable[str]) -> str:
    """Field names as the flags a user types: ``cavpt_top_k`` -> ``--cavpt-top-k``."""
    return ", ".join("--" + name.replace("_", "-") for name in sorted(names))


__all__ = ["SGD_FIELDS", "SHOT_FIELDS", "Method", "ParamGroup", "RecipeValues", "Training",
           "option_flags"]
