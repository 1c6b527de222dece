"""The ptxas report parser of .ci/nvcc_check.py (CI's CUDA resource check)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "nvcc_check.py"

# What ptxas -v prints for two architectures: a clean kernel, a kernel that spills, and a device
# function that was not inlined (its own frame and spills).
LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_80'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 16384 bytes smem, 388 bytes cmem[0]
ptxas info    : Compile time = 1.0 ms
ptxas info    : Compiling entry function '_Z6spillyPf' for 'sm_90'
ptxas info    : Function properties for _Z6spillyPf
    8 bytes stack frame, 8 bytes spill stores, 48 bytes spill loads
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size
"""


@pytest.fixture(scope="module")
def nvcc_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nvcc_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nvcc_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_parse_ptxas(nvcc_check: ModuleType) -> None:
    clean, spilly, helper = nvcc_check.parse_ptxas(LOG)
    assert (clean.name, clean.arch, clean.registers, clean.smem) == ("_Z5cleanPf", "sm_80", 32,
                                                                     16384)
    assert (clean.spill_stores, clean.spill_loads, clean.stack) == (0, 0, 0)
    assert (spilly.arch, spilly.registers, spilly.smem) == ("sm_90", 64, 0)
    assert (spilly.spill_stores, spilly.spill_loads, spilly.stack) == (8, 48, 8)
    assert not helper.entry and helper.arch == "sm_90" and helper.spill_stores == 4


def test_table_flags_every_spill(nvcc_check: ModuleType) -> None:
    rows = nvcc_check._table(nvcc_check.parse_ptxas(LOG), "x.cu")
    flagged = [row for row in rows if row.endswith("<-- SPILLS")]
    assert len(flagged) == 2 and "[device fn]" in flagged[1]


@pytest.mark.parametrize(
    ("demangled", "short"),
    [
        ("void dpt_fast::(anonymous namespace)::k<float, 8>(float const*, int)",
         "dpt_fast::k<float, 8>"),
        ("void f<(int)4>(int)", "f<(int)4>"),
        ("plain_name", "plain_name"),
    ],
)
def test_names_lose_their_arguments(nvcc_check: ModuleType, demangled: str, short: str) -> None:
    assert nvcc_check._without_arguments(demangled) == short
