// Fresh CPU tensors for the op's large results (dv, dk, out), advised onto transparent huge pages.
//
// Why: a result the op returns must be a new allocation, and a large new allocation is usually
// memory the kernel has to fault in and zero 4 KiB at a time: past glibc's mmap threshold (at
// most 32 MiB) always a fresh mapping, below it often heap memory that free() trimmed off and
// malloc grows back. For dv at B = 256 (163 MB) those 40 000 faults took about a third of the CPU
// backward pass, and at B = 32 (20 MB) a few thousand per call, depending on the heap's state;
// on 2 MiB pages they are a hundred times fewer. PyTorch does the same for every tensor of 2 MiB
// or more under THP_MEM_ALLOC_ENABLE=1; this applies it to the op's own results only, whatever
// that setting.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace dpt_fast::cpu {

// Tensors at least this large are advised: two huge pages, so that the 2 MiB-aligned interior
// always holds at least one whole huge page.
inline constexpr int64_t kHugePageAdviceBytes = int64_t{4} << 20;

// An uninitialised contiguous tensor like at::empty(sizes, options). On Linux, when it has at
// least kHugePageAdviceBytes, its 2 MiB-aligned interior is advised MADV_HUGEPAGE before the op
// writes it, so the kernel may back it with huge pages. Advice only: where THP is off or no huge
// page is free, pages stay 4 KiB; memory already faulted in stays as it is until khugepaged
// merges it.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether this build and platform advise huge pages at all (Linux with MADV_HUGEPAGE), for tests.
bool huge_page_advice_supported();

}  // namespace dpt_fast::cpu
