// The Python module dpt_fast._C: importing it loads this library, whose static initialisers
// register the ops (torch.ops.dpt_fast.*); the module itself only reports on the build, controls
// the CPU block cache, reports the class-aware attention limits and holds hooks for tests.

#include "class_aware_attention.h"
#include "class_aware_attention_cpu_rows.h"
#include "cpu_block_cache.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <string>
#include <vector>

namespace dpt_fast {
namespace {

// Whether this build holds the CUDA kernels (setup.py defines DPT_FAST_WITH_CUDA for them).
bool has_cuda() {
#ifdef DPT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CPU kernels' float32 exp over a contiguous float32 CPU tensor, for accuracy tests.
at::Tensor exp_f32(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "_exp_f32: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  const at::Tensor src = x.contiguous();
  at::Tensor y = at::empty_like(src);
  cpu_rows::exp_f32(src.const_data_ptr<float>(), y.mutable_data_ptr<float>(), src.numel());
  return y;
}

// How many distinct threads at::parallel_for hands `tasks` one-element tasks to: a test that the
// CPU kernels really run on the intra-op threads (the build must compile them with OpenMP).
int64_t parallel_for_threads(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64));
  });
  return std::popcount(seen.load());
}

// The limits of class_aware_attention.h under the names of the Python capability table
// (dpt_fast.ops.class_aware_attention.capabilities), dtypes by their Python names.
pybind11::dict class_aware_attention_limits() {
  const auto names = [](const auto& dtypes) {
    std::vector<std::string> out;
    for (const at::ScalarType dtype : dtypes) {
      out.emplace_back(python_dtype_name(dtype));
    }
    return out;
  };
  pybind11::dict limits;
  limits["dtypes"] = names(caa_limits::kDtypes);
  limits["min_keys"] = caa_limits::kMinKeys;
  limits["cuda_fused_max_rows"] = caa_limits::kMaxFusedRows;
  limits["cuda_fused_vector"] = caa_limits::kFusedVector;
  limits["cuda_fused_dtypes"] = names(caa_limits::kFusedDtypes);
  limits["cuda_backward_key_tile"] = caa_limits::kBackwardKeyTile;
  return limits;
}

}  // namespace
}  // namespace dpt_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpt_fast C++/CUDA kernels; the ops live in torch.ops.dpt_fast.";
  m.def("has_cuda", &dpt_fast::has_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("_exp_f32", &dpt_fast::exp_f32, "The CPU kernels' float32 exp (for tests).");
  m.def("_cpu_block_cache_bytes", &dpt_fast::cpu_block_cache::cached_bytes,
        "Bytes of unused blocks the CPU block cache holds now.");
  m.def("_cpu_block_cache_limit", &dpt_fast::cpu_block_cache::limit,
        "Most bytes of unused blocks the CPU block cache keeps.");
  m.def("_set_cpu_block_cache_limit", &dpt_fast::cpu_block_cache::set_limit,
        pybind11::arg("bytes"),
        "Sets the CPU block cache's limit (0 turns it off), freeing blocks above it.");
  m.def("_empty_cpu_block_cache", &dpt_fast::cpu_block_cache::empty_cache,
        "Frees every unused block the CPU block cache holds.");
  m.def("_class_aware_attention_limits", &dpt_fast::class_aware_attention_limits,
        "The class-aware attention kernels' limits (class_aware_attention.h).");
  m.def("_parallel_for_threads", &dpt_fast::parallel_for_threads,
        "Distinct threads at::parallel_for uses for this many tasks (for tests).");
}
