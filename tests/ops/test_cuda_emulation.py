"""The CUDA kernels of the class-aware attention op, run on the CPU (``-m emulated_cuda``).

``tests/cuda_emulation.py`` compiles the ``.cu`` sources with g++ against an emulation of the CUDA
execution model (docs/cuda-emulation.md): the op's own host code picks the paths and launch
configurations, the kernels run block by block with each thread a fiber. Every case runs under
several thread schedules (``SEEDS``) and must give bit-identical results under all of them (a
missing barrier or a lane assumed in lockstep makes the result depend on the order), within the
CUDA tests' tolerances of the float64 oracle, and close to the CPU op. Out-of-bounds accesses,
deadlocks and misaligned vector accesses raise inside the emulation and fail the case.

The cases mirror the ``cuda`` parameters of ``test_class_aware_attention.py``; where a CUDA test
uses a large shape, a smaller one with the same kernel paths stands for it (``CASES``).
"""

from __future__ import annotations

import math
import time

import cuda_emulation
import pytest
import torch
from class_aware_attention_checks import (
    DTYPE_IDS,
    DTYPES,
    EXACT_TOLERANCE,
    LOW_PRECISION_FACTOR,
    LOW_PRECISION_ULP,
    RESULT_NAMES,
    random_inputs,
)

from dpt_fast.ops.class_aware_attention import CLASS_AWARE_ATTENTION, class_aware_attention_ref

pytestmark = pytest.mark.emulated_cuda

ROW_TILE = CLASS_AWARE_ATTENTION.cuda_fused_max_rows  # 16
VECTOR = CLASS_AWARE_ATTENTION.cuda_fused_vector  # 4
KEY_TILE = CLASS_AWARE_ATTENTION.cuda_backward_key_tile  # 32

# Schedules (csrc/cuda_emulation/cuda_emulation.h): 0 runs the runnable threads in rounds in
# index order; 1 and 2 run rounds in permuted orders; 3 always runs the runnable thread of highest
# priority (redrawn at each barrier), so one warp runs ahead of the others. Blocks run in an
# order the seed permutes.
SEEDS = (0, 1, 2, 3)

# (B, K, M, dk, dv). Same as test_class_aware_attention.SHAPES where that is small; otherwise the
# comment names the CUDA test's shape it stands for and why it exercises the same code.
CASES = {
    # dk 64 (two full depth slices of the score kernel) with M > 128 (two key chunks) and odd;
    # first, since it reaches the most code (the mutation check stops at the first failure).
    "dk64": (1, 10, 131, 64, 64),
    "K1": (2, 1, 5, 8, 8),
    "M1": (2, 4, 1, 8, 8),
    "dk7": (3, 5, 9, 7, 11),
    "dk13-dv7": (2, 3, 6, 13, 7),
    # Two forward row tiles, the general backward path (K > ROW_TILE).
    "K-above-tile": (1, ROW_TILE + 1, KEY_TILE + 1, 16, 10 * VECTOR),
    # For "dpt" (3, 10, 207, 32, 768): row tile 12, dk 32, dv 768 (6 column blocks of the PV
    # kernel); M 37 gives two backward key tiles with an odd tail, as 207 gives seven.
    "dpt": (2, 10, 37, 32, 768),
    # For "dpt-dv1024" (2, 10, 207, 32, 1024).
    "dpt-dv1024": (1, 10, 37, 32, 1024),
    # For "K-tile-dv1024" (2, 16, 70, 32, 1024): K at the row tile, 70 KiB of dynamic shared
    # memory in the fused backward (the opt-in path), M tail.
    "K-tile-dv1024": (1, ROW_TILE, KEY_TILE + 3, 32, 1024),
    # M > 128: two score chunks of the forward kernel; dk 40: two depth slices, the second a tail.
    "K12-M-tail": (1, 12, 4 * KEY_TILE + 1, 40, 96),
    "K7-dk7": (2, 7, 45, 7, 3 * VECTOR),
    "dk5-dv-vector": (2, 3, KEY_TILE + 1, 5, VECTOR),
}


@pytest.fixture(scope="module")
def emulation() -> None:
    """Builds the emulated kernels (cached by the sources' content) before the module runs."""
    cuda_emulation.load()
    yield
    cuda_emulation.set_schedule(0)


