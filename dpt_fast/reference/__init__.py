"""The pure-PyTorch oracle: ``from dpt_fast.reference import DPT``."""

from dpt_fast.config import DPTConfig
from dpt_fast.output import DPTOutput
from dpt_fast.reference.model import DPT

__all__ = ["DPT", "DPTConfig", "DPTOutput"]
