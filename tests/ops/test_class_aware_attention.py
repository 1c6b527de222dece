"""Numerics of dpt_fast.ops.class_aware_attention: softmax(q kᵀ · scale) · v.

Every test that applies to both runs on the CPU kernels and, on a GPU machine, on the CUDA
kernels (the ``cuda`` parameters skip without one). Oracle and tolerances:
``class_aware_attention_checks``. Shapes are read from the capability table where they probe a
kernel limit. The op's interface (extension, registrations, bad inputs):
``test_class_aware_attention_op.py``; the CPU block cache: ``test_cpu_block_cache.py``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from class_aware_attention_checks import (
    DEVICES,
    DTYPE_IDS,
    DTYPES,
    RESULT_NAMES,
    assert_close_to_oracle,
    forward_backward,
    random_inputs,
    require_kernels,
)

from dpt_fast.ops.class_aware_attention import (
    CLASS_AWARE_ATTENTION,
    class_aware_attention,
    class_aware_attention_ref,
)

ROW_TILE = CLASS_AWARE_ATTENTION.cuda_fused_max_rows
VECTOR = CLASS_AWARE_ATTENTION.cuda_fused_vector
KEY_TILE = CLASS_AWARE_ATTENTION.cuda_backward_key_tile

# (B, K, M, dk, dv): single query / single key, dk and dv not multiples of 8 nor of the vector
# width, K above the CUDA row tile, the DPT shape (K=10 classes over M=207 tokens, dk=32, dv=768),
# and the CUDA kernels' edges: K at the row tile with dv = 1024 (over 48 KiB of shared memory in
# the fused backward), M not a multiple of the backward key tile, the fused 8-row tile with dk and
# M tails, the narrowest vectorised dv.
SHAPES = {
    "K1": (2, 1, 5, 8, 8),
    "M1": (2, 4, 1, 8, 8),
    "dk7": (3, 5, 9, 7, 11),
    "dk13-dv7": (2, 3, 6, 13, 7),
    "K-above-tile": (1, ROW_TILE + 1, KEY_TILE + 1, 16, 10 * VECTOR),
    "dpt": (3, 10, 207, 32, 768),
    "K-tile-dv1024": (2, ROW_TILE, 70, 32, 1024),
    "dpt-dv1024": (2, 10, 207, 32, 1024),
    "K12-M-tail": (1, 12, 4 * KEY_TILE + 1, 40, 96),
    "K7-dk7": (2, 7, 45, 7, 3 * VECTOR),
    "dk5-dv-vector": (2, 3, KEY_TILE + 1, 5, VECTOR),
}
# Max abs error of the saved lse against float64 logsumexp, as (atol, rtol), per input dtype.
LSE_TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-4, 1e-5)}


# --- numerics on every device ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_oracle(
    extension: None, nan_filled_memory: None, device: str, shape, dtype: torch.dtype
) -> None:
    require_kernels(device)
    assert_close_to_oracle(class_aware_attention, shape, dtype, device)


@pytest.mark.parametrize("dtype", list(LSE_TOLERANCE), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_lse_is_logsumexp_of_scaled_scores(
    extension: None, nan_filled_memory: None, device: str, dtype: torch.dtype
) -> None:
    require_kernels(device)
    q, k, v, grad_out = random_inputs((4, 10, 207, 32, 768), dtype, device)
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.25)
    grads = torch.ops.dpt_fast.class_aware_attention_backward(grad_out, q, k, v, out, lse, 0.25)
    for tensor in (out, lse, *grads):
        assert not tensor.isnan().any()
    assert lse.dtype == torch.float32 and lse.shape == (4, 10)
    expected = torch.logsumexp((q.double() @ k.double().transpose(1, 2)) * 0.25, dim=-1)
    atol, rtol = LSE_TOLERANCE[dtype]
    torch.testing.assert_close(lse.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_and_default_scale(extension: None, device: str) -> None:
    require_kernels(device)
    q, k, v, _ = random_inputs((2, 3, 6, 9, 5), torch.float64, device)
    torch.testing.assert_close(
        class_aware_attention(q, k, v), class_aware_attention_ref(q, k, v, 1 / math.sqrt(9))
    )
    torch.testing.assert_close(
        class_aware_attention(q, k, v, scale=2.5), class_aware_attention_ref(q, k, v, 2.5)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(extension: None, device: str) -> None:
    require_kernels(device)
    q, k, v, _ = random_inputs((2, 4, 7, 6, 10), torch.float32, device)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    v_slice = torch.stack([v, -v], dim=-1)[..., 0]  # strided view with the values of v
    torch.testing.assert_close(v_slice, v)
    torch.testing.assert_close(
        class_aware_attention(q, k_t, v_slice), class_aware_attention(q, k, v)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_inputs(extension: None, device: str, dtype: torch.dtype) -> None:
    # Contiguous views that start one element into their storage: the CUDA fused kernels' vector
    # loads need alignment to the vector width and must take their general path for these.
    require_kernels(device)
    shape = (2, 10, 33, 32, 16 * VECTOR)
    q, k, v, grad_out = random_inputs(shape, dtype, device)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % (VECTOR * t.element_size()) != 0
        return view

    aligned = forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    moved = forward_backward(class_aware_attention, shifted(q), shifted(k), shifted(v),
                             shifted(grad_out), dtype)
    for name, a, b in zip(RESULT_NAMES, moved, aligned, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_out(extension: None, device: str) -> None:
    """out.sum().backward() feeds the backward op a stride-0 grad_out."""
    require_kernels(device)
    q, k, v, _ = random_inputs((2, 3, 5, 4, 6), torch.float64, device)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    class_aware_attention(*got).sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    class_aware_attention_ref(*ref).sum().backward()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_rows(extension: None, device: str) -> None:
    require_kernels(device)
    for shape in [(0, 3, 5, 4, 6), (2, 0, 5, 4, 6)]:
        q, k, v, _ = random_inputs(shape, torch.float32, device)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = class_aware_attention(*leaves)
        assert out.shape == (shape[0], shape[1], shape[4])
        out.sum().backward()
        for leaf in leaves:
            assert leaf.grad.shape == leaf.shape
            assert not leaf.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(extension: None, device: str) -> None:
    require_kernels(device)
    for shape in [(2, 3, 5, 4, 6), (1, 1, 1, 3, 2), (1, 2, 4, 7, 3), (2, 3, 5, 4, 8)]:
        q, k, v, _ = random_inputs(shape, torch.float64, device)
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v: class_aware_attention(q, k, v, scale=0.7), inputs
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(extension: None, device: str, dtype: torch.dtype) -> None:
    require_kernels(device)
    q, k, v, grad_out = random_inputs((8, 10, 207, 32, 768), dtype, device)
    first = forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    second = forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# --- properties of the CPU kernels -----------------------------------------------------------


@pytest.fixture
def two_threads():
    """Runs the test with two intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_results_do_not_depend_on_thread_count(extension: None, two_threads: None) -> None:
    # M = 2000 makes the grain ~16 rows, so the B·K = 80 rows are split between the two threads
    # (40 each under OpenMP): a wrong [begin, end) would differ from the one-thread result.
    q, k, v, grad_out = random_inputs((8, 10, 2000, 8, 16), torch.float32)
    threaded = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    torch.set_num_threads(1)
    single = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    for name, a, b in zip(RESULT_NAMES, threaded, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
    reason="the build compiles the CPU kernels with OpenMP only on Linux with an OpenMP torch",
)
def test_cpu_kernels_run_on_intra_op_threads(extension: None, two_threads: None) -> None:
    # at::parallel_for is a header template: compiled without OpenMP it runs on one thread and
    # the CPU kernels silently lose their parallelism (setup.py must pass -fopenmp). It must also
    # follow torch's thread count, which a second OpenMP runtime beside torch's would ignore.
    from dpt_fast import _C

    assert _C._parallel_for_threads(64) == 2
    torch.set_num_threads(1)
    assert _C._parallel_for_threads(64) == 1


def test_cpu_exp_matches_float64(extension: None) -> None:
    """The float32 kernels' polynomial exp: a few ulp where exp is a normal float, and the IEEE
    answers at the edges (0 below the normal range and for -inf, inf above it, NaN for NaN).

    It checks the SIMD clone this CPU dispatches to (e.g. the AVX-512 one), not all of them.
    """
    from dpt_fast import _C

    x = torch.linspace(-87.3, 88.7, 1_000_003)
    got = _C._exp_f32(x).double()
    exact = torch.exp(x.double())
    relative = ((got - exact).abs() / exact).max().item()
    assert relative < 4 * 2.0**-23, f"max relative error {relative:.3g}"
    assert torch.equal(_C._exp_f32(torch.zeros(3)), torch.ones(3))

    edges = torch.tensor([-math.inf, -1e4, -87.5, 88.8, 1e4, math.inf, math.nan])
    got = _C._exp_f32(edges)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert got[3:6].isinf().all() and (got[3:6] > 0).all()
    assert got[6].isnan()
