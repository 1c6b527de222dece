"""Compile the extension's CUDA sources exactly as its build does, report each kernel's resources.

Usage: python .ci/nvcc_check.py [--archs "8.0;9.0"] [SOURCE.cu ...]

Without sources it compiles the CUDA sources of setup.py's own ``extension_modules()`` and first
checks that they are every ``.cu`` file under ``csrc/`` (a CUDA file that the build leaves out
would go unchecked). With sources (e.g. a test file) those are compiled instead, with the same
flags.

Same flags as the build: the extension object comes from ``extension_modules()`` (its nvcc
arguments and defines) and is compiled by torch's own ``BuildExtension`` (torch's
``-D__CUDA_NO_HALF_*`` defines, ``--expt-relaxed-constexpr``, the arch flags of
``TORCH_CUDA_ARCH_LIST``, the extension-name and ABI defines), in a temporary folder, with
``-Xptxas -v`` added through nvcc's own ``NVCC_APPEND_FLAGS``. The build's nvcc command line is
printed, then one row per kernel and architecture: registers, spill stores / loads, stack frame
and static shared memory (dynamic shared memory is sized at launch and is not in ptxas' report).

Exit status 1 when a source does not compile, when ptxas reports nothing, or when any kernel
spills: every kernel in the extension is one its ops launch at the model's shapes (the templates
are instantiated by the dispatch that launches them), so none is allowed to spill.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class KernelResources:
    """What ptxas reports for one compiled function on one architecture."""

    name: str  # mangled
    arch: str
    entry: bool = True  # a __global__ kernel (False: a device function that was not inlined)
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[KernelResources]:
    """Kernels and non-inlined device functions of ``ptxas -v`` output, in order."""
    kernels: list[KernelResources] = []
    current: KernelResources | None = None  # the entry function being compiled
    properties_of: KernelResources | None = None  # whose "Function properties" come next
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = KernelResources(match.group(1), match.group(2))
            kernels.append(current)
        elif match := _PROPERTIES.search(line):
            name = match.group(1)
            if current is not None and current.name == name:
                properties_of = current
            else:  # a called device function: its frame and spills count like a kernel's
                arch = current.arch if current is not None else "?"
                properties_of = KernelResources(name, arch, entry=False)
                kernels.append(properties_of)
        elif (match := _FRAME.search(line)) and properties_of is not None:
            properties_of.stack, properties_of.spill_stores, properties_of.spill_loads = (
                int(g) for g in match.groups())
            properties_of = None
        elif (match := _USED.search(line)) and current is not None:
            current.registers = int(match.group(1))
            if smem := _SMEM.search(line):
                current.smem = int(smem.group(1))
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    """Readable names without argument lists (c++filt when present, else the mangled ones)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    readable = result.stdout.splitlines()
    if result.returncode or len(readable) != len(names):
        return {n: n for n in names}
    return {mangled: _without_arguments(name)
            for mangled, name in zip(names, readable, strict=True)}


