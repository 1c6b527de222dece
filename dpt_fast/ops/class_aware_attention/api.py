"""``class_aware_attention``: DPT's CAVPT attention ``softmax(q kᵀ · scale) · v``.

Shapes: q (B, K, dk) holds the K class-aware queries, k (B, M, dk) and v (B, M, dv) the M tokens
they attend over; the result is (B, K, dv).

The call runs the fused C++/CUDA kernels of ``dpt_fast._C`` (``torch.ops.dpt_fast.
class_aware_attention`` and ``..._backward``) when the extension is loaded and has a kernel for
the tensors' device, and the PyTorch path otherwise: the reference formula on inputs widened to
float32 (float64 stays), differentiated by autograd. Both accumulate in float32 (float64 for
float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops import _extension
from dpt_fast.ops._common import default_scale, to_common_dtype
from dpt_fast.ops.class_aware_attention import custom_op  # noqa: F401  (registers the ops)
from dpt_fast.ops.class_aware_attention.capabilities import CLASS_AWARE_ATTENTION
from dpt_fast.ops.class_aware_attention.reference import class_aware_attention_ref


def class_aware_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale, dim=-1) · v`` with fused kernels, differentiable in q, k and v.

    Args:
        q: (B, K, dk) queries.
        k: (B, M, dk) keys, M >= 1.
        v: (B, M, dv) values.
        scale: score scale; defaults to ``1 / sqrt(dk)``.

    Returns:
        (B, K, dv) in the common dtype of the inputs.

    Mixed dtypes are cast to one common dtype first, since the kernels take a single dtype:
    under autocast for the inputs' device, the autocast dtype (as ``torch.bmm`` does; float64
    inputs are left alone, as autocast leaves them); otherwise ``torch.promote_types`` of the
    three (e.g. bfloat16 with float32 gives float32). The result has that dtype.

    On CUDA, inputs the fused kernels do not take (see ``CLASS_AWARE_ATTENTION``: float64, dv
    not a multiple of the vector width, misaligned storage, and in the backward pass K above
    the row tile) run their matrix products through cuBLAS, which follows PyTorch's float32
    matmul precision: under ``torch.backends.cuda.matmul.allow_tf32 = True`` (or
    ``torch.set_float32_matmul_precision("high")``) those use TF32, as the composition does.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    q, k, v = to_common_dtype(q, k, v)
    if q.dtype not in CLASS_AWARE_ATTENTION.dtypes:
        raise ValueError(f"class_aware_attention takes {CLASS_AWARE_ATTENTION.dtype_names()} "
                         f"tensors, got {q.dtype}; cast the inputs first")
    if has_fused_kernel(q):
        return torch.ops.dpt_fast.class_aware_attention(q, k, v, scale)[0]
    return _torch_path(q, k, v, scale)


def has_fused_kernel(q: Tensor) -> bool:
    """Whether torch.ops.dpt_fast has a kernel for q's device in this build."""
    if not _extension.extension_available():
        return False
    device_type = q.device.type
    return device_type == "cpu" or (device_type == "cuda" and _extension.cuda_kernels_available())


def _torch_path(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The reference formula accumulated in float32 (float64 stays), cast back to q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    return class_aware_attention_ref(q.to(acc), k.to(acc), v.to(acc), scale).to(q.dtype)