def run_emulated(q, k, v, grad_out, scale: float) -> list[torch.Tensor]:
    """[out, lse, grad_q, grad_k, grad_v] of the emulated CUDA ops."""
    out, lse = cuda_emulation.forward(q, k, v, scale)
    grads = cuda_emulation.backward(grad_out, q, k, v, out, lse, scale)
    return [out, lse, *grads]


def run_all_schedules(q, k, v, grad_out, scale: float) -> list[torch.Tensor]:
    """Results of the first schedule, after checking that every schedule gives the same bits."""
    first = None
    for seed in SEEDS:
        cuda_emulation.set_schedule(seed)
        results = run_emulated(q, k, v, grad_out, scale)
        if first is None:
            first = results
            continue
        for name, a, b in zip(("out", "lse", *RESULT_NAMES[1:]), first, results, strict=True):
            same = torch.equal(a, b) or (a.isnan().any() and a.isnan().equal(b.isnan()))
            assert same, (f"{name} differs between schedules 0 and {seed}: a race (missing "
                          f"__syncthreads or lockstep assumption) in the CUDA kernels")
    cuda_emulation.set_schedule(0)
    return first


def bound(got: torch.Tensor, exact: torch.Tensor, pytorch: torch.Tensor | None) -> float:
    """The CUDA tests' error bound for got (class_aware_attention_checks)."""
    magnitude = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    if got.dtype in LOW_PRECISION_ULP:
        pytorch_error = (pytorch.double() - exact).abs().max().item() if exact.numel() else 0.0
        return LOW_PRECISION_FACTOR * pytorch_error + LOW_PRECISION_ULP[got.dtype] * magnitude
    return EXACT_TOLERANCE[got.dtype] * magnitude


def reference(q, k, v, grad_out, scale: float, dtype: torch.dtype) -> list[torch.Tensor]:
    """[out, grad_q, grad_k, grad_v] of the reference formula in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = class_aware_attention_ref(*leaves, scale)
    out.backward(grad_out.to(dtype))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def cpu_op(q, k, v, grad_out, scale: float) -> list[torch.Tensor]:
    """[out, lse, grad_q, grad_k, grad_v] of the op's CPU kernels (or its PyTorch fallback)."""
    from dpt_fast.ops import _extension

    if not _extension.extension_available():
        out = class_aware_attention_ref(q, k, v, scale)
        lse = torch.logsumexp((q.double() @ k.double().transpose(1, 2)) * scale, dim=-1)
        return [out, lse, *reference(q, k, v, grad_out, scale, q.dtype)[1:]]
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, scale)
    grads = torch.ops.dpt_fast.class_aware_attention_backward(grad_out, q, k, v, out, lse, scale)
    return [out, lse, *grads]


def check_case(shape, dtype: torch.dtype) -> None:
    q, k, v, grad_out = random_inputs(shape, dtype)
    scale = 1 / math.sqrt(shape[3])
    got = run_all_schedules(q, k, v, grad_out, scale)
    exact = reference(q, k, v, grad_out, scale, torch.float64)
    pytorch = reference(q, k, v, grad_out, scale, dtype) if dtype in LOW_PRECISION_ULP else None
    cpu = cpu_op(q, k, v, grad_out, scale)
    got_lse = got.pop(1)
    cpu_lse = cpu.pop(1)
    for index, name in enumerate(RESULT_NAMES):
        g = got[index]
        assert g.dtype == dtype and g.shape == exact[index].shape, name
        assert not g.isnan().any(), f"{name} has NaN (an element no kernel wrote, or shared " \
                                    "memory read before it was written)"
        limit = bound(g, exact[index], pytorch[index] if pytorch else None)
        error = (g.double() - exact[index]).abs().max().item() if g.numel() else 0.0
        assert error <= limit, f"{name}: error {error:.3g} > bound {limit:.3g} ({dtype})"
        to_cpu = (g.double() - cpu[index].double()).abs().max().item() if g.numel() else 0.0
        assert to_cpu <= 2 * limit, f"{name}: {to_cpu:.3g} from the CPU op ({dtype})"
    expected_lse = torch.logsumexp((q.double() @ k.double().transpose(1, 2)) * scale, dim=-1)
    lse_tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got_lse.double(), expected_lse, atol=lse_tol, rtol=lse_tol)
    torch.testing.assert_close(got_lse.double(), cpu_lse.double(), atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(CASES.values()), ids=list(CASES))
def test_matches_oracle_under_every_schedule(
    emulation: None, nan_filled_memory: None, shape, dtype: torch.dtype
) -> None:
    check_case(shape, dtype)


