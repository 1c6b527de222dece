"""Prompt attention: queries attend to prompt keys/values and to their own sequence's.

* ``api.py``: ``prompt_attention``, the public function;
* ``dispatch.py``: which backend runs a call (Triton kernels or PyTorch);
* ``custom_op.py``: ``torch.ops.dpt_fast.prompt_attention_fwd`` / ``_bwd`` (fake, autograd);
* ``torch_path.py``: ``prompt_attention_torch``, SDPA over the concatenated keys/values;
* ``reference.py``: the formula, ``prompt_attention_ref`` (the float64 test oracle);
* ``capabilities.py``: the shape contract and what the Triton kernels take.

The Triton kernels themselves live in ``dpt_fast.kernels.prompt_attention``.
"""

from dpt_fast.ops.prompt_attention.api import prompt_attention
from dpt_fast.ops.prompt_attention.capabilities import TRITON_KERNELS
from dpt_fast.ops.prompt_attention.reference import prompt_attention_ref
from dpt_fast.ops.prompt_attention.torch_path import prompt_attention_torch

__all__ = ["TRITON_KERNELS", "prompt_attention", "prompt_attention_ref", "prompt_attention_torch"]
