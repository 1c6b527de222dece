"""Tests of dpt_fast.ops.class_aware_attention: softmax(q kᵀ · scale) · v.

Shapes: q (B, K, dk), k (B, M, dk), v (B, M, dv) -> (B, K, dv).

The oracle is the plain PyTorch composition run in float64. float32/float64 results must match it
within a per-dtype tolerance; bfloat16/float16 results must be at most twice as far from it as
PyTorch's own composition in that dtype (the flash-attention criterion), plus one ulp.

Tests of the compiled kernels fail, rather than skip, when the extension did not build although a
C++ compiler is present: a silent fallback to PyTorch would hide a broken build.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import io
import math
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from dpt_fast.ops import _extension
from dpt_fast.ops.class_aware_attention import (
    class_aware_attention,
    class_aware_attention_ref,
)

# The module itself: dpt_fast.ops re-exports the function under the same name.
caa_module = importlib.import_module("dpt_fast.ops.class_aware_attention")

# (B, K, M, dk, dv): single query / single key, dk and dv not multiples of 8, K above the CUDA
# kernels' row tile of 16, and the DPT shape (K=10 classes over M=207 tokens, dk=32, dv=768).
SHAPES = [
    (2, 1, 5, 8, 8),
    (2, 4, 1, 8, 8),
    (3, 5, 9, 7, 11),
    (2, 3, 6, 13, 7),
    (1, 17, 33, 16, 40),
    (3, 10, 207, 32, 768),
]
SHAPE_IDS = ["K1", "M1", "dk7", "dk13-dv7", "K17", "dpt"]

# Absolute tolerance (scaled by max(1, |reference|)) against the float64 oracle.
EXACT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
# Low precision: error <= FACTOR · PyTorch's own error + one ulp · max(1, |reference|).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _has_cxx_compiler() -> bool:
    return any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++"))


@pytest.fixture
def extension() -> None:
    """Fails when the extension is missing on a machine that could have built it, else skips."""
    if _extension.extension_available():
        return
    message = f"dpt_fast._C is not loaded: {_extension.load_error()}"
    if _has_cxx_compiler():
        pytest.fail(message + " (a C++ compiler is present, so the build should have worked)")
    pytest.skip(message)


def _random_inputs(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, K, dk), k (B, M, dk), v (B, M, dv) and a grad_out (B, K, dv), all random normal."""
    batch, rows, keys, dk, dv = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device, dtype)

    return (
        rand(batch, rows, dk),
        rand(batch, keys, dk),
        rand(batch, keys, dv),
        rand(batch, rows, dv),
    )


def _forward_backward(fn, q, k, v, grad_out, dtype: torch.dtype) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn on copies of q, k, v cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def _assert_close_to_oracle(fn, shape, dtype: torch.dtype, device: str = "cpu") -> None:
    """Forward and gradients of fn in dtype against the float64 composition (see module doc)."""
    q, k, v, grad_out = _random_inputs(shape, dtype, device)
    got = _forward_backward(fn, q, k, v, grad_out, dtype)
    exact = _forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float64)
    if dtype in LOW_PRECISION_ULP:
        pytorch = _forward_backward(class_aware_attention_ref, q, k, v, grad_out, dtype)
    for index, name in enumerate(("out", "grad_q", "grad_k", "grad_v")):
        assert got[index].dtype == dtype, name
        assert got[index].shape == exact[index].shape, name
        assert not got[index].isnan().any(), f"{name} has NaN"
        error = (got[index].double() - exact[index]).abs().max().item()
        magnitude = max(1.0, exact[index].abs().max().item())
        if dtype in LOW_PRECISION_ULP:
            pytorch_error = (pytorch[index].double() - exact[index]).abs().max().item()
            bound = LOW_PRECISION_FACTOR * pytorch_error + LOW_PRECISION_ULP[dtype] * magnitude
        else:
            bound = EXACT_TOLERANCE[dtype] * magnitude
        assert error <= bound, f"{name}: error {error:.3g} > bound {bound:.3g} ({dtype})"


# --- extension availability ------------------------------------------------------------------


def test_extension_is_built() -> None:
    """The C++ extension must load wherever a compiler could build it."""
    if not _has_cxx_compiler():
        pytest.skip("no C++ compiler: the pure-PyTorch fallback is expected")
    assert _extension.extension_available(), _extension.load_error()
    assert _extension.load_error() is None


