"""Class-aware attention of DPT's CAVPT module: ``softmax(q kᵀ · scale) · v``.

Shapes: q (B, K, dk) holds the K class-aware queries, k (B, M, dk) and v (B, M, dv) the M tokens
they attend over; the result is (B, K, dv).

``class_aware_attention`` runs the fused C++/CUDA kernels of ``dpt_fast._C``
(``torch.ops.dpt_fast.class_aware_attention`` and ``..._backward``) when the extension is loaded
and has a kernel for the tensors' device, and an equivalent PyTorch composition otherwise. Both
accumulate in float32 (float64 for float64 inputs). ``class_aware_attention_ref`` is the plain
composition in the inputs' own dtype, the test oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpt_fast.ops import _extension
from dpt_fast.ops._common import default_scale, lse_dtype, to_common_dtype

_FORWARD_OP = "dpt_fast::class_aware_attention"
_BACKWARD_OP = "dpt_fast::class_aware_attention_backward"


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

    On CUDA, float32 inputs that the fused kernels do not take (K > 16, dv not a multiple of 4,
    or storage not 16-byte aligned) run their matrix products through cuBLAS, which follows
    PyTorch's float32 matmul precision: under ``torch.backends.cuda.matmul.allow_tf32 = True``
    (or ``torch.set_float32_matmul_precision("high")``) those use TF32, as the composition does.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    q, k, v = to_common_dtype(q, k, v)
    if _has_fused_kernel(q):
        return torch.ops.dpt_fast.class_aware_attention(q, k, v, scale)[0]
    return _composition(q, k, v, scale)


def class_aware_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None
) -> Tensor:
    """Plain PyTorch ``softmax(q kᵀ · scale) · v`` in the inputs' dtype: the test oracle.

    q (B, K, dk), k (B, M, dk), v (B, M, dv) -> (B, K, dv). Run it on float64 copies for the
    exact answer, or on low-precision inputs for PyTorch's own rounding error.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v






# --- the CPU kernels' block cache (csrc/result_cache.h) --------------------------------------
# The CPU kernels take their own buffers of 4 MiB and up (results such as dv, dk, dq and out; the
# float32 copies of low-precision inputs; the score and product temporaries) from a small
# process-wide block cache, to which the memory returns when those tensors are freed. Reusing it
# spares the page faults and zero-filling of fresh memory (at B=256 most of the time of the Pᵀ·dO
# product). The cache keeps at most a limit's worth of unused blocks (1 GiB by default). Without
# the extension nothing is cached: the functions below then report 0 and change nothing.


def cpu_block_cache_bytes() -> int:
    """Bytes of unused memory the CPU kernels' block cache holds now."""
    if not _extension.extension_available():
        return 0
    return int(_extension.extension_module()._cpu_cache_bytes())


def cpu_block_cache_limit() -> int:
    """Most bytes of unused memory the block cache keeps (1 GiB unless set)."""
    if not _extension.extension_available():
        return 0
    return int(_extension.extension_module()._cpu_cache_limit())


def set_cpu_block_cache_limit(max_bytes: int) -> None:
    """Sets the block cache's limit in bytes (0 turns caching off) and frees blocks above it."""
    if max_bytes < 0:
        raise ValueError(f"set_cpu_block_cache_limit: max_bytes must be >= 0, got {max_bytes}")
    if _extension.extension_available():
        _extension.extension_module()._set_cpu_cache_limit(int(max_bytes))


def empty_cpu_block_cache() -> None:
    """Frees every unused block the cache holds, as ``torch.cuda.empty_cache`` does on a GPU.

    Blocks that tensors still hold return to the cache when those tensors are freed.
    """
    if _extension.extension_available():
        _extension.extension_module()._release_cpu_cache()


def _has_fused_kernel(q: Tensor) -> bool:
    """Whether torch.ops.dpt_fast has a kernel for q's device in this build."""
    if not _extension.extension_available():
        return False
    device_type = q.device.type
    return device_type == "cpu" or (device_type == "cuda" and _extension.cuda_kernels_available())


def _composition(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Fallback without the extension: the composition, accumulated in float32 (or float64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(acc)).to(q.dtype)




# --- registrations on the C++ ops: fake kernels (torch.compile, meta tensors) and autograd -----


def _fake_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Shapes of the forward op's results: out (B, K, dv) in q's dtype, lse (B, K)."""
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "q, k, v must be 3-D")
    batch, rows = q.shape[0], q.shape[1]
    out = q.new_empty((batch, rows, v.shape[2]))
    lse = q.new_empty((batch, rows), dtype=lse_dtype(q.dtype))
    return out, lse


def _fake_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of the backward op's results: contiguous gradients shaped like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale = inputs
    out, lse = output
    # lse is a by-product saved for backward; no gradient flows through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.dpt_fast.class_aware_attention_backward(
        grad_out.to(out.dtype), q, k, v, out, lse, ctx.scale
    )
    return grad_q, grad_k, grad_v, None


def _register() -> None:
    """Attaches the fake kernels and the autograd formula to the C++ ops (once, at import)."""
    torch.library.register_fake(_FORWARD_OP)(_fake_forward)
    torch.library.register_fake(_BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(_FORWARD_OP, _backward, setup_context=_setup_context)


if _extension.extension_available():
    _register()
