"""The prompt attention Triton kernels compile for an H100/H200 (sm_90), even without a GPU.

CPU machines run the kernels only in Triton's interpreter, which never sees the compiler. The
ahead-of-time compile check ``.ci/triton_aot_check.py`` (run in full by ``.ci/run``) compiles
them through the op's own launchers for sm_90 without a GPU and reads ptxas' report; here: its
report parsing and verdicts on canned data, and a quick run of it (one configuration per kernel
and dtype, in a fresh process where Triton compiles, with an empty kernel cache).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "triton_aot_check.py"

# ptxas -v of one Triton kernel that spills, with a device function that was not inlined.
LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'forward_kernel' for 'sm_90a'
ptxas info    : Function properties for forward_kernel
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size, 1024 bytes smem
"""


@pytest.fixture(scope="module")
def check() -> ModuleType:
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("triton_aot_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_aot_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_parse_ptxas_log(check):
    found = check.parse_ptxas_log(LOG)
    assert (found.registers, found.spill_stores, found.spill_loads, found.stack, found.shared) == (
        255, 20, 16, 32, 1024)
    clean = check.parse_ptxas_log(
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert (clean.registers, clean.spill_stores, clean.spill_loads, clean.shared) == (96, 0, 0, 0)


def test_verdicts(check):
    """Spills, shared memory beyond the GPU's per-block limit, registers beyond an SM's file at
    the kernel's warps, and compile errors each fail; a kernel within every limit passes."""
    gpu = check.GPUS[90]
    unit = check.Unit(90, "m", "forward_kernel", "{}", "bf16", "64x64 w8 s3", 8)
    fine = check.Resources(registers=255, shared=gpu.shared_per_block)
    assert check.problems(unit, fine) == []
    cases = {
        "spills": check.Resources(registers=128, spill_stores=4),
        "shared memory": check.Resources(registers=128, shared=gpu.shared_per_block + 1),
        "registers": check.Resources(registers=255),
        "PTXASError": check.Resources(error="PTXASError: ptxas failed"),
    }
    wide = check.Unit(90, "m", "forward_kernel", "{}", "bf16", "64x64 w16 s3", 16)
    for word, found in cases.items():
        assert any(word in why for why in check.problems(wide if word == "registers" else unit,
                                                         found)), word


def test_kernels_compile_for_sm90():
    """Every kernel, in every dtype and dot precision, at a causal text-suffix shape (prompt and
    self keys), compiles for sm_90 through the launchers and fits the H200's limits."""
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "backends") or "nvidia" not in triton.backends.backends:
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend to compile with")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--archs", "90", "--shapes", "text-suffix", "--quick",
         "--jobs", str(min(2, os.cpu_count() or 1))],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("sm_90")]
    compiled = {(row[1], row[5]) for row in rows}
    kernels = {"forward_kernel", "backward_dkdv_kernel", "backward_dq_kernel",
               "backward_preprocess_kernel"}
    for dtype in ("bf16", "fp16", "fp32", "fp32-tf32"):
        missing = {k for k in kernels if (k, dtype) not in compiled}
        # The preprocess kernel has no dot: IEEE and TF32 fp32 compile to one kernel.
        if dtype == "fp32-tf32":
            missing.discard("backward_preprocess_kernel")
        assert not missing, (dtype, missing, report)