def test_missing_extension_warns_once_with_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_extension.importlib, "import_module", fail)
    with pytest.warns(RuntimeWarning, match=r"pip install --no-build-isolation \.") as record:
        module, reason = _extension._load()
    assert module is None
    assert "ImportError" in reason
    assert len(record) == 1


def test_ops_are_registered(extension: None) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::class_aware_attention", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention_backward", "CPU"
    )
    assert _extension.cuda_kernels_available() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention", "CUDA"
    )


# --- CPU numerics ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpu_matches_float64_oracle(
    extension: None, nan_filled_memory: None, shape, dtype: torch.dtype
) -> None:
    _assert_close_to_oracle(class_aware_attention, shape, dtype)


def test_cpu_lse_is_logsumexp_of_scaled_scores(extension: None) -> None:
    q, k, v, _ = _random_inputs((2, 3, 11, 5, 4), torch.float32)
    _, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.3)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3)
    expected = torch.logsumexp((q.double() @ k.double().transpose(1, 2)) * 0.3, dim=-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-6, rtol=1e-6)


def test_explicit_and_default_scale(extension: None) -> None:
    q, k, v, _ = _random_inputs((2, 3, 6, 9, 5), torch.float64)
    torch.testing.assert_close(
        class_aware_attention(q, k, v), class_aware_attention_ref(q, k, v, 1 / math.sqrt(9))
    )
    torch.testing.assert_close(
        class_aware_attention(q, k, v, scale=2.5), class_aware_attention_ref(q, k, v, 2.5)
    )


# The edge-case tests below run on the CPU kernels and, on a GPU machine, on the CUDA kernels.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def _require_kernels(device: str) -> None:
    """Fails when a GPU machine runs a build without the CUDA kernels (see `cuda_kernels`)."""
    if device == "cuda" and not _extension.cuda_kernels_available():
        pytest.fail("dpt_fast._C was built without CUDA kernels on a machine with a GPU")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(extension: None, device: str) -> None:
    _require_kernels(device)
    q, k, v, _ = _random_inputs((2, 4, 7, 6, 10), torch.float32, device)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    v_slice = torch.stack([v, -v], dim=-1)[..., 0]  # strided view with the values of v
    torch.testing.assert_close(v_slice, v)
    torch.testing.assert_close(
        class_aware_attention(q, k_t, v_slice), class_aware_attention(q, k, v)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_misaligned_inputs(extension: None, device: str, dtype: torch.dtype) -> None:
    # Contiguous views that start one element into their storage: the CUDA kernels' vector loads
    # need 16-byte alignment and must take their general path for these.
    _require_kernels(device)
    shape = (2, 10, 33, 32, 64)
    q, k, v, grad_out = _random_inputs(shape, dtype, device)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    aligned = _forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    moved = _forward_backward(class_aware_attention, shifted(q), shifted(k), shifted(v),
                              shifted(grad_out), dtype)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), moved, aligned, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_out(extension: None, device: str) -> None:
    """out.sum().backward() feeds the backward op a stride-0 grad_out."""
    _require_kernels(device)
    q, k, v, _ = _random_inputs((2, 3, 5, 4, 6), torch.float64, device)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    class_aware_attention(*got).sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    class_aware_attention_ref(*ref).sum().backward()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_rows(extension: None, device: str) -> None:
    _require_kernels(device)
    for shape in [(0, 3, 5, 4, 6), (2, 0, 5, 4, 6)]:
        q, k, v, _ = _random_inputs(shape, torch.float32, device)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = class_aware_attention(*leaves)
        assert out.shape == (shape[0], shape[1], shape[4])
        out.sum().backward()
        for leaf in leaves:
            assert leaf.grad.shape == leaf.shape
            assert not leaf.grad.any()


def test_cpu_gradcheck_float64(extension: None) -> None:
    for shape in [(2, 3, 5, 4, 6), (1, 1, 1, 3, 2), (1, 2, 4, 7, 3)]:
        q, k, v, _ = _random_inputs(shape, torch.float64)
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v: class_aware_attention(q, k, v, scale=0.7), inputs
        )


