"""Training recipes: the values a run uses where the user sets none, per dataset and method.

Two recipes share the authors' optimisation (``fanrena/DPT``: ``train_single.sh`` on
``configs/trainers/VPT/vit_b32_deep.yaml``; :class:`~dpt_fast.engine.config.TrainConfig`'s
defaults) and differ in the backbone only:

* ``dpt_fast`` (default): ViT-B/16 with OpenAI's weights (``ViT-B-16-quickgelu``);
* ``authors``: ViT-B/32 (``ViT-B-32-quickgelu``), what the authors' training script runs.

On top, :data:`DATASET_RULES` holds what the authors' trainers change per dataset. A value the
user sets (flag or YAML) always wins; :func:`apply_recipe` fills the others. Pure Python (no
torch): the CLI applies it before any heavy import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from dpt_fast.config_fields import defaults

RecipeName = Literal["dpt_fast", "authors"]
RECIPE_BACKBONES: dict[str, str] = {
    "dpt_fast": "ViT-B-16-quickgelu",
    "authors": "ViT-B-32-quickgelu",  # vit_b32_deep.yaml: MODEL.BACKBONE.NAME "ViT-B/32"
}
# The run fields a recipe governs, in the order the start of a run reports them.
RECIPE_FIELDS = ("backbone", "epochs", "batch_size", "lr", "text_lr", "warmup_epochs",
                 "text_warmup_epochs", "warmup_lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class DatasetRule:
    """One per-dataset value of the authors' trainers.

    Attributes:
        datasets: registry names the rule applies to.
        methods: the method presets whose trainer sets it (others keep the base value).
        field: the TrainConfig field.
        value: its value there.
        source: where the authors' code sets it.
    """

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    field: str
    value: Any
    source: str


DATASET_RULES: tuple[DatasetRule, ...] = (
    # The visual groups warm up 1 epoch on ImageNet instead of the config's 10. The authors'
    # VPT trainer builds its optimizer from the config directly, so it keeps 10 there; CoOp
    # has no visual group (its text context always warms up 1 epoch: text_warmup_epochs).
    DatasetRule(("imagenet",), ("vlp", "dpt"), "warmup_epochs", 1,
                "trainers/DPT.py and VLP.py: WARMUP_EPOCH=1 if DATASET.NAME == 'ImageNet'"),
)


def recipe_values(recipe: str, dataset: str, method: str, base: dict[str, Any]
                  ) -> dict[str, tuple[Any, str]]:
    """``{field: (value, why)}`` of recipe ``recipe`` for ``dataset`` and ``method``, for every
    field of :data:`RECIPE_FIELDS`; ``base`` holds the TrainConfig defaults."""
    if recipe not in RECIPE_BACKBONES:
        raise ValueError(f"TrainConfig.recipe must be one of {sorted(RECIPE_BACKBONES)}, "
                         f"got {recipe!r}")
    values = {name: (base[name], "default") for name in RECIPE_FIELDS}
    values["backbone"] = (RECIPE_BACKBONES[recipe], f"recipe {recipe}")
    for rule in DATASET_RULES:
        if dataset in rule.datasets and method in rule.methods:
            values[rule.field] = (rule.value, f"{dataset}, {rule.source}")
    return values


def apply_recipe(config, explicit: frozenset[str]):
    """``config`` (a TrainConfig) with every recipe field the user did not set (not in
    ``explicit``) taken from its recipe for its dataset and method."""
    values = recipe_values(config.recipe, config.dataset, config.model.method,
                           defaults(type(config)))
    changes = {name: value for name, (value, _) in values.items() if name not in explicit}
    return dataclasses.replace(config, **changes)


def describe_recipe(config) -> str:
    """One line with the effective value of each recipe field, marking those set by a rule of
    the dataset and those that differ from the recipe (the user's)."""
    values = recipe_values(config.recipe, config.dataset, config.model.method,
                           defaults(type(config)))
    parts = []
    for name in RECIPE_FIELDS:
        value, why = values[name]
        actual = getattr(config, name)
        text = f"{name}={actual}"
        if actual != value:
            text += f" (yours; recipe: {value})"
        elif why not in ("default", f"recipe {config.recipe}"):
            text += f" ({why})"
        parts.append(text)
    return f"recipe {config.recipe} for {config.dataset}/{config.model.method}: " + \
        ", ".join(parts)
