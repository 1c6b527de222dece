// See huge_pages.h.

#include "huge_pages.h"

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dpt_fast::cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {
constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;
}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const auto nbytes = static_cast<int64_t>(t.nbytes());
  if (t.device().is_cpu() && nbytes >= kHugePageAdviceBytes) {
    const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (first + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    const uintptr_t end = (first + static_cast<uintptr_t>(nbytes)) & ~(kHugePageBytes - 1);
    if (end > begin) {
      // Advice: an error (a kernel without THP) changes nothing but the page size.
      (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    }
  }
  return t;
}

bool huge_page_advice_supported() { return true; }
#else
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

bool huge_page_advice_supported() { return false; }
#endif

}  // namespace dpt_fast::cpu
