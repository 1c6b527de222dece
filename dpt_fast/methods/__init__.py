"""The methods ``dpt-fast`` trains and compares: one registry, readable without torch.

Each line names a method, the ``"module:attribute"`` of its :class:`~dpt_fast.methods.base.Method`
object and a one-line description. The module is imported only when the method is asked for
(:func:`get_method`), so ``dpt-fast --help`` lists the methods without importing torch. The
order is the paper's (baselines first): reports and figures list methods in it.

Adding a method: one module holding its ``Method`` object, its tests, and one line here
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry itself imports nothing heavy
    from collections.abc import Sequence

    from dpt_fast.methods.base import Method

# name -> ("module:attribute" of its Method, one-line description)
REGISTRY: dict[str, tuple[str, str]] = {
    "zeroshot": ("dpt_fast.methods.zeroshot:ZEROSHOT",
                 "zero-shot CLIP: hand-crafted prompts, no training"),
    "linear_probe": ("dpt_fast.methods.linear_probe:LINEAR_PROBE",
                     "linear-probe CLIP: logistic regression on frozen image features (lpclip)"),
    "coop": ("dpt_fast.methods.dpt_presets:COOP", "CoOp: learned text context"),
    "cocoop": ("dpt_fast.methods.cocoop:COCOOP",
               "CoCoOp: text context conditioned on each image by a meta-net"),
    "vpt": ("dpt_fast.methods.dpt_presets:VPT",
            "VPT-deep: learned visual prompts, hand-crafted text classifier"),
    "vlp": ("dpt_fast.methods.dpt_presets:VLP",
            "VLP: text context + deep visual prompts, guidance objective"),
    "dpt": ("dpt_fast.methods.dpt_presets:DPT",
            "DPT: text context + deep visual prompts + class-aware visual prompts"),
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def check_method_name(name: str) -> None:
    """Raise ``ValueError`` naming the valid methods when ``name`` is not registered."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(METHOD_NAMES)})")


def get_method(name: str) -> Method:
    """The :class:`~dpt_fast.methods.base.Method` registered as ``name`` (its module imported
    now); an unknown name raises ``ValueError`` listing the valid ones."""
    check_method_name(name)
    module_name, attribute = REGISTRY[name][0].split(":")
    method = getattr(importlib.import_module(module_name), attribute)
    if method.name != name:
        raise RuntimeError(f"registry line {name!r} points to the method {method.name!r}")
    return method


def create_method(name: str, clip: Any, classnames: Sequence[str], config: Any) -> Any:
    """The model (an ``nn.Module``) of method ``name`` for ``classnames`` on the frozen CLIP
    ``clip``, configured by ``config`` (its ``config_class``, a DPTConfig): the one factory
    every command builds its models with (as timm's ``create_model``)."""
    return get_method(name).build(clip, classnames, config)


def describe_methods() -> str:
    """``name: description`` of every method, for ``--help``."""
    return "; ".join(f"{name}: {description}" for name, (_, description) in REGISTRY.items())


__all__ = ["METHOD_NAMES", "REGISTRY", "check_method_name", "create_method", "describe_methods",
           "get_method"]
