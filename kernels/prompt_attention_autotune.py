"""Launch configuration of the prompt attention kernels: autotuning candidates and fixed blocks.

Also where this package learns whether Triton interprets: Triton picks interpreter or compiler
when a ``@triton.jit`` function is defined, for its own library (``tl.max``, ``tl.sum``) when
``triton`` is imported and for our kernels when their modules are. Both happen under one
``TRITON_INTERPRET`` value only if it was set before triton was imported; otherwise importing
the kernels fails here with the fix, instead of failing later inside a kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpt_fast.ops.prompt_attention.capabilities import TRITON_KERNELS

# Whether the kernels defined after this (in this process) run in the interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# Whether triton's own library was defined for the interpreter, at `import triton`.
_TRITON_INTERPRETS = not isinstance(tl.max, triton.JITFunction)
if INTERPRETED != _TRITON_INTERPRETS:
    raise ImportError(
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now, but triton was imported "
        f"{'with' if _TRITON_INTERPRETS else 'without'} TRITON_INTERPRET=1, so its library "
        f"functions and dpt_fast's kernels would disagree on interpreting. Set (or unset) "
        f"TRITON_INTERPRET=1 before anything imports triton (open_clip and torch.compile do)."
    )

# Launch settings read by the launchers: "fixed_blocks" is (BLOCK_M, BLOCK_N) forced by
# `fixed_blocks`, bypassing the autotuner, or None; "compile_only" is set by `compile_only`.
SETTINGS: dict[str, tuple[int, int] | bool | None] = {"fixed_blocks": None, "compile_only": False}


# What a candidate takes (Spec.takes): fp16 / bf16 inputs, fp32 inputs with exact ("ieee") dots,
# fp32 inputs with TF32 dots. The three need different registers, so each candidate lists those
# it compiles for without spilling.
HALF, IEEE, TF32 = "half", "ieee", "tf32"
FP32 = (IEEE, TF32)


@dataclass(frozen=True)
class Spec:
    """One autotuning candidate and where it applies.

    min_dim, max_dim and takes come from compiling every candidate for sm_90 and reading
    ptxas' register and spill report (``.ci/triton_aot_check.py``, with the installed triton
    and with the GPU machine's, whose register allocation differs): outside its head dims the
    candidate spills registers; fp32 inputs need far more registers than fp16 / bf16 (and IEEE
    dots other registers than TF32 ones), so only small tiles take them.
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    max_dim: int = 128
    takes: tuple[str, ...] = (HALF,)
    min_dim: int = 1

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
                             num_warps=self.warps, num_stages=self.stages)


# The interpreter runs NumPy per block: one small candidate, so the autotuner never benchmarks.
INTERPRETER_SPECS = [
    Spec(TRITON_KERNELS.min_block, TRITON_KERNELS.min_block, 1, 1, TRITON_KERNELS.max_head_dim,
         (HALF, *FP32)),
]

# Forward: BLOCK_M queries per program, BLOCK_N keys per loop step.
FORWARD_SPECS = [
    Spec(128, 64, 8, 3), Spec(128, 32, 8, 3), Spec(64, 64, 4, 3, 64), Spec(64, 32, 4, 3),
    Spec(32, 64, 4, 2, 64), Spec(32, 32, 4, 2, 64), Spec(16, 64, 4, 2, 64, (HALF, *FP32)),
    Spec(32, 32, 8, 2, 64, FP32), Spec(16, 64, 8, 2, 128, (HALF, *FP32)),
]
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per loop step.
DKDV_SPECS = [
    Spec(32, 128, 8, 2, 64), Spec(16, 128, 8, 2, 64), Spec(64, 64, 8, 2, 64),
    Spec(32, 64, 8, 2, 64), Spec(32, 64, 4, 2, 64), Spec(16, 64, 8, 2),
    Spec(16, 32, 4, 2, 64, (HALF, *FP32)), Spec(16, 32, 8, 1, 128, FP32),
]
# dQ: BLOCK_M queries per program, BLOCK_N keys per loop step.
DQ_SPECS = [
    Spec(128, 32, 8, 2, 64), Spec(64, 32, 4, 2), Spec(128, 64, 8, 2, 64),
    Spec(64, 64, 8, 2, 64), Spec(32, 64, 4, 2), Spec(16, 64, 4, 2, 64, (HALF, *FP32)),
    Spec(32, 32, 4, 2, 64), Spec(16, 64, 8, 2, 64, (HALF, *FP32)),
    Spec(32, 32, 8, 2, 64, (HALF, *FP32)), Spec(16, 32, 8, 2, 128, (TF32,)),
    Spec(16, 16, 8, 2, 128, (IEEE,), min_dim=65),
]


