"""Controls of the CPU block cache of ``dpt_fast._C`` (``csrc/cpu_block_cache.h``).

The CPU kernels take their buffers of 4 MiB and up (results such as dq, dk, dv and out, the
float32 copies of low-precision inputs, the score temporaries) from a small process-wide cache,
and those blocks return to it when the tensors are freed: a training loop then reuses last
step's memory instead of faulting in fresh pages, as CUDA's caching allocator does on a GPU
(measurements: ``benchmarks/results/NOTES.md``). The cache keeps at most its limit of unused
blocks (1 GiB by default). Without the extension nothing is cached: these functions then report
0 and change nothing.
"""

from __future__ import annotations

from dpt_fast.ops import _extension


def cpu_block_cache_bytes() -> int:
    """Bytes of unused memory the CPU block cache holds now."""
    if not _extension.extension_available():
        return 0
    return int(_extension.extension_module()._cpu_block_cache_bytes())


def cpu_block_cache_limit() -> int:
    """Most bytes of unused memory the CPU block cache keeps (1 GiB unless set)."""
    if not _extension.extension_available():
        return 0
    return int(_extension.extension_module()._cpu_block_cache_limit())


def set_cpu_block_cache_limit(max_bytes: int) -> None:
    """Sets the CPU block cache's limit in bytes (0 turns caching off); frees blocks above it."""
    if max_bytes < 0:
        raise ValueError(f"set_cpu_block_cache_limit: max_bytes must be >= 0, got {max_bytes}")
    if _extension.extension_available():
        _extension.extension_module()._set_cpu_block_cache_limit(int(max_bytes))


def empty_cpu_block_cache() -> None:
    """Frees every unused block of the CPU block cache, as ``torch.cuda.empty_cache`` does.

    Blocks that tensors still hold return to the cache when those tensors are freed.
    """
    if _extension.extension_available():
        _extension.extension_module()._empty_cpu_block_cache()