def test_cpu_deterministic(extension: None) -> None:
    q, k, v, grad_out = _random_inputs((3, 10, 207, 32, 64), torch.float32)
    first = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    second = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


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
    q, k, v, grad_out = _random_inputs((8, 10, 2000, 8, 16), torch.float32)
    threaded = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    torch.set_num_threads(1)
    single = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), threaded, single, strict=True):
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


# grad_v of this shape has 9 MiB in float32 (a 10 MiB block), 4.5 MiB in bfloat16: both go through
# the block cache (csrc/result_cache.h); every other buffer of it is below the cache's 4 MiB.
CACHED_SHAPE = (2, 3, 1024, 8, 1152)
MiB = 1 << 20


@pytest.fixture
def block_cache(extension: None) -> Iterator[ModuleType]:
    """dpt_fast.ops with an empty block cache at its default limit; restored and emptied after."""
    from dpt_fast import ops

    limit = ops.cpu_block_cache_limit()
    ops.empty_cpu_block_cache()
    yield ops
    ops.set_cpu_block_cache_limit(limit)
    ops.empty_cpu_block_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_large_results_reuse_cached_memory(block_cache, dtype: torch.dtype) -> None:
    # grad_v's memory returns to the cache when it is freed, and the next call of that size gets
    # it back instead of faulting in fresh pages.
    ops = block_cache
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, dtype)
    want = _forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float32)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    first = _forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    grad_v_address = first[3].data_ptr()
    assert first[3].nbytes >= 4 * MiB
    del first
    held = ops.cpu_block_cache_bytes()
    assert held >= 4 * MiB  # grad_v's block (bfloat16: also the float32 copy of v and float32 dv)
    second = _forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    assert second[3].data_ptr() == grad_v_address
    assert ops.cpu_block_cache_bytes() < held  # grad_v's block is in use again
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), second, want, strict=True):
        torch.testing.assert_close(a.float(), b, msg=name, **tolerance)


def test_cpu_cache_never_hands_out_memory_in_use(block_cache) -> None:
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, torch.float32)
    first = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    kept = [t.clone() for t in first]
    second = _forward_backward(class_aware_attention, q, k, v, 2 * grad_out, torch.float32)
    assert first[3].data_ptr() != second[3].data_ptr()
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), first, kept, strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(second[3], 2 * first[3])


def test_cpu_cache_limit_and_emptying(block_cache) -> None:
    ops = block_cache
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, torch.float32)
    _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() == 10 * MiB  # grad_v's 9 MiB, in 2 MiB granules
    ops.empty_cpu_block_cache()
    assert ops.cpu_block_cache_bytes() == 0
    ops.set_cpu_block_cache_limit(0)  # caching off: freed blocks go straight back to the system
    assert ops.cpu_block_cache_limit() == 0
    _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() == 0
    ops.set_cpu_block_cache_limit(64 * MiB)
    grad_v = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)[3]
    ops.empty_cpu_block_cache()  # grad_v keeps its block, which comes back when it is freed
    assert ops.cpu_block_cache_bytes() == 0
    del grad_v
    assert ops.cpu_block_cache_bytes() == 10 * MiB
    ops.set_cpu_block_cache_limit(MiB)  # lowering the limit frees what is above it
    assert ops.cpu_block_cache_bytes() == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ops.set_cpu_block_cache_limit(-1)


def test_cpu_cache_evicts_the_oldest_block_for_a_new_size(block_cache) -> None:
    # A block of a new size evicts the oldest rather than being refused, so blocks of a size no
    # longer in use (an earlier batch size) do not hold the cache for good.
    ops = block_cache
    ops.set_cpu_block_cache_limit(20 * MiB)
    first = _random_inputs(CACHED_SHAPE, torch.float32)
    _forward_backward(class_aware_attention, *first, torch.float32)
    assert ops.cpu_block_cache_bytes() == 10 * MiB
    wider = _random_inputs((2, 3, 2048, 8, 1152), torch.float32)  # grad_v: 18 MiB
    _forward_backward(class_aware_attention, *wider, torch.float32)
    assert ops.cpu_block_cache_bytes() == 18 * MiB


