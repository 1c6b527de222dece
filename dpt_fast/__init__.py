"""dpt_fast: fast, exact Dual-modality Prompt Tuning (DPT) for open_clip CLIP models.

>>> from dpt_fast import DPT, DPTConfig, DPTOutput          # fast model
>>> from dpt_fast.reference import DPT as ReferenceDPT      # pure-PyTorch oracle

``DPT`` and ``DPTOutput`` are imported on first use: ``import dpt_fast`` (and the ``dpt-fast``
command's help and argument checks) do not pay for importing torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpt_fast.config import DPTConfig

if TYPE_CHECKING:
    from dpt_fast.model import DPT
    from dpt_fast.output import DPTOutput

__all__ = ["DPT", "DPTConfig", "DPTOutput"]
__version__ = "0.1.0"

_LAZY = {"DPT": "dpt_fast.model", "DPTOutput": "dpt_fast.output"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dpt_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
