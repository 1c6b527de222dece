"""Class-aware attention, forward + backward: the fused op vs the PyTorch composition (bmm,
softmax, bmm) vs torch.compile of that composition.

Shapes are DPT's CAVPT attention: K=10 class queries over M=207 tokens, dk=32, dv=768, B=32 and
256; bfloat16 on a GPU, float32 on CPU (about 30 s on one core once inductor's cache is warm; a
cold compile of the composition adds about 20 s per batch size). report.py turns the results into
the op / composition ratios of the issue's speed target.
Run: pytest benchmarks/test_bench_class_aware_attention.py --benchmark-only
(under --benchmark-disable every case runs once, as a smoke test; on CPU the compiled composition
then uses backend="aot_eager", as inductor's cold compile would take most of the run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from bench_common import DEVICE, HAS_CUDA
from caa_inputs import DK, DV, KEYS, ROWS, caa_inputs

from dpt_fast.ops import class_aware_attention, class_aware_attention_ref

BATCHES = [32, 256]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
IMPLS = ["op", "composition", "compiled"]

_compiled_composition: Callable | None = None


def _impl(name: str, backend: str = "inductor") -> Callable:
    """The function benchmarked under `name`; the compiled one is built once per session."""
    global _compiled_composition
    if name == "op":
        return class_aware_attention
    if name == "composition":
        return class_aware_attention_ref
    if _compiled_composition is None:
        _compiled_composition = torch.compile(class_aware_attention_ref, dynamic=False,
                                              backend=backend)
    return _compiled_composition


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, impl: str, batch: int) -> None:
    # Under --benchmark-disable on CPU the compiled composition is smoke-tested through
    # aot_eager: a cold inductor compile takes ~20 s there (inductor is benchmarked with timing on).
    smoke_cpu = benchmark.disabled and not HAS_CUDA
    fn = _impl(impl, backend="aot_eager" if smoke_cpu else "inductor")
    leaves, grad_out = caa_inputs(batch, DEVICE, DTYPE)

    def step() -> None:
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out)  # no .grad accumulation between rounds
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        impl=impl,
        shape={"B": batch, "K": ROWS, "M": KEYS, "dk": DK, "dv": DV},
        dtype=str(DTYPE).removeprefix("torch."),
        device=DEVICE,
    )
    step()  # compile / warm caches outside the timed rounds
    if HAS_CUDA:
        benchmark.pedantic(step, warmup_rounds=5, rounds=30, iterations=5)
    else:
        # 15 rounds: the report compares medians, and a busy CPU needs a few to settle them.
        benchmark.pedantic(step, warmup_rounds=2, rounds=15)
