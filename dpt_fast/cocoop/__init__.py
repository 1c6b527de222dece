"""CoCoOp (Zhou et al., CVPR 2022): prompts conditioned on each image by a meta-net.

``from dpt_fast import CoCoOp`` (fast) and ``from dpt_fast.reference import CoCoOp`` (the
authors' computation, the oracle) share :class:`CoCoOpConfig`, the prompt learner and the
state_dict. Modules: ``config`` (defaults), ``prompts`` (ctx + meta-net), ``base`` (what both
share), ``text`` (the fast text pass), ``model`` (fast), ``official`` (the authors' checkpoints).
"""

from dpt_fast.cocoop.config import CoCoOpConfig

__all__ = ["CoCoOpConfig"]
