"""triton is optional, and imported only where the Triton path is chosen.

Each test runs a fresh Python process, because whether and how triton is imported is fixed for a
process at its first ``import triton``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Blocks `import triton` as if it were not installed; then builds and trains both models on CPU.
WITHOUT_TRITON = """
import sys

sys.modules["triton"] = None  # `import triton` now raises ImportError, as when not installed

import os

import torch

import dpt_fast
import dpt_fast.reference
from dpt_fast import DPT, DPTConfig
from dpt_fast.ops import class_aware_attention, prompt_attention
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.testing import tiny_clip

torch.manual_seed(0)
clip = tiny_clip()
names = ["cat", "dog", "sea_lion"]
config = DPTConfig(cavpt_top_k=2)
ref = ReferenceDPT(clip, names, config)
fast = DPT(clip, names, config)
fast.load_state_dict(ref.state_dict())
images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
for model in (ref, fast):
    model.loss(model(images), labels, epoch=0).backward()
fast_parameters = dict(fast.named_parameters())
trained = [(name, p) for name, p in ref.named_parameters() if p.requires_grad]
assert trained
for name, p in trained:  # the parity tests' bound: relative error of the whole gradient
    error = (fast_parameters[name].grad - p.grad).norm() / p.grad.norm().clamp_min(1e-30)
    assert error <= 1e-4, (name, error.item())
assert not any(m == "triton" or m.startswith(("triton.", "dpt_fast.kernels."))
               for m, module in sys.modules.items() if module is not None), "triton was imported"

q = torch.randn(1, 2, 3, 8)
os.environ["DPT_FAST_BACKEND"] = "triton"
try:
    prompt_attention(q, q, q, q, q)
except RuntimeError as err:
    assert "pip install triton" in str(err), err
else:
    raise AssertionError("DPT_FAST_BACKEND=triton ran without triton")
print("ok")
"""

# triton imported before TRITON_INTERPRET=1 was set: the kernels refuse to load, with the fix.
INTERPRET_TOO_LATE = """
import os

import triton  # compiles: TRITON_INTERPRET is unset here

os.environ["TRITON_INTERPRET"] = "1"
try:
    import dpt_fast.kernels.prompt_attention
except ImportError as err:
    assert "before anything imports triton" in str(err), err
else:
    raise AssertionError("the kernels loaded under a TRITON_INTERPRET triton did not see")
print("ok")
"""

# Compiled Triton (no interpreter) in a process without a GPU: CPU tensors get a clear error.
COMPILED_ON_CPU = """
import torch

from dpt_fast.kernels import prompt_attention as kernels

q = torch.randn(1, 2, 3, 16)
try:
    kernels.prompt_attention_fwd(q, q, q, q, q, False, 0.25)
except RuntimeError as err:
    assert "TRITON_INTERPRET=1" in str(err), err
else:
    raise AssertionError("compiled kernels ran on CPU tensors")
print("ok")
"""


def _run(script: str, **env: str) -> None:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TRITON_INTERPRET", "DPT_FAST_BACKEND")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:])


def test_models_run_without_triton():
    _run(WITHOUT_TRITON)


def test_kernels_refuse_a_late_interpreter_switch():
    pytest.importorskip("triton")
    _run(INTERPRET_TOO_LATE)


def test_compiled_kernels_refuse_cpu_tensors():
    pytest.importorskip("triton")
    _run(COMPILED_ON_CPU)