def test_cpu_cached_results_are_ordinary_tensors(block_cache) -> None:
    # Storages from the cache resize, save, load and clone lazily like any CPU tensor's.
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, torch.float32)
    grad_v = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)[3]
    expected = grad_v.clone()
    buffer = io.BytesIO()
    torch.save(grad_v, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    if hasattr(torch, "_lazy_clone"):  # copy-on-write clones (torch >= 2.3)
        lazy = torch._lazy_clone(grad_v)
        grad_v.add_(1.0)  # writing materialises the copy
        assert torch.equal(lazy, expected) and torch.equal(grad_v, expected + 1.0)
        expected = grad_v.clone()
    grad_v.resize_(grad_v.numel() * 2)
    assert torch.equal(grad_v[: expected.numel()], expected.flatten())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_cpu_cache_in_a_forked_child(block_cache) -> None:
    # A fork()ed child (a DataLoader worker) starts with an empty cache of the same limit: the
    # parent's lock may have been held by another thread at the fork.
    ops = block_cache
    ops.set_cpu_block_cache_limit(32 * MiB)
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, torch.float32)
    _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() > 0
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            signal.alarm(60)  # a deadlock kills the child (and fails the test), not CI
            torch.set_num_threads(1)
            fresh = ops.cpu_block_cache_bytes() == 0 and ops.cpu_block_cache_limit() == 32 * MiB
            _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
            status = 0 if fresh and ops.cpu_block_cache_bytes() == 10 * MiB else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_cpu_cache_under_concurrent_calls(block_cache) -> None:
    # Four threads run forward + backward at once (the op releases the GIL in C++), taking and
    # returning blocks concurrently; a small limit makes them also evict and free blocks.
    ops = block_cache
    ops.set_cpu_block_cache_limit(24 * MiB)
    q, k, v, grad_out = _random_inputs(CACHED_SHAPE, torch.float32)
    want = _forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float32)

    def run(_: int) -> list[torch.Tensor]:
        results = None
        for _ in range(4):
            results = _forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
        return results

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for got in pool.map(run, range(4)):
            for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), got, want, strict=True):
                torch.testing.assert_close(a, b, msg=name)
    assert ops.cpu_block_cache_bytes() <= 24 * MiB


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


# --- registrations: opcheck, torch.compile, autocast -----------------------------------------


def test_opcheck_forward(extension: None) -> None:
    q, k, v, _ = _random_inputs((2, 3, 5, 4, 6), torch.float32)
    torch.library.opcheck(torch.ops.dpt_fast.class_aware_attention.default, (q, k, v, 0.5))
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dpt_fast.class_aware_attention.default, (*leaves, 0.5))


def test_opcheck_backward(extension: None) -> None:
    q, k, v, grad_out = _random_inputs((2, 3, 5, 4, 6), torch.float32)
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
    torch.library.opcheck(
        torch.ops.dpt_fast.class_aware_attention_backward.default,
        (grad_out, q, k, v, out, lse, 0.5),
    )