def block_at_least(n: int) -> int:
    """The smallest block (a power of two, at least TRITON_KERNELS.min_block) covering n."""
    return max(TRITON_KERNELS.min_block, triton.next_power_of_2(max(int(n), 1)))


def _tile(config: triton.Config) -> tuple[int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


def autotune_args(specs: list[Spec], interpreted: bool = INTERPRETED) -> dict:
    """triton.autotune's configs and pruning for these candidates (one in the interpreter)."""
    specs = INTERPRETER_SPECS if interpreted else specs
    by_config = {(s.block_m, s.block_n, s.warps, s.stages): s for s in specs}

    def spec_of(config: triton.Config) -> Spec:
        key = (*_tile(config), config.num_warps, config.num_stages)
        return by_config[key]

    def prune(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
        """Keeps the candidates that fit the head dim and dtype without spilling and whose
        blocks do not overshoot the sequence (small N, e.g. Nq = 1 for CLS-only queries).

        The autotuner passes the positional arguments as nargs and the keyword ones (where
        the launchers put the shapes) as kwargs.
        """
        args = {**nargs, **kwargs}
        kind = args["DOT_PRECISION"] if args["Q"].dtype == torch.float32 else HALF
        fitting = [c for c in configs if kind in spec_of(c).takes
                   and spec_of(c).min_dim <= args["HEAD_DIM"] <= spec_of(c).max_dim]
        if not fitting:
            raise ValueError(
                f"no launch configuration takes head dim {args['HEAD_DIM']} with "
                f"{args['Q'].dtype} inputs ({kind}) without spilling registers; "
                f"TRITON_KERNELS.max_head_dim should have sent this call to the PyTorch path")
        max_m = block_at_least(args["N_Q"])
        max_n = block_at_least(max(args["N_K"], args["N_P"]))
        small = [c for c in fitting if _tile(c)[0] <= max_m and _tile(c)[1] <= max_n]
        # When every candidate overshoots: the smallest query block, then the smallest key block.
        return small or [min(fitting, key=_tile)]

    return {
        "configs": [s.config() for s in specs],
        # Every argument that changes the compiled code or its speed besides the tensors'
        # dtypes (which triton adds itself): a config tuned for TF32 dots is no pick for IEEE.
        "key": ["N_Q", "N_K", "N_P", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"],
        "prune_configs_by": {"early_config_prune": prune},
    }


@contextlib.contextmanager
def fixed_blocks(block_m: int, block_n: int) -> Iterator[None]:
    """Within the block, launch with these block sizes (4 warps) instead of autotuning.

    For tests (exercising block shapes the autotuner would not pick, keeping GPU compile time
    down) and debugging. Both sizes must be powers of two ≥ ``TRITON_KERNELS.min_block``.
    """
    for b in (block_m, block_n):
        if b < TRITON_KERNELS.min_block or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= {TRITON_KERNELS.min_block}, "
                             f"got {block_m}, {block_n}")
    previous = SETTINGS["fixed_blocks"]
    SETTINGS["fixed_blocks"] = (block_m, block_n)
    try:
        yield
    finally:
        SETTINGS["fixed_blocks"] = previous


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Within the block, the launchers check and prepare their arguments as for a launch but
    hand them to Triton's ``warmup`` (compile, never run) instead of launching.

    CPU tensors stand in for CUDA ones (Triton specializes on dtypes, strides, sizes and pointer
    alignment, all of which CPU tensors share); outputs are left unwritten. For the ahead-of-time
    compile check (``.ci/triton_aot_check.py``), which installs a Triton driver that names the
    GPU to compile for and catches the compiles through Triton's ``jit_cache_hook``. Needs
    Triton's compiler: not available when the kernels are interpreted.
    """
    if INTERPRETED:
        raise RuntimeError("compile_only needs Triton's compiler: unset TRITON_INTERPRET before "
                           "triton is imported")
    previous = SETTINGS["compile_only"]
    SETTINGS["compile_only"] = True
    try:
        yield
    finally:
        SETTINGS["compile_only"] = previous