def test_non_contiguous_misaligned_and_expanded_inputs(
    emulation: None, nan_filled_memory: None
) -> None:
    """The CUDA op makes strided inputs contiguous, takes the general paths for misaligned
    ones, and accepts a stride-0 grad_out (the gradient of a sum)."""
    shape = (2, 10, 33, 32, 16 * VECTOR)
    q, k, v, grad_out = random_inputs(shape, torch.float32)
    scale = 0.25
    base = run_emulated(q, k, v, grad_out, scale)

    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_slice = torch.stack([v, -v], dim=-1)[..., 0]
    strided = run_emulated(q, k_t, v_slice, grad_out, scale)
    for a, b in zip(strided, base, strict=True):
        assert torch.equal(a, b)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view

    moved = run_all_schedules(shifted(q), shifted(k), shifted(v), shifted(grad_out), scale)
    for a, b in zip(moved, base, strict=True):
        torch.testing.assert_close(a, b)

    ones = torch.ones(1, 1, 1).expand(shape[0], shape[1], shape[4])
    out, lse = cuda_emulation.forward(q, k, v, scale)
    expanded = cuda_emulation.backward(ones, q, k, v, out, lse, scale)
    dense = cuda_emulation.backward(ones.contiguous(), q, k, v, out, lse, scale)
    for a, b in zip(expanded, dense, strict=True):
        assert torch.equal(a, b)


def test_empty_batch_and_rows(emulation: None) -> None:
    for shape in [(0, 3, 5, 4, 8), (2, 0, 5, 4, 8)]:
        q, k, v, grad_out = random_inputs(shape, torch.float32)
        out, lse = cuda_emulation.forward(q, k, v, 0.5)
        assert out.shape == (shape[0], shape[1], shape[4])
        _, grad_k, grad_v = cuda_emulation.backward(grad_out, q, k, v, out, lse, 0.5)
        assert not grad_k.any() and not grad_v.any()


def test_every_kernel_runs(emulation: None) -> None:
    """The cases above reach every kernel of the CUDA sources (fused and general paths)."""
    for shape, dtype in [((1, 10, 37, 32, 64), torch.float32), ((1, 3, 5, 4, 8), torch.float64)]:
        q, k, v, grad_out = random_inputs(shape, dtype)
        run_emulated(q, k, v, grad_out, 0.5)
    assert set(cuda_emulation.KERNELS) <= cuda_emulation.kernels_run()


# --- the emulation's own checks, on kernels that break a rule on purpose (selftest.cpp) -------


def test_self_test_kernel_runs(emulation: None) -> None:
    data = torch.arange(64, dtype=torch.float32)
    assert cuda_emulation.selftest(0, data) is None
    assert data[0].item() == sum(range(64))


def test_deadlock_fails_fast_naming_the_kernel(emulation: None) -> None:
    start = time.monotonic()
    error = cuda_emulation.selftest(1, torch.zeros(64))
    assert time.monotonic() - start < 5
    assert error is not None and "selftest_deadlock_kernel" in error and "deadlock" in error
    assert "__syncthreads() on line" in error


def test_launch_time_limit(emulation: None) -> None:
    cuda_emulation.set_timeout(0.0)
    try:
        error = cuda_emulation.selftest(0, torch.zeros(64))
    finally:
        cuda_emulation.set_timeout(20.0)
    assert error is not None and "time limit" in error and "selftest_sum_kernel" in error


@pytest.mark.parametrize(("which", "message"), [
    (2, "index 64 out of range [0, 64) in __shared__ array"),
    (3, "out-of-bounds access to global memory: element 64 of 64"),
    (5, "index 4 out of bounds of a local array at "),
])
def test_out_of_bounds_fails_naming_the_kernel(emulation: None, which: int, message: str) -> None:
    error = cuda_emulation.selftest(which, torch.zeros(64))
    assert error is not None and message in error and ", thread (" in error
    assert "selftest_" in error


def test_missing_barrier_changes_results_across_schedules(emulation: None) -> None:
    results = []
    for seed in SEEDS:
        cuda_emulation.set_schedule(seed)
        data = torch.arange(64, dtype=torch.float32)
        assert cuda_emulation.selftest(4, data) is None
        results.append(data)
    cuda_emulation.set_schedule(0)
    assert any(not torch.equal(results[0], r) for r in results[1:])
