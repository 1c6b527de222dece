"""Compile-check CUDA sources with nvcc for one architecture, with torch's headers.

Usage: python .ci/nvcc_check.py --arch sm_90 [sources...]; without sources, every .cu file under
csrc/. Finds the real toolkit behind a wrapper `nvcc` the same way setup.py does.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("sources", nargs="*")
    args = parser.parse_args()
    sources = args.sources or sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources:
        print("no .cu files given or found under csrc/", file=sys.stderr)
        return 1

    # setup.py only builds under __main__: importing it gives its CUDA_HOME detection.
    spec = importlib.util.spec_from_file_location("dpt_setup", "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)
    cuda_home = setup_module.detect_cuda_home()
    if not cuda_home:
        print("nvcc found but no CUDA toolkit folder could be derived from it", file=sys.stderr)
        return 1
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import include_paths

    try:
        includes = include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = include_paths(cuda=True)
    includes.append(sysconfig.get_paths()["include"])
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    code = args.arch.replace("sm_", "")
    failed = 0
    with tempfile.TemporaryDirectory() as out:
        for source in sources:
            cmd = [nvcc, "-std=c++20", "-O2", f"-gencode=arch=compute_{code},code={args.arch}",
                   "-DTORCH_EXTENSION_NAME=_C", "-DDPT_FAST_WITH_CUDA",
                   "-DTORCH_API_INCLUDE_EXTENSION_H",
                   "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                   *[f"-I{p}" for p in includes], "-c", source,
                   "-o", os.path.join(out, os.path.basename(source) + ".o")]
            result = subprocess.run(cmd, capture_output=True, text=True)
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"nvcc {args.arch} {source}: {status}")
            if result.returncode:
                failed += 1
                print(result.stdout + result.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