def _compiled_loss_and_grads(backend: str) -> None:
    q, k, v, grad_out = _random_inputs((2, 3, 5, 8, 6), torch.float32)

    def loss(q, k, v):
        return (class_aware_attention(q, k, v) * grad_out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*got).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (class_aware_attention_ref(*ref) * grad_out).sum().backward()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph(extension: None) -> None:
    """Dynamo + AOT autograd trace the op through its fake kernels without graph breaks."""
    _compiled_loss_and_grads("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor(extension: None) -> None:
    """Same with inductor (about 20 s on a cold compile cache)."""
    _compiled_loss_and_grads("inductor")


def test_mixed_dtypes_promote() -> None:
    q, k, v, _ = _random_inputs((2, 3, 5, 4, 6), torch.float32)
    out = class_aware_attention(q.bfloat16(), k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, class_aware_attention(q.bfloat16().float(), k, v))


def test_cpu_autocast_uses_autocast_dtype() -> None:
    q, k, v, _ = _random_inputs((2, 3, 5, 4, 6), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = class_aware_attention(q, k.bfloat16(), v)
    assert out.dtype == torch.bfloat16
    expected = class_aware_attention_ref(q.double(), k.bfloat16().double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_raw_op_ignores_autocast(extension: None) -> None:
    """The kernels' internal products keep their dtypes when the caller has autocast on."""
    q, k, v, grad_out = _random_inputs((2, 3, 5, 4, 6), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
        grads = torch.ops.dpt_fast.class_aware_attention_backward(grad_out, q, k, v, out, lse, 0.5)
    assert out.dtype == lse.dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in grads)
    torch.testing.assert_close(out, class_aware_attention_ref(q, k, v, 0.5))


def test_fallback_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension the wrapper runs the composition, differentiably."""
    monkeypatch.setattr(_extension, "extension_available", lambda: False)
    assert not caa_module._has_fused_kernel(torch.empty(1))
    _assert_close_to_oracle(class_aware_attention, (2, 3, 5, 4, 6), torch.float32)
    _assert_close_to_oracle(class_aware_attention, (2, 3, 5, 4, 6), torch.bfloat16)


# --- bad inputs --------------------------------------------------------------------------------


def _good_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, _ = _random_inputs((2, 3, 5, 8, 6), torch.float32)
    return q, k, v


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda q, k, v: (q[0], k, v), r"q must have rank 3 with shape \(B, K, dk\), got rank 2"),
        (lambda q, k, v: (q, k[..., None], v), r"k must have rank 3 with shape \(B, M, dk\)"),
        (
            lambda q, k, v: (q, torch.cat([k, k]), v),
            r"k must have shape \(B, M, dk\) = \(2, \?, 8\) matching q, got \(4, 5, 8\)",
        ),
        (
            lambda q, k, v: (q, k[..., :4], v),
            r"k must have shape \(B, M, dk\) = \(2, \?, 8\) matching q, got \(2, 5, 4\)",
        ),
        (
            lambda q, k, v: (q, k, v[:, :4]),
            r"v must have shape \(B, M, dv\) = \(2, 5, \?\) matching q and k, got \(2, 4, 6\)",
        ),
        (lambda q, k, v: (q, k.double(), v), r"q, k and v must have the same dtype"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), r"at least one key \(M >= 1\)"),
        (
            lambda q, k, v: (q.int(), k.int(), v.int()),
            r"must be float32, float64, bfloat16 or float16, got Int",
        ),
    ],
    ids=["q-rank", "k-rank", "batch", "dk", "M", "dtype", "M0", "int"],
)
def test_forward_rejects_bad_inputs(extension: None, change, match: str) -> None:
    q, k, v = change(*_good_inputs())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dpt_fast.class_aware_attention(q, k, v, 1.0)


def test_wrapper_rejects_bad_shapes(extension: None) -> None:
    q, k, v = _good_inputs()
    with pytest.raises(RuntimeError, match=r"v must have shape \(B, M, dv\)"):
        class_aware_attention(q, k, v[:, :4])
    with pytest.raises(RuntimeError, match=r"at least one key"):
        class_aware_attention(q, k[:, :0], v[:, :0])


def test_backward_rejects_bad_inputs(extension: None) -> None:
    q, k, v = _good_inputs()
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 1.0)
    backward = torch.ops.dpt_fast.class_aware_attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(B, K, dv\) = \(2, 3, 6\)"):
        backward(out[:, :2], q, k, v, out, lse, 1.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(B, K\) = \(2, 3\)"):
        backward(out, q, k, v, out, lse[:, :2], 1.0)
    with pytest.raises(RuntimeError, match=r"lse must be Float for Float inputs, got Double"):
        backward(out, q, k, v, out, lse.double(), 1.0)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have q's dtype"):
        backward(out.double(), q, k, v, out, lse, 1.0)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.fixture
def cuda_kernels(extension: None) -> None:
    """Fails when this CUDA machine runs a build without the CUDA kernels."""
    if not _extension.cuda_kernels_available():
        pytest.fail("dpt_fast._C was built without CUDA kernels on a machine with a GPU")


@pytest.fixture
def nan_filled_memory() -> Iterator[None]:
    """Every new tensor starts as NaN, so an output element a kernel never writes shows up.

    PyTorch's deterministic mode fills uninitialised memory (``at::empty``, including the
    kernels' own outputs and temporaries) with NaN; warn_only keeps ops without a deterministic
    implementation (cuBLAS without CUBLAS_WORKSPACE_CONFIG) running. Restored afterwards.
    """
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# The CUDA grid adds shapes for the kernels' edges: dv % 4 != 0 (general path), K = 16 (largest
# fused tile), M not a multiple of the 32-key backward tile, dv = 1024 (over 48 KiB of shared
# memory in the fused backward), the fused backward's 8-row tile with dk and M tails, and the
# narrowest fused dv.
CUDA_SHAPES = [
    *SHAPES,
    (2, 16, 70, 32, 1024),
    (2, 10, 207, 32, 1024),
    (1, 12, 129, 40, 96),
    (2, 7, 45, 7, 12),
    (2, 3, 33, 5, 4),
]
CUDA_SHAPE_IDS = [*SHAPE_IDS, "K16-dv1024", "dpt-dv1024", "K12-M129", "K7-dk7", "dk5-dv4"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=CUDA_SHAPE_IDS)
def test_cuda_matches_float64_oracle(
    cuda_kernels: None, nan_filled_memory: None, shape, dtype: torch.dtype
) -> None:
    _assert_close_to_oracle(class_aware_attention, shape, dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_float64_and_gradcheck(cuda_kernels: None) -> None:
    _assert_close_to_oracle(class_aware_attention, (3, 10, 207, 32, 64), torch.float64, "cuda")
    q, k, v, _ = _random_inputs((2, 3, 5, 4, 8), torch.float64, "cuda")
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: class_aware_attention(q, k, v, 0.7), inputs)


@pytest.mark.cuda
def test_cuda_lse_and_no_nan_in_poisoned_outputs(
    cuda_kernels: None, nan_filled_memory: None
) -> None:
    q, k, v, grad_out = _random_inputs((4, 10, 207, 32, 768), torch.bfloat16, "cuda")
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.25)
    grads = torch.ops.dpt_fast.class_aware_attention_backward(grad_out, q, k, v, out, lse, 0.25)
    for tensor in (out, lse, *grads):
        assert not tensor.isnan().any()
    expected = torch.logsumexp((q.double() @ k.double().transpose(1, 2)) * 0.25, dim=-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_deterministic(cuda_kernels: None, dtype: torch.dtype) -> None:
    q, k, v, grad_out = _random_inputs((8, 10, 207, 32, 768), dtype, "cuda")
    first = _forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    second = _forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_dispatches_to_cuda_kernels(cuda_kernels: None) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::class_aware_attention", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention_backward", "CUDA"
    )
    q, k, v, grad_out = _random_inputs((2, 10, 207, 32, 768), torch.bfloat16, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = class_aware_attention(*leaves)
        out.backward(grad_out)
        torch.cuda.synchronize()
    assert out.device.type == "cuda"
    kernels = {event.name for event in prof.events()}
    for name in ("caa_softmax_lse_kernel", "caa_pv_kernel", "caa_backward_fused_kernel"):
        assert any(name in kernel for kernel in kernels), f"{name} not in {sorted(kernels)}"


@pytest.mark.cuda
def test_cuda_opcheck(cuda_kernels: None) -> None:
    q, k, v, grad_out = _random_inputs((2, 3, 40, 8, 16), torch.float32, "cuda")
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dpt_fast.class_aware_attention.default, (*leaves, 0.5))
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
    torch.library.opcheck(
        torch.ops.dpt_fast.class_aware_attention_backward.default,
        (grad_out, q, k, v, out, lse, 0.5),
    )


@pytest.mark.cuda
def test_cuda_autocast_mixed_dtypes(cuda_kernels: None) -> None:
    q, k, v, _ = _random_inputs((2, 10, 207, 32, 768), torch.float32, "cuda")
    leaves = [q.requires_grad_(), k.half().requires_grad_(), v.requires_grad_()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = class_aware_attention(*leaves)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == leaf.dtype for leaf in leaves)
    expected = class_aware_attention_ref(q.double(), k.bfloat16().double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_raw_op_ignores_autocast(cuda_kernels: None) -> None:
    # dv = 7 takes the general path, whose cuBLAS products must stay in float32.
    for shape in [(2, 10, 207, 32, 768), (2, 5, 9, 7, 7)]:
        q, k, v, grad_out = _random_inputs(shape, torch.float32, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
            grads = torch.ops.dpt_fast.class_aware_attention_backward(
                grad_out, q, k, v, out, lse, 0.5
            )
        assert out.dtype == lse.dtype == torch.float32
        assert all(grad.dtype == torch.float32 for grad in grads)
        expected = class_aware_attention_ref(q.double(), k.double(), v.double(), 0.5)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices(cuda_kernels: None) -> None:
    q, k, v = _good_inputs()
    with pytest.raises(RuntimeError, match=r"q, k and v must be on the same device"):
        torch.ops.dpt_fast.class_aware_attention(q.cuda(), k, v.cuda(), 1.0)
