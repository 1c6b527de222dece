"""Training recipes: the values a run uses where the user sets none, per dataset and method.

Two recipes share the authors' optimisation (``fanrena/DPT``: ``train_single.sh`` on
``configs/trainers/VPT/vit_b32_deep.yaml``; :class:`~dpt_fast.engine.config.TrainConfig`'s
defaults) and differ in the backbone only:

* ``dpt_fast`` (default): ViT-B/16 with OpenAI's weights (``ViT-B-16-quickgelu``);
* ``authors``: ViT-B/32 (``ViT-B-32-quickgelu``), what the authors' training script runs.

A third, ``toy``, is the recipe of ``dpt-fast demo``: the toy CLIP that ships with dpt_fast
(``--backbone toy --pretrained toy``), its own optimisation and prompt sizes (``TOY_RUN``,
``TOY_MODEL``) and its own template, on the toy tasks of :mod:`dpt_fast.toy.task`.

On top, :data:`DATASET_RULES` holds what the authors' trainers change per dataset. A value the
user sets (flag or YAML) always wins; :func:`apply_recipe` fills the others. Pure Python (no
torch): the CLI applies it before any heavy import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from dpt_fast.config_fields import defaults
from dpt_fast.methods import get_method
from dpt_fast.toy_clip import TOY_TEMPLATE

if TYPE_CHECKING:
    from dpt_fast.engine.config import TrainConfig

RecipeName = Literal["dpt_fast", "authors", "toy"]


@dataclass(frozen=True)
class Recipe:
    """What one recipe sets besides the TrainConfig defaults.

    Attributes:
        backbone: the open_clip model (or "toy").
        run: TrainConfig fields of :data:`RECIPE_FIELDS` that differ from their defaults.
        model: DPTConfig fields; each goes to the methods that read it (a method's
            ``model_fields``). A ``template`` here replaces the dataset's template.
    """

    backbone: str
    run: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)


# The toy recipe, the same for every method: SGD (the engine's momentum 0.9, weight decay 5e-4)
# through the engine's schedule: one constant warm-up epoch at the engine's 1e-5, then a cosine
# decay over the run. See dpt_fast/toy/MODEL_CARD.md for how it was chosen and what it gives.
TOY_RUN = MappingProxyType({
    "pretrained": "toy",  # the shipped, checksum-verified weights
    "epochs": 12,
    "batch_size": 32,  # the authors' batch
    "lr": 0.01,  # visual prompts and CAVPT
    "text_lr": 0.01,  # text context
    "warmup_epochs": 1,
    "text_warmup_epochs": 1,
})
# The toy model's prompts: short for a small model and few classes. The text context starts
# from the hand-crafted template's words (CoOp's ctx_init), so that text prompts start at
# zero-shot. The deep visual prompts only act through their layer's LayerNorm, so their norm
# sets their effective learning rate (it falls as 1/norm^2): the authors' 0.02 makes the first
# steps of this small ViT jump, 0.3 keeps them small. The template is the toy's for every
# dataset layout (DTD's "{} texture." would not be how the toy CLIP's captions read).
TOY_MODEL = MappingProxyType({
    "text_ctx_init": "a photo of a", "init_std": 0.3, "n_visual_ctx": 4, "cavpt_top_k": 5,
    "cavpt_n_ctx": 4, "guidance_epochs": 5, "template": TOY_TEMPLATE,
})
RECIPES: dict[str, Recipe] = {
    "dpt_fast": Recipe("ViT-B-16-quickgelu"),
    "authors": Recipe("ViT-B-32-quickgelu"),  # vit_b32_deep.yaml: MODEL.BACKBONE.NAME "ViT-B/32"
    "toy": Recipe("toy", run=TOY_RUN, model=TOY_MODEL),
}
RECIPE_BACKBONES: dict[str, str] = {name: recipe.backbone for name, recipe in RECIPES.items()}
# The run fields a recipe governs, in the order the start of a run reports them.
RECIPE_FIELDS = ("backbone", "pretrained", "epochs", "batch_size", "lr", "text_lr",
                 "warmup_epochs", "text_warmup_epochs", "warmup_lr", "momentum", "weight_decay")


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


def get_recipe(recipe: str) -> Recipe:
    """The recipe named ``recipe``; unknown names raise ``ValueError`` listing the valid ones."""
    if recipe not in RECIPES:
        raise ValueError(f"TrainConfig.recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]


def recipe_values(recipe: str, dataset: str, method: str, base: dict[str, Any]
                  ) -> dict[str, tuple[Any, str]]:
    """``{field: (value, why)}`` of recipe ``recipe`` for ``dataset`` and ``method``, for every
    field of :data:`RECIPE_FIELDS`; ``base`` holds the TrainConfig defaults."""
    spec = get_recipe(recipe)
    values = {name: (base[name], "default") for name in RECIPE_FIELDS}
    values.update({name: (value, f"recipe {recipe}") for name, value in spec.run.items()})
    # The method's own values in this recipe (CoCoOp's batch 1, ...) win over the recipe's.
    values.update({name: (value, f"recipe {recipe}, {method}")
                   for name, value in get_method(method).recipe_values(recipe).run.items()})
    values["backbone"] = (spec.backbone, f"recipe {recipe}")
    for rule in DATASET_RULES:
        if dataset in rule.datasets and method in rule.methods:
            values[rule.field] = (rule.value, f"{dataset}, {rule.source}")
    return values


def recipe_model_values(recipe: str, method: str) -> dict[str, Any]:
    """The DPTConfig fields recipe ``recipe`` sets for ``method``: only those the method reads
    (elsewhere they would act on nothing, and the run's recorded config would claim settings it
    did not use), then the method's own values in the recipe."""
    chosen = get_method(method)
    values = {name: value for name, value in get_recipe(recipe).model.items()
              if name in chosen.model_fields}
    values.update(chosen.recipe_values(recipe).model)
    return values


def apply_recipe(config: TrainConfig, explicit: frozenset[str]) -> TrainConfig:
    """``config`` (a TrainConfig) with every recipe field the user did not set (not in
    ``explicit``, which names model fields bare, as the CLI does) taken from its recipe for its
    dataset and method: the run fields of :data:`RECIPE_FIELDS` and the recipe's model fields."""
    values = recipe_values(config.recipe, config.dataset, config.model.method,
                           defaults(type(config)))
    changes = {name: value for name, (value, _) in values.items() if name not in explicit}
    model_changes = {name: value
                     for name, value in recipe_model_values(config.recipe,
                                                            config.model.method).items()
                     if name not in explicit}
    if model_changes:
        changes["model"] = dataclasses.replace(config.model, **model_changes)
    if not get_method(config.model.method).uses_shots:
        changes["shots"] = 0  # it reads no training image (zero-shot CLIP)
    return dataclasses.replace(config, **changes)


def template_is_fixed(config: TrainConfig, explicit: frozenset[str]) -> bool:
    """Whether a run keeps ``config.model.template`` instead of the dataset's template: the user
    set it, or the config's recipe has a template of its own (the toy recipe). What a caller of
    ``train_run`` passes as ``template_explicit``."""
    return "template" in explicit or "template" in get_recipe(config.recipe).model


def describe_recipe(config: TrainConfig) -> str:
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
    for name, value in recipe_model_values(config.recipe, config.model.method).items():
        actual = getattr(config.model, name)
        parts.append(f"{name}={actual!r}" + (f" (yours; recipe: {value!r})"
                                             if actual != value else ""))
    return f"recipe {config.recipe} for {config.dataset}/{config.model.method}: " + \
        ", ".join(parts)
