"""The methods ``dpt-fast`` trains and compares: one registry, readable without torch.

Each line of :mod:`dpt_fast.method_registry` names a method, the ``"module:attribute"`` of its
:class:`~dpt_fast.methods.base.Method` object and a one-line description. The module is
imported only when the method is asked for (:func:`get_method`), so ``dpt-fast --help`` lists
the methods without importing torch. The order is the paper's (baselines first): reports and
figures list methods in it.

Adding a method: one module holding its ``Method`` object, its tests, and one line in
:mod:`dpt_fast.method_registry` (docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpt_fast.method_registry import METHOD_NAMES, REGISTRY, check_method_name

if TYPE_CHECKING:  # the registry itself imports nothing heavy
    from collections.abc import Sequence

    from dpt_fast.methods.base import Method


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
