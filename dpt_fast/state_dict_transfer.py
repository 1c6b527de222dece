"""Prompts moved to another class set: which tensors of a DPT ``state_dict`` transfer.

Cross-dataset evaluation, base-to-new and domain generalisation evaluate prompts trained on
one set of classes on another. What transfers is what the authors' loader transfers: every
prompt but the CAVPT layer classifiers (one row per training class); the model config must
match, and class-specific text contexts cannot move. The metadata checked here is
:mod:`dpt_fast.state_dict_meta`'s.
"""

from __future__ import annotations

import re

import torch

from dpt_fast.base import DPTBase
from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import PER_DATASET, fields_with
from dpt_fast.state_dict_meta import META_CLASSNAMES, META_CONFIG, decode_json_tensor

# Tensors tied to the training classes: they cannot move to another class set.
_CLASS_SPECIFIC = re.compile(r"^cavpt\.layers\.\d+\.classifier\.weight$")


def load_for_classes(model: DPTBase, state: dict[str, torch.Tensor]) -> None:
    """Load a DPT state_dict into ``model``, which may be built for other classes.

    Same classes: strict ``load_state_dict``. Other classes (cross-dataset, base-to-new,
    domain generalisation): everything but the CAVPT layer classifiers, as the authors' loader
    does; the config must match, and class-specific text contexts cannot transfer.
    """
    source_classes = decode_json_tensor(state[META_CLASSNAMES])
    source_config = decode_json_tensor(state[META_CONFIG])
    # Per-dataset fields (the template) only build the frozen hand-crafted features: each
    # dataset keeps its own.
    diff = model.config.differing_model_fields(source_config,
                                               ignore=fields_with(DPTConfig, PER_DATASET))
    if diff:
        raise ValueError(f"checkpoint config differs from this model in {diff}")
    same_classes = source_classes == model.classnames
    # (a model whose config has no template or class-specific context: CoCoOp)
    if same_classes and source_config.get("template") == getattr(model.config, "template", None):
        model.load_state_dict(state)
        return
    if getattr(model.config, "class_specific_ctx", False) and not same_classes:
        raise ValueError("class-specific text contexts (class_specific_ctx=True) belong to the "
                         "training classes and cannot be evaluated on other classes")

    def transferred(key: str) -> bool:
        return not key.startswith("dpt_meta.") and (same_classes or not _CLASS_SPECIFIC.match(key))

    result = model.load_state_dict({k: v for k, v in state.items() if transferred(k)},
                                   strict=False)
    left = [k for k in result.missing_keys if transferred(k)]
    if left or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit: missing {left}, "
                         f"unexpected {result.unexpected_keys}")
