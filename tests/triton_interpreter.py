"""Whether Triton's interpreter can run kernel loops here: the guard of every interpreter test.

triton 3.6's interpreter turns a runtime loop bound into an int with ``int(array)``, which recent
NumPy (2.4 at least) rejects for 1-element arrays (3.8 squeezes first), so every kernel loop
fails; without NumPy there is no interpreter at all. The GPU image pairs triton 3.6 with NumPy
2.4, so CPU runs of the test suite with its versions meet this condition.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def _probe_kernel(X, n):
    for i in range(0, n, 1):
        tl.store(X + i, i)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None."""
    x = torch.zeros(2, dtype=torch.int32)
    try:
        from triton.runtime.interpreter import InterpretedFunction  # needs numpy

        InterpretedFunction(_probe_kernel)[(1,)](x, 2)
    except Exception as e:
        return f"triton {triton.__version__}'s interpreter cannot run loops here: {e}"
    return None
