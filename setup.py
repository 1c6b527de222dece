"""Build script for dpt_fast and its extension ``dpt_fast._C``.

The extension always contains the C++ CPU kernels. The CUDA kernels are added when the installed
torch is a CUDA build and nvcc is found. Environment switches:

* ``DPT_FAST_CUDA``: ``auto`` (default) builds CUDA when possible, ``1`` requires it (the build
  fails with a reason when it cannot), ``0`` skips it.
* ``TORCH_CUDA_ARCH_LIST``: architectures to compile for; default ``8.0;9.0`` (A100, H100/H200).
* ``DPT_FAST_SKIP_EXT=1``: install the pure-Python package only (the ops fall back to PyTorch).
* ``CUDA_HOME``: the toolkit folder; detected from ``nvcc`` when unset, following wrapper scripts.

Install with ``pip install -e .`` (or ``pip install .``): the extension is compiled against the
torch already in the environment, which the project's build backend
(``build_backend/dpt_fast_backend.py``) makes importable inside pip's isolated build;
``--no-build-isolation`` works too.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"[dpt_fast setup] {msg}", file=sys.stderr)


def detect_cuda_home() -> str | None:
    """The CUDA toolkit folder that holds the real nvcc, or None.

    ``nvcc`` on PATH may be a wrapper script in another folder (e.g. /usr/local/bin/nvcc that
    execs the toolkit's nvcc); torch would then guess the wrong CUDA_HOME. nvcc's ``--dryrun``
    prints its own ``TOP`` folder, which is the toolkit root whatever wrapper called it.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            probe = subprocess.run(
                [nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(\S+)", probe.stdout + probe.stderr, re.MULTILINE)
    top = os.path.realpath(match.group(1)) if match else os.path.dirname(os.path.dirname(nvcc))
    # A real toolkit folder has the runtime headers, not just a bin/ with a wrapper in it.
    return top if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")) else None


def _compiler_is_gcc() -> bool:
    """Whether the C++ compiler the build will use ($CXX, else c++) is GCC, not Clang."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = version.stdout.lower()  # GCC's banner always names the Free Software Foundation
    return version.returncode == 0 and "clang" not in text and "free software" in text


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("DPT_FAST_SKIP_EXT", "0") == "1":
        _log("DPT_FAST_SKIP_EXT=1: building without dpt_fast._C")
        return [], {}

    want_cuda = os.environ.get("DPT_FAST_CUDA", "auto").lower()
    if want_cuda not in {"auto", "0", "1"}:
        raise SystemExit(f"DPT_FAST_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    cuda_home = detect_cuda_home() if want_cuda != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(cuda_sources)
    if want_cuda == "1" and not with_cuda:
        raise SystemExit(
            "DPT_FAST_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home}. Install a CUDA "
            "build of torch and the CUDA toolkit (nvcc), or set CUDA_HOME."
        )

    cxx_flags = ["-O3", "-std=c++20"]
    link_flags: list[str] = []
    if (sys.platform.startswith("linux") and torch.backends.openmp.is_available()
            and _compiler_is_gcc()):
        # at::parallel_for is a header template that gets its threads from `omp parallel`:
        # compiled without OpenMP it silently runs the CPU kernels on one thread. With GCC the
        # extension links libgomp.so.1, the runtime Linux torch builds use and have already
        # loaded: one thread pool, sized by torch.set_num_threads. (Clang's -fopenmp would load
        # LLVM's libomp beside it, a second pool that ignores torch's thread count.)
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    elif sys.platform != "win32":
        # The row loops run on one thread, but their `omp simd` loops still vectorise (no OpenMP
        # runtime involved).
        _log("CPU kernels without OpenMP: their row loops run on one thread")
        cxx_flags.append("-fopenmp-simd")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
             f"archs={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = CUDAExtension(
            "dpt_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("DPT_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        _log("building CPU kernels only (no CUDA toolkit or CPU-only torch)")
        ext = CppExtension(
            "dpt_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


# Guarded so that tools (.ci/nvcc_check.py) can import detect_cuda_home without building.
if __name__ == "__main__":
    ext_modules, cmdclass = extension_modules()

    setup(
        packages=[*find_packages(include=["dpt_fast", "dpt_fast.*"]), "dpt_fast.kernels"],
        # Triton kernels live in the top-level kernels/ folder and install as dpt_fast.kernels,
        # never as a top-level "kernels" package.
        package_dir={"dpt_fast.kernels": "kernels"},
        # The toy CLIP of `dpt-fast demo` ships inside the package (weights, config, card).
        package_data={"dpt_fast.toy": ["*.md"], "dpt_fast.toy_clip": ["*.safetensors", "*.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