def _without_arguments(name: str) -> str:
    """``void ns::(anonymous namespace)::f<float, 8>(float*, int)`` -> ``ns::f<float, 8>``."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(name):
        depth += char == "<"
        depth -= char == ">"
        if char == "(" and depth == 0:
            return name[:i]
    return name


def _load_setup() -> ModuleType:
    # setup.py only builds under __main__: importing it gives extension_modules() and the
    # CUDA_HOME detection without building anything.
    spec = importlib.util.spec_from_file_location("dpt_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_cuda_sources() -> list[str]:
    """The .cu sources of the extension as setup.py declares it (CUDA build forced on)."""
    os.environ["DPT_FAST_CUDA"] = "1"
    ext_modules, _ = _load_setup().extension_modules()
    return [s for ext in ext_modules for s in ext.sources if s.endswith(".cu")]


def compile_sources(sources: list[str], build_dir: str) -> None:
    """Child process: compile ``sources`` through the extension's own build (ptxas -v on).

    Its output (ninja's command lines, nvcc's and ptxas' messages) is what the parent parses.
    """
    os.environ["DPT_FAST_CUDA"] = "1"
    ext_modules, cmdclass = _load_setup().extension_modules()
    (ext,) = ext_modules
    ext.sources = sources
    from setuptools import Distribution

    dist = Distribution({"name": "dpt_fast_nvcc_check", "ext_modules": [ext],
                         "cmdclass": cmdclass})
    build = dist.get_command_obj("build_ext")
    build.build_temp = os.path.join(build_dir, "temp")
    build.build_lib = os.path.join(build_dir, "lib")
    build.ensure_finalized()
    build.run()


def _table(kernels: list[KernelResources], source: str) -> list[str]:
    names = demangle(sorted({k.name for k in kernels}))
    width = max([len(names[k.name]) for k in kernels] + [6])
    rows = [f"{'kernel':<{width}}  arch    regs  spill st  spill ld  stack  smem  ({source})"]
    for k in kernels:
        label = names[k.name] + ("" if k.entry else " [device fn]")
        regs = str(k.registers) if k.entry else "-"
        smem = str(k.smem) if k.entry else "-"
        flag = "  <-- SPILLS" if k.spill_stores else ""
        rows.append(f"{label:<{width}}  {k.arch:<6}  {regs:>4}  {k.spill_stores:>8}  "
                    f"{k.spill_loads:>8}  {k.stack:>5}  {smem:>4}{flag}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=None,
                        help="TORCH_CUDA_ARCH_LIST for the check (default: the build's, "
                             "TORCH_CUDA_ARCH_LIST or setup.py's DEFAULT_CUDA_ARCHS)")
    parser.add_argument("--compile-into", default=None, help=argparse.SUPPRESS)
    parser.add_argument("sources", nargs="*")
    args = parser.parse_args()
    os.chdir(ROOT)  # setup.py's source paths are relative to the project root

    if args.compile_into:
        compile_sources(args.sources, args.compile_into)
        return 0

    setup_module = _load_setup()
    archs = args.archs or os.environ.get("TORCH_CUDA_ARCH_LIST") or setup_module.DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    declared = extension_cuda_sources()
    if args.sources:
        # Inside the project: relative to its root, as setup.py names its own sources.
        sources = [os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
                   for path in map(os.path.abspath, args.sources)]
    else:
        on_disk = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        left_out = sorted(set(on_disk) - set(declared))
        if left_out:
            print(f"CUDA sources under csrc/ that the extension build leaves out: {left_out}; "
                  "add them to setup.py's extension_modules() or delete them", file=sys.stderr)
            return 1
        sources = declared
    if not sources:
        print("no CUDA sources to check", file=sys.stderr)
        return 1

    env = dict(os.environ,
               NVCC_APPEND_FLAGS=(os.environ.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip())
    failed = False
    for source in sources:
        with tempfile.TemporaryDirectory() as build_dir:
            compiled = source
            if os.path.isabs(source):
                # Outside the project: compiled from a copy in the temporary folder, so that
                # its object file (named after the source path) lands there too.
                compiled = os.path.join(build_dir, "src", os.path.basename(source))
                os.makedirs(os.path.dirname(compiled))
                shutil.copy(source, compiled)
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--compile-into", build_dir,
                 compiled], env=env, capture_output=True, text=True, cwd=ROOT)
        log = result.stdout + result.stderr
        commands = [line for line in log.splitlines() if "nvcc" in line and " -c " in line]
        print(f"=== {source} (TORCH_CUDA_ARCH_LIST={archs}) ===")
        for command in commands:
            print(command.split("] ", 1)[-1])
        if result.returncode:
            print(log, file=sys.stderr)
            print(f"FAILED: {source} does not compile", file=sys.stderr)
            failed = True
            continue
        kernels = parse_ptxas(log)
        if not any(k.entry for k in kernels):
            print(log, file=sys.stderr)
            print(f"FAILED: no ptxas report for {source} (is -Xptxas -v reaching nvcc?)",
                  file=sys.stderr)
            failed = True
            continue
        print("\n".join(_table(kernels, source)))
        spilling = [k for k in kernels if k.spill_stores]
        if spilling:
            names = demangle([k.name for k in spilling])
            for k in spilling:
                print(f"FAILED: {names[k.name]} ({k.arch}) spills {k.spill_stores} bytes",
                      file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
