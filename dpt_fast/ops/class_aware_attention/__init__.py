"""Class-aware attention (DPT's CAVPT): ``softmax(q kᵀ · scale) · v`` over each image's tokens.

* ``api.py``: ``class_aware_attention``, the public function, its dispatch and PyTorch path;
* ``custom_op.py``: fake implementations and autograd of the C++ ops ``torch.ops.dpt_fast.
  class_aware_attention`` / ``_backward``;
* ``reference.py``: the formula, ``class_aware_attention_ref`` (the test oracle);
* ``capabilities.py``: what the C++/CUDA kernels take (checked against ``csrc/``).

The kernels themselves live in ``csrc/class_aware_attention*``.
"""

from dpt_fast.ops.class_aware_attention.api import class_aware_attention
from dpt_fast.ops.class_aware_attention.capabilities import CLASS_AWARE_ATTENTION
from dpt_fast.ops.class_aware_attention.reference import class_aware_attention_ref

__all__ = ["CLASS_AWARE_ATTENTION", "class_aware_attention", "class_aware_attention_ref"]
