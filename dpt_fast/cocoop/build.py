"""The registry's builder of CoCoOp: a run's DPTConfig (its text-context fields) -> the model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dpt_fast.cocoop.config import CoCoOpConfig
from dpt_fast.cocoop.model import CoCoOp
from dpt_fast.config import DPTConfig


def cocoop_config(config: DPTConfig | CoCoOpConfig) -> CoCoOpConfig:
    """The CoCoOpConfig of a run's DPTConfig: ``n_text_ctx`` -> ``n_ctx``, ``text_ctx_init`` ->
    ``ctx_init``, ``init_std``; the meta-net keeps the authors' reduction."""
    if isinstance(config, CoCoOpConfig):
        return config
    return CoCoOpConfig(n_ctx=config.n_text_ctx, ctx_init=config.text_ctx_init,
                        init_std=config.init_std)


def build_cocoop(clip: nn.Module, classnames: Sequence[str],
                 config: DPTConfig | CoCoOpConfig) -> CoCoOp:
    """The fast CoCoOp the engine trains and evaluates (``dpt-fast train --method cocoop``)."""
    return CoCoOp(clip, classnames, cocoop_config(config))
