// A small process-wide cache of large CPU memory blocks for the class-aware attention op's
// results and temporaries (dq, dk, dv, out, the float32 copies of low-precision inputs).
//
// Why: a result the op returns must be a new tensor, and a large new allocation is memory the
// kernel faults in and zero-fills page by page (past glibc's mmap threshold always, below it
// whenever free() trimmed the heap), which costs more than the product that fills it. A training
// loop frees each step's gradients before the next step's backward pass, so their blocks come
// back here and the next call reuses them, as CUDA's caching allocator does for GPU memory.
// Measurements: benchmarks/results/NOTES.md.
//
// Requests of at least kCachedMinBytes go through the cache; it keeps at most limit() bytes
// (1 GiB by default) in at most 16 blocks, evicting the oldest to make room for a block coming
// back, so memory beyond a few results' worth always goes back to the system and blocks of sizes
// no longer used leave. empty_cache() frees every cached block. When an allocation fails (where
// the system reports that rather than killing the process, e.g. under ulimit -v), the cached
// blocks are freed and the allocation retried. Allocations show in torch.profiler's memory
// profile like those of c10's CPU allocator; a fork()ed child starts with an empty cache. Under
// torch.use_deterministic_algorithms with fill_uninitialized_memory, new tensors are NaN-filled
// as at::empty's are.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace dpt_fast::cpu_block_cache {

// Requests below this size skip the cache (glibc's heap serves those well).
inline constexpr int64_t kCachedMinBytes = int64_t{4} << 20;

// An uninitialised contiguous CPU tensor, like at::empty(sizes, dtype). With at least
// kCachedMinBytes its memory is a cached block where one fits (at least the size, at most twice
// it), else a new one; when the tensor's storage is freed the block returns to the cache.
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Bytes the cache holds now (blocks not in use by any tensor).
int64_t cached_bytes();

// Most bytes the cache keeps; set_limit frees blocks (oldest first) until it holds no more than
// `bytes`. 0 turns caching off.
int64_t limit();
void set_limit(int64_t bytes);

// Frees every cached block (tensors in use keep theirs; those return to the cache when freed).
void empty_cache();

}  // namespace dpt_fast::cpu_block_cache
