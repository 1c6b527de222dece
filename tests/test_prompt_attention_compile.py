"""The prompt attention Triton kernels compile for an H100/H200 (sm_90), even without a GPU.

CPU machines run the kernels only in Triton's interpreter, which never sees the compiler; this
test compiles each kernel ahead of time for sm_90, in every dtype of the capability table, in a
fresh process where Triton compiles (TRITON_INTERPRET unset) and with an empty kernel cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dpt_fast.kernels import prompt_attention_backward as backward
from dpt_fast.kernels import prompt_attention_forward as forward
from dpt_fast.ops.prompt_attention import TRITON_KERNELS

TARGET = GPUTarget("cuda", 90, 32)
SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32"}


def compile_for_sm90(fn, pointers, constants):
    signature = {name: pointers.get(name) or SCALARS.get(name, "i32")
                 for name in fn.arg_names if name not in constants}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constants))
    triton.compile(source, target=TARGET, options={"num_warps": 4, "num_stages": 2})


for torch_dtype in TRITON_KERNELS.dtypes:
    dt = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[
        str(torch_dtype)]
    tiles = {"HEAD_DIM": 64, "BLOCK_D": 64, "CAUSAL": True,
             "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "BLOCK_M": 32, "BLOCK_N": 32}
    inputs = {name: "*" + dt for name in ("Q", "K", "V", "KP", "VP", "DO", "Out", "DK", "DV",
                                          "DQ")}
    inputs.update({name: "*fp32" for name in ("Lse", "Delta", "DKP", "DVP")})
    compile_for_sm90(forward.forward_kernel.fn, inputs, tiles)
    compile_for_sm90(backward.backward_dkdv_kernel.fn, inputs, tiles)
    compile_for_sm90(backward.backward_dq_kernel.fn, inputs, tiles)
    compile_for_sm90(backward.backward_preprocess_kernel, inputs,
                     {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": 64})
    print("compiled", dt)
print("ok")
"""


def test_kernels_compile_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "backends") or "nvidia" not in triton.backends.backends:
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend to compile with")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:])
