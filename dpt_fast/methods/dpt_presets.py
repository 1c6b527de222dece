"""The authors' trainers as methods: CoOp, VPT-deep, VLP and DPT, one model with parts on or off.

Each is :class:`dpt_fast.DPT` with the :data:`~dpt_fast.config.DPT_PRESETS` switches of its
name; they train with the engine's SGD loop in two groups, the text context (``text_lr``, its
own warm-up) and the visual prompts with CAVPT (``lr``), as the authors' separate optimizers.
"""

from __future__ import annotations

from dpt_fast.config import DPT_PRESETS, MethodSpec
from dpt_fast.methods.base import Method, ParamGroup

# Model fields every preset reads: the method, the hand-crafted template (zero-shot selection,
# guidance, VPT's classifier) and the std of the prompts' normal init.
_COMMON = frozenset({"method", "template", "init_std"})
_TEXT = frozenset({"n_text_ctx", "text_ctx_init", "class_specific_ctx", "class_token_position"})
_DEEP_VISUAL = frozenset({"n_visual_ctx"})
_CLASS_AWARE = frozenset({"cavpt_start_layer", "cavpt_top_k", "cavpt_n_ctx", "cavpt_attn_dim",
                          "alpha"})
_GUIDANCE = frozenset({"guidance_epochs"})

TEXT_GROUP = ParamGroup("text", ("text_prompts",), "text_lr", "text_warmup_epochs")
VISUAL_GROUP = ParamGroup("visual", ("visual_prompts", "cavpt"), "lr", "warmup_epochs")


def _fields(spec: MethodSpec) -> frozenset[str]:
    """The DPTConfig fields a preset reads."""
    fields = set(_COMMON)
    for on, names in ((spec.text_prompts, _TEXT), (spec.deep_visual_prompts, _DEEP_VISUAL),
                      (spec.class_aware_prompts, _CLASS_AWARE), (spec.guidance, _GUIDANCE)):
        if on:
            fields |= names
    return frozenset(fields)


def _groups(spec: MethodSpec) -> tuple[ParamGroup, ...]:
    """Text first, then visual: the optimizer's group order (checkpoints record it)."""
    groups = []
    if spec.text_prompts:
        groups.append(TEXT_GROUP)
    if spec.deep_visual_prompts or spec.class_aware_prompts:
        groups.append(VISUAL_GROUP)
    return tuple(groups)


def _preset(name: str, description: str) -> Method:
    spec = DPT_PRESETS[name]
    return Method(name=name, description=description, training="sgd",
                  builder="dpt_fast.model:DPT", model_fields=_fields(spec),
                  param_groups=_groups(spec))


COOP = _preset("coop", "CoOp: learned text context (trainers/coop.py)")
VPT = _preset("vpt", "VPT-deep: deep visual prompts, hand-crafted text classifier (VPT.py)")
VLP = _preset("vlp", "VLP: text context + deep visual prompts, guidance objective (VLP.py)")
DPT = _preset("dpt", "DPT: text + deep visual + class-aware visual prompts (DPT.py)")

__all__ = ["COOP", "DPT", "TEXT_GROUP", "VISUAL_GROUP", "VLP", "VPT"]
