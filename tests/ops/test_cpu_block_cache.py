"""Tests of the CPU block cache of dpt_fast._C (csrc/cpu_block_cache.h), through the class-aware
attention op whose CPU kernels take their large buffers from it, and its controls in
``dpt_fast.ops`` (cpu_block_cache_bytes, cpu_block_cache_limit, set_cpu_block_cache_limit,
empty_cpu_block_cache).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from class_aware_attention_checks import RESULT_NAMES, forward_backward, random_inputs

from dpt_fast.ops import class_aware_attention, class_aware_attention_ref

# grad_v of this shape has 9 MiB in float32 (a 10 MiB block), 4.5 MiB in bfloat16: both go through
# the CPU block cache; every other buffer of it is below the cache's 4 MiB.
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
def test_large_results_reuse_cached_memory(block_cache, dtype: torch.dtype) -> None:
    # grad_v's memory returns to the cache when it is freed, and the next call of that size gets
    # it back instead of faulting in fresh pages.
    ops = block_cache
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, dtype)
    want = forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float32)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    first = forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    grad_v_address = first[3].data_ptr()
    assert first[3].nbytes >= 4 * MiB
    del first
    held = ops.cpu_block_cache_bytes()
    assert held >= 4 * MiB  # grad_v's block (bfloat16: also the float32 copy of v and float32 dv)
    second = forward_backward(class_aware_attention, q, k, v, grad_out, dtype)
    assert second[3].data_ptr() == grad_v_address
    assert ops.cpu_block_cache_bytes() < held  # grad_v's block is in use again
    for name, a, b in zip(RESULT_NAMES, second, want, strict=True):
        torch.testing.assert_close(a.float(), b, msg=name, **tolerance)


def test_block_cache_never_hands_out_memory_in_use(block_cache) -> None:
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, torch.float32)
    first = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    kept = [t.clone() for t in first]
    second = forward_backward(class_aware_attention, q, k, v, 2 * grad_out, torch.float32)
    assert first[3].data_ptr() != second[3].data_ptr()
    for name, a, b in zip(RESULT_NAMES, first, kept, strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(second[3], 2 * first[3])


def test_block_cache_limit_and_emptying(block_cache) -> None:
    ops = block_cache
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, torch.float32)
    forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() == 10 * MiB  # grad_v's 9 MiB, in 2 MiB granules
    ops.empty_cpu_block_cache()
    assert ops.cpu_block_cache_bytes() == 0
    ops.set_cpu_block_cache_limit(0)  # caching off: freed blocks go straight back to the system
    assert ops.cpu_block_cache_limit() == 0
    forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() == 0
    ops.set_cpu_block_cache_limit(64 * MiB)
    grad_v = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)[3]
    ops.empty_cpu_block_cache()  # grad_v keeps its block, which comes back when it is freed
    assert ops.cpu_block_cache_bytes() == 0
    del grad_v
    assert ops.cpu_block_cache_bytes() == 10 * MiB
    ops.set_cpu_block_cache_limit(MiB)  # lowering the limit frees what is above it
    assert ops.cpu_block_cache_bytes() == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ops.set_cpu_block_cache_limit(-1)


def test_block_cache_evicts_the_oldest_block_for_a_new_size(block_cache) -> None:
    # A block of a new size evicts the oldest rather than being refused, so blocks of a size no
    # longer in use (an earlier batch size) do not hold the cache for good.
    ops = block_cache
    ops.set_cpu_block_cache_limit(20 * MiB)
    first = random_inputs(CACHED_SHAPE, torch.float32)
    forward_backward(class_aware_attention, *first, torch.float32)
    assert ops.cpu_block_cache_bytes() == 10 * MiB
    wider = random_inputs((2, 3, 2048, 8, 1152), torch.float32)  # grad_v: 18 MiB
    forward_backward(class_aware_attention, *wider, torch.float32)
    assert ops.cpu_block_cache_bytes() == 18 * MiB


def test_block_cache_results_are_ordinary_tensors(block_cache) -> None:
    # Storages from the cache resize, save, load and clone lazily like any CPU tensor's.
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, torch.float32)
    grad_v = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)[3]
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
def test_block_cache_in_a_forked_child(block_cache) -> None:
    # A fork()ed child (a DataLoader worker) starts with an empty cache of the same limit: the
    # parent's lock may have been held by another thread at the fork.
    ops = block_cache
    ops.set_cpu_block_cache_limit(32 * MiB)
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, torch.float32)
    forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
    assert ops.cpu_block_cache_bytes() > 0
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            signal.alarm(60)  # a deadlock kills the child (and fails the test), not CI
            torch.set_num_threads(1)
            fresh = ops.cpu_block_cache_bytes() == 0 and ops.cpu_block_cache_limit() == 32 * MiB
            forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
            status = 0 if fresh and ops.cpu_block_cache_bytes() == 10 * MiB else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_block_cache_under_concurrent_calls(block_cache) -> None:
    # Four threads run forward + backward at once (the op releases the GIL in C++), taking and
    # returning blocks concurrently; a small limit makes them also evict and free blocks.
    ops = block_cache
    ops.set_cpu_block_cache_limit(24 * MiB)
    q, k, v, grad_out = random_inputs(CACHED_SHAPE, torch.float32)
    want = forward_backward(class_aware_attention_ref, q, k, v, grad_out, torch.float32)

    def run(_: int) -> list[torch.Tensor]:
        results = None
        for _ in range(4):
            results = forward_backward(class_aware_attention, q, k, v, grad_out, torch.float32)
        return results

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for got in pool.map(run, range(4)):
            for name, a, b in zip(RESULT_NAMES, got, want, strict=True):
                torch.testing.assert_close(a, b, msg=name)
    assert ops.cpu_block_cache_bytes() <= 24 * MiB
