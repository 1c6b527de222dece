"""dpt_fast: fast, exact Dual-modality Prompt Tuning (DPT) for open_clip CLIP models.

>>> from dpt_fast import DPT, DPTConfig, DPTOutput          # fast model
>>> from dpt_fast.reference import DPT as ReferenceDPT      # pure-PyTorch oracle
>>> from dpt_fast import CoCoOp, CoCoOpConfig               # fast CoCoOp (same conventions)

``import dpt_fast`` registers the ops under ``torch.ops.dpt_fast`` (the compiled extension's
``class_aware_attention`` / ``_backward``, and the ``prompt_attention_fwd`` / ``_bwd`` custom
ops, whose Triton kernels load when first chosen), as ``import torchvision`` does for
``torch.ops.torchvision``. ``DPT`` and ``DPTOutput`` (and open_clip) are imported on first use.

The one exception is the ``dpt-fast`` command (``python -m dpt_fast`` too): its help and
argument checks must answer at once, so the package does not import torch there; the command
imports the ops with the model when it runs one.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from typing import TYPE_CHECKING, Any

from dpt_fast.config import DPTConfig

if TYPE_CHECKING:
    from dpt_fast.cocoop.config import CoCoOpConfig
    from dpt_fast.cocoop.model import CoCoOp
    from dpt_fast.model import DPT
    from dpt_fast.output import DPTOutput

__all__ = ["DPT", "CoCoOp", "CoCoOpConfig", "DPTConfig", "DPTOutput"]
__version__ = "0.1.0"

_LAZY = {"DPT": "dpt_fast.model", "DPTOutput": "dpt_fast.output",
         "CoCoOp": "dpt_fast.cocoop.model", "CoCoOpConfig": "dpt_fast.cocoop.config"}


def _launched_as_command() -> bool:
    """Whether this process is the ``dpt-fast`` command (its console script, or ``python -m
    dpt_fast``), which imports the package before it knows whether torch is needed."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script in ("dpt-fast", "dpt-fast.exe"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b in ("dpt_fast", "dpt_fast.cli", "dpt_fast.linear_probe")
               for a, b in itertools.pairwise(argv))


if not _launched_as_command():
    importlib.import_module("dpt_fast.ops")  # registers torch.ops.dpt_fast.*


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dpt_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
