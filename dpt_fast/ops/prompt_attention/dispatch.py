"""Which backend runs a prompt attention call: the fused Triton kernels or the PyTorch path.

* ``triton``: the default for CUDA tensors the kernels take (``capabilities.TRITON_KERNELS``)
  when triton is installed.
* ``torch``: everything else, CPU tensors included.

``DPT_FAST_BACKEND=triton|torch`` (read at every call) forces one. ``triton`` on CPU tensors runs
the kernels in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before anything
imports triton (Triton picks interpreter or compiler when a ``@triton.jit`` function is defined).
Nothing here imports triton.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from dpt_fast.ops.prompt_attention.capabilities import TRITON_KERNELS

BACKENDS = ("triton", "torch")
BACKEND_ENV = "DPT_FAST_BACKEND"


def _find_triton() -> bool:
    """Whether ``import triton`` can succeed, found without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or half-imported triton counts as missing
        return False


# Looked up once, at import: a plain constant is what torch.compile traces best.
_TRITON_INSTALLED = _find_triton()


def triton_installed() -> bool:
    """Whether triton is installed (as seen when dpt_fast was imported)."""
    return _TRITON_INSTALLED


def backend(q: Tensor) -> str:
    """"triton" or "torch" for a call with these (already common-dtype) queries."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
    if forced == "torch":
        return "torch"
    device = q.device.type
    if forced == "triton":
        _check_forced_triton(q)
        return "triton"
    if device == "cuda" and triton_installed():
        if TRITON_KERNELS.unsupported(q.dtype, q.shape[-1], interpreted=False) is None:
            return "triton"
    return "torch"


def _check_forced_triton(q: Tensor) -> None:
    """Raises with the fix when DPT_FAST_BACKEND=triton cannot run these inputs."""
    if not triton_installed():
        raise RuntimeError(f"{BACKEND_ENV}=triton needs triton: `pip install triton` (or "
                           f"`pip install dpt_fast[triton]`)")
    device = q.device.type
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{BACKEND_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton "
            f"is imported) to run the Triton kernels on CPU through the slow interpreter; got "
            f"{device} tensors"
        )
    if device not in ("cpu", "cuda"):
        raise RuntimeError(f"{BACKEND_ENV}=triton: the Triton kernels run on CUDA (or CPU through "
                           f"the interpreter), not on {device}")
    reason = TRITON_KERNELS.unsupported(q.dtype, q.shape[-1], interpreted=device == "cpu")
    if reason is not None:
        raise ValueError(f"{BACKEND_ENV}=triton: {reason}")
