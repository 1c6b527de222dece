"""The project's CUDA kernels compiled as C++ and run on the CPU (docs/cuda-emulation.md).

``load()`` compiles ``csrc/cuda_emulation/*.cpp`` (which include the very ``.cu`` files nvcc
compiles) with ``torch.utils.cpp_extension.load`` and ninja, in a build folder named by a hash
of the sources' content, so an edit of a ``.cu``/``.cuh`` file is what the next run executes and
an unchanged tree is not rebuilt. The library registers ``torch.ops.dpt_fast_emulated.*``: the
CUDA op's host code (grid, block and shared-memory sizes, path choice) on CPU tensors, launching
the kernels into the emulator; the general path's cuBLAS products run as ATen CPU products.

``DPT_FAST_CUDA_EMULATION_SOURCES`` points the build at another copy of ``csrc`` (the mutation
check's mutants); ``DPT_FAST_CUDA_EMULATION_CACHE`` moves the build cache;
``DPT_FAST_CUDA_EMULATION_BUILD`` names one build folder to reuse whatever the sources' content
(ninja then recompiles only the files a change touched: the mutation check's mutants).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "dpt_fast_emulated"
# Every kernel of the CUDA sources: the test suite checks that each one ran.
KERNELS = (
    "caa_softmax_lse_kernel",
    "caa_pv_kernel",
    "caa_row_dot_kernel",
    "caa_backward_fused_kernel",
    "caa_dq_reduce_kernel",
    "caa_softmax_grad_kernel",
)
# -O1: the emulation's speed is the fibers' switching more than the kernels' arithmetic, and -O2
# took longer to compile for no gain in the test run.
# -fsanitize=bounds: indices of local arrays (the kernels' registers) checked too; its handler
# is the emulation's (runtime.cpp), so no sanitizer runtime is linked.
CFLAGS = ["-O1", "-std=c++20", "-DDPT_FAST_CUDA_EMULATION", "-Wno-unknown-pragmas",
          "-fvisibility=hidden", "-fsanitize=bounds"]
EMULATION_SOURCES = ("forward.cpp", "backward.cpp", "runtime.cpp", "selftest.cpp")


def source_dir() -> Path:
    """The ``csrc`` folder to build from."""
    return Path(os.environ.get("DPT_FAST_CUDA_EMULATION_SOURCES", ROOT / "csrc")).resolve()


def _digest(csrc: Path) -> str:
    """Hash of every file the build reads from ``csrc``, the flags and the torch version."""
    h = hashlib.sha256()
    files = sorted(p for p in csrc.rglob("*") if p.is_file()
                   and p.suffix in {".cu", ".cuh", ".h", ".cpp"})
    for path in files:
        h.update(str(path.relative_to(csrc)).encode())
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpt_fast"
    return Path(os.environ.get("DPT_FAST_CUDA_EMULATION_CACHE", default / "cuda_emulation"))


@functools.cache
def load() -> ctypes.CDLL:
    """Builds (or reuses) and loads the emulated kernels; returns the library for its C API."""
    from torch.utils import cpp_extension

    csrc = source_dir()
    emulation = csrc / "cuda_emulation"
    fixed = os.environ.get("DPT_FAST_CUDA_EMULATION_BUILD")
    if fixed:  # one folder for many versions of the sources: ninja rebuilds what changed
        name, build = "dpt_fast_cuda_emulation", Path(fixed)
    else:
        name = f"dpt_fast_cuda_emulation_{_digest(csrc)}"
        build = _cache_root() / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(emulation / s) for s in EMULATION_SOURCES],
        extra_cflags=[*CFLAGS, "-include", str(emulation / "cuda_emulation.h")],
        extra_include_paths=[str(emulation / "include"), str(csrc)],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    lib = ctypes.CDLL(str(build / f"{name}.so"))
    lib.cuda_emu_set_schedule.argtypes = [ctypes.c_uint64]
    lib.cuda_emu_set_timeout.argtypes = [ctypes.c_double]
    lib.cuda_emu_kernels_run.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.cuda_emu_kernels_run.restype = ctypes.c_size_t
    lib.cuda_emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p,
                                      ctypes.c_size_t]
    return lib


def set_schedule(seed: int) -> None:
    """Thread order of later launches: 0 runs runnable threads in index order, any other seed
    permutes them at every barrier and shuffle (and permutes the blocks)."""
    load().cuda_emu_set_schedule(seed)


def set_timeout(seconds: float) -> None:
    """Wall-clock limit of one launch (the backstop of the deadlock detection)."""
    load().cuda_emu_set_timeout(seconds)


def kernels_run() -> set[str]:
    """Names of the kernels launched since the library was loaded."""
    lib = load()
    size = lib.cuda_emu_kernels_run(None, 0) + 1
    buf = ctypes.create_string_buffer(size)
    lib.cuda_emu_kernels_run(buf, size)
    return set(filter(None, buf.value.decode().split(",")))


def selftest(which: int, data: torch.Tensor) -> str | None:
    """Runs self-test kernel ``which`` (csrc/cuda_emulation/selftest.cpp) on 64 floats of
    ``data``; returns the emulation's error message, or None."""
    assert data.dtype == torch.float32 and data.numel() == 64 and data.is_contiguous()
    err = ctypes.create_string_buffer(4096)
    failed = load().cuda_emu_selftest(which, data.data_ptr(), err, len(err))
    return err.value.decode() if failed else None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """The CUDA forward op (host code and kernels) on CPU tensors: (out, lse)."""
    load()
    return getattr(torch.ops, NAMESPACE).class_aware_attention(q, k, v, scale)


def backward(grad_out, q, k, v, out, lse, scale: float):
    """The CUDA backward op on CPU tensors: (grad_q, grad_k, grad_v)."""
    load()
    return getattr(torch.ops, NAMESPACE).class_aware_attention_backward(
        grad_out, q, k, v, out, lse, scale)


if __name__ == "__main__":  # python tests/cuda_emulation.py: build only, print the library
    load()
    print(f"built from {source_dir()}", file=sys.stderr)
