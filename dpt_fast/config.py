"""Typed configuration of a DPT model and its method presets.

Defaults are the authors' (``fanrena/DPT``, ``train_single.sh`` and ``configs/trainers/VPT``):
16 text context tokens, 10 deep visual prompt tokens, CAVPT in the last layer only with top-10
classes, α = 0.3, 30 guidance epochs.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass
from typing import Any, Literal

from dpt_fast.config_fields import (
    INIT_ONLY,
    LOSS_ONLY,
    PER_DATASET,
    REPORT_KEY,
    config_diff,
    fields_with,
    with_roles,
)
from dpt_fast.method_registry import METHOD_NAMES

# A registered method's name (dpt_fast.methods.METHOD_NAMES); the DPT presets are DPT_PRESETS.
MethodName = str
ClassTokenPosition = Literal["end", "middle", "front"]


@dataclass(frozen=True)
class MethodSpec:
    """Which parts of DPT a method preset switches on (the authors' trainers)."""

    text_prompts: bool  # learn CoOp text context (else the hand-crafted text features classify)
    deep_visual_prompts: bool  # VPT-deep tokens in the layers below the CAVPT layers
    class_aware_prompts: bool  # CAVPT in layers cavpt_start_layer..L
    guidance: bool  # the guidance objective (zero-shot image + hand-crafted text terms)


DPT_PRESETS: dict[str, MethodSpec] = {
    # trainers/coop.py: text prompts, CE(logits)
    "coop": MethodSpec(text_prompts=True, deep_visual_prompts=False,
                       class_aware_prompts=False, guidance=False),
    # trainers/VPT.py: deep visual prompts in every layer, hand-crafted text classifier, CE
    "vpt": MethodSpec(text_prompts=False, deep_visual_prompts=True,
                      class_aware_prompts=False, guidance=False),
    # trainers/VLP.py: text + deep visual prompts in every layer, guidance objective
    "vlp": MethodSpec(text_prompts=True, deep_visual_prompts=True,
                      class_aware_prompts=False, guidance=True),
    # trainers/DPT.py: everything
    "dpt": MethodSpec(text_prompts=True, deep_visual_prompts=True,
                      class_aware_prompts=True, guidance=True),
}
# The model parts of a registered method that is not a DPT preset (zero-shot CLIP, the linear
# probe, ...): none of DPT's prompts, so no DPT option applies to it.
NO_PROMPTS = MethodSpec(text_prompts=False, deep_visual_prompts=False,
                        class_aware_prompts=False, guidance=False)


def _check_template(template: str) -> None:
    """A template holds exactly one ``{}`` (the class name); other braces are written ``{{``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # e.g. a lone "{"
        raise ValueError(f"DPTConfig.template {template!r} is not a valid template ({err}); "
                         "write literal braces as '{{' and '}}'") from None
    if fields != [""] or "{}" not in template:
        raise ValueError(
            f"DPTConfig.template must contain '{{}}' exactly once, where the class name goes "
            f"(and no other replacement field), got {template!r}"
        )


@dataclass
class DPTConfig:
    """Configuration of :class:`dpt_fast.DPT` and :class:`dpt_fast.reference.DPT`.

    Invalid values and combinations raise ``ValueError`` naming the field when the config is
    created (fields that need the CLIP, such as ``cavpt_start_layer``, are checked again when the
    model is built).
    """

    # a registered method (dpt_fast.methods: dpt, coop, vpt, vlp, zeroshot, linear_probe, ...)
    method: MethodName = with_roles("dpt", REPORT_KEY)
    n_text_ctx: int = 16  # learnable text context tokens (ignored when text_ctx_init is set)
    text_ctx_init: str = ""  # words that initialise the text context, e.g. "a photo of a"
    class_specific_ctx: bool = False  # one text context per class (CoOp's CSC)
    class_token_position: ClassTokenPosition = "end"  # where the class name sits in the prompt
    n_visual_ctx: int = 10  # deep visual prompt tokens per layer (authors' TRAINER.VPT.N_CTX)
    cavpt_start_layer: int | None = None  # 1-based first CAVPT layer (BOTTOMLIMIT); None = last
    cavpt_top_k: int = 10  # classes selected per image (CPN); capped at the number of classes
    cavpt_n_ctx: int = 10  # learnable key/value tokens of each CAVPT attention
    cavpt_attn_dim: int = 32  # query/key width of the CAVPT attention
    alpha: float = with_roles(0.3, LOSS_ONLY)  # weight of the layer-logit loss (TRAINER.ALPHA)
    guidance_epochs: int = with_roles(30, LOSS_ONLY)  # epochs of guidance loss (PRETRAIN.C)
    # hand-crafted prompt of the zero-shot selection and guidance; "{}" takes the class name
    template: str = with_roles("a photo of a {}.", PER_DATASET)
    init_std: float = with_roles(0.02, INIT_ONLY)  # std of the normal init of all prompt tokens

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ValueError(
                f"DPTConfig.method must be one of {list(METHOD_NAMES)}, got {self.method!r}"
            )
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(
                "DPTConfig.class_token_position must be 'end', 'middle' or 'front', "
                f"got {self.class_token_position!r}"
            )
        _check_template(self.template)
        spec = self.spec
        if spec.text_prompts:
            if not self.text_ctx_init and self.n_text_ctx < 1:
                raise ValueError(f"DPTConfig.n_text_ctx must be >= 1, got {self.n_text_ctx}")
            if self.text_ctx_init and self.class_specific_ctx:
                raise ValueError(
                    "DPTConfig.text_ctx_init cannot be combined with class_specific_ctx=True "
                    "(an initialisation from words gives one generic context)"
                )
        if spec.deep_visual_prompts and self.n_visual_ctx < 1:
            raise ValueError(
                f"DPTConfig.n_visual_ctx must be >= 1 for method {self.method!r}, "
                f"got {self.n_visual_ctx}"
            )
        if self.cavpt_start_layer is not None:
            if not spec.class_aware_prompts:
                raise ValueError(
                    f"DPTConfig.cavpt_start_layer is set but method {self.method!r} has no "
                    "class-aware prompts: leave it None or use method='dpt'"
                )
            if self.cavpt_start_layer < 1:
                raise ValueError(
                    "DPTConfig.cavpt_start_layer is 1-based and must be >= 1, "
                    f"got {self.cavpt_start_layer}"
                )
        if spec.class_aware_prompts:
            for name in ("cavpt_top_k", "cavpt_n_ctx", "cavpt_attn_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"DPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"DPTConfig.alpha must be a finite number >= 0, got {self.alpha}")
        if self.guidance_epochs < 0:
            raise ValueError(f"DPTConfig.guidance_epochs must be >= 0, got {self.guidance_epochs}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"DPTConfig.init_std must be a finite number > 0, "
                             f"got {self.init_std}")

    @property
    def spec(self) -> MethodSpec:
        """The parts of DPT this config's method uses (none for a method that is not a DPT
        preset)."""
        return DPT_PRESETS.get(self.method, NO_PROMPTS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_fields(self) -> dict[str, Any]:
        """The fields that define the learned tensors (all but the loss-only ones)."""
        loss_only = fields_with(DPTConfig, LOSS_ONLY)
        return {k: v for k, v in self.to_dict().items() if k not in loss_only}

    def differing_model_fields(self, saved: dict[str, Any],
                               ignore: frozenset[str] = frozenset()) -> list[str]:
        """The model fields (sorted) whose value in ``saved``, a checkpoint's ``model_fields()``,
        differs from this config's (a field ``saved`` lacks counts as its default); loss-only
        and init-only fields and those in ``ignore`` never count."""
        changes = config_diff(DPTConfig, saved, self.model_fields(),
                              skip_roles=(LOSS_ONLY, INIT_ONLY), skip=ignore)
        return [change.name for change in changes]
