"""Loads the compiled extension ``dpt_fast._C`` once and reports what it provides.

Importing ``dpt_fast._C`` registers the C++/CUDA ops under ``torch.ops.dpt_fast``. When the import
fails (the package was installed without compiling it, or against another torch), a single
``RuntimeWarning`` says why and how to fix it, and the ops fall back to PyTorch code.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_FIX = (
    "reinstall dpt_fast so the extension is compiled against the installed torch: "
    "`pip install --no-build-isolation .` from the source folder (needs a C++ compiler; add the "
    "CUDA toolkit for the GPU kernels)"
)


def _load() -> tuple[ModuleType | None, str | None]:
    """Imports ``dpt_fast._C``; returns (module, None) or (None, reason) and warns on failure."""
    try:
        module = importlib.import_module("dpt_fast._C")
    except (ImportError, OSError) as exc:  # missing file, ABI mismatch, undefined symbol
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"dpt_fast: the compiled extension dpt_fast._C could not be loaded ({reason}); the ops "
            f"fall back to slower PyTorch code. To fix it, {_FIX}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, reason
    return module, None


# Runs once, at first import of this module: Python caches modules, so the warning shows once.
_MODULE, _LOAD_ERROR = _load()
# Plain constants, so torch.compile traces the availability checks without calling into C++.
_HAS_CUDA_KERNELS = _MODULE is not None and bool(_MODULE.has_cuda())


def extension_available() -> bool:
    """Whether ``dpt_fast._C`` loaded, i.e. ``torch.ops.dpt_fast`` holds the C++ CPU kernels."""
    return _MODULE is not None


def cuda_kernels_available() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    return _HAS_CUDA_KERNELS


def extension_module() -> ModuleType:
    """The loaded ``dpt_fast._C`` module; raises RuntimeError (with the load error) without it."""
    if _MODULE is None:
        raise RuntimeError(f"dpt_fast._C is not loaded ({_LOAD_ERROR}); to fix it, {_FIX}")
    return _MODULE


def load_error() -> str | None:
    """Why ``dpt_fast._C`` failed to load (exception type and message), or None if it loaded."""
    return _LOAD_ERROR
