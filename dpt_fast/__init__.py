"""dpt_fast: fast, exact Dual-modality Prompt Tuning (DPT) for open_clip CLIP models.

>>> from dpt_fast import DPT, DPTConfig, DPTOutput          # fast model
>>> from dpt_fast.reference import DPT as ReferenceDPT      # pure-PyTorch oracle
"""

from dpt_fast.config import DPTConfig
from dpt_fast.model import DPT
from dpt_fast.output import DPTOutput

__all__ = ["DPT", "DPTConfig", "DPTOutput"]
__version__ = "0.1.0"
