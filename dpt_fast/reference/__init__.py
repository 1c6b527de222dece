"""The pure-PyTorch oracles: ``from dpt_fast.reference import DPT, CoCoOp``."""

from dpt_fast.cocoop.config import CoCoOpConfig
from dpt_fast.config import DPTConfig
from dpt_fast.output import DPTOutput
from dpt_fast.reference.cocoop import CoCoOp
from dpt_fast.reference.model import DPT

__all__ = ["DPT", "CoCoOp", "CoCoOpConfig", "DPTConfig", "DPTOutput"]
