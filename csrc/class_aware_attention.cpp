// Class-aware attention of DPT's CAVPT module: the op schemas, the shared input checks, the CPU
// kernels and the Python module stub of dpt_fast._C.
//
//   q (B, K, dk), k (B, M, dk), v (B, M, dv)
//   out (B, K, dv) = softmax(q kᵀ · scale, dim=-1) · v
//   lse (B, K)     = logsumexp(q kᵀ · scale, dim=-1), saved for the backward pass
//
// The CPU kernels widen the inputs once to the accumulation type (float32, or float64 for float64
// inputs) and keep every intermediate in it; only the outputs are rounded to the input dtype.
// The softmax, lse and dS stages are our vectorised loops (class_aware_attention_cpu.cpp),
// at::parallel_for over the B·K rows; the matrix products go to ATen's batched BLAS (MKL,
// OpenBLAS, ...), which beat our hand-written loops for them on this project's CPUs, fused
// per-batch score/dq/dk loops included. (BLAS calls inside at::parallel_for would oversubscribe
// the cores, hence two levels.) Their large results and the widened copies live in memory from a
// small block cache (result_cache.h), so a training loop does not fault in fresh pages each call.

#include "class_aware_attention.h"
#include "class_aware_attention_cpu.h"
#include "result_cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>

namespace dpt_fast {

// ---------------------------------------------------------------------------------------------
// Input checks shared by the CPU and CUDA kernels.
// ---------------------------------------------------------------------------------------------
namespace {

constexpr const char* kForwardName = "class_aware_attention";
constexpr const char* kBackwardName = "class_aware_attention_backward";

// "(4, 207, 32)": PyTorch's own shape style, so messages read like Python errors.
std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    os << (i ? ", " : "") << sizes[i];
  }
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

void check_rank3(const char* op, const char* name, const at::Tensor& t, const char* dims) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have rank 3 with shape ", dims, ", got rank ",
              t.dim(), " with shape ", shape_str(t.sizes()));
}

// Rank, device, dtype and shared-size checks of q, k, v; `op` prefixes every message.
AttentionSizes check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v) {
  check_rank3(op, "q", q, "(B, K, dk)");
  check_rank3(op, "k", k, "(B, M, dk)");
  check_rank3(op, "v", v, "(B, M, dv)");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": q, k and v must be on the same device, got q on ", q.device(), ", k on ",
              k.device(), ", v on ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k and v must have the same dtype, got q ", q.scalar_type(), ", k ",
              k.scalar_type(), ", v ", v.scalar_type(),
              " (the Python wrapper dpt_fast.ops.class_aware_attention casts them for you)");
  TORCH_CHECK(is_supported_dtype(q.scalar_type()), op,
              ": q, k and v must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());

  const AttentionSizes s{q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(k.size(0) == s.B && k.size(2) == s.dk, op,
              ": k must have shape (B, M, dk) = (", s.B, ", ?, ", s.dk, ") matching q, got ",
              shape_str(k.sizes()));
  TORCH_CHECK(v.size(0) == s.B && v.size(1) == s.M, op,
              ": v must have shape (B, M, dv) = (", s.B, ", ", s.M, ", ?) matching q and k, got ",
              shape_str(v.sizes()));
  TORCH_CHECK(s.M >= 1, op,
              ": k and v must hold at least one key (M >= 1), since a softmax over zero keys is "
              "undefined; got k of shape ",
              shape_str(k.sizes()));
  return s;
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                      at::IntArrayRef expected, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", dims, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

}  // namespace

at::ScalarType lse_dtype_for(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

AttentionSizes check_forward_inputs(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v) {
  return check_qkv(kForwardName, q, k, v);
}

AttentionSizes check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse) {
  const AttentionSizes s = check_qkv(kBackwardName, q, k, v);
  const char* op = kBackwardName;
  check_same_shape(op, "grad_out", grad_out, {s.B, s.K, s.dv}, "(B, K, dv)");
  check_same_shape(op, "out", out, {s.B, s.K, s.dv}, "(B, K, dv)");
  check_same_shape(op, "lse", lse, {s.B, s.K}, "(B, K)");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              op, ": grad_out, out and lse must be on q's device ", q.device(), ", got ",
              grad_out.device(), ", ", out.device(), ", ", lse.device());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype_for(q.scalar_type()), op, ": lse must be ",
              lse_dtype_for(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
              lse.scalar_type());
  return s;
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.
// ---------------------------------------------------------------------------------------------
namespace {

// Rows per at::parallel_for task: enough elements that a task outweighs its scheduling.
int64_t grain_rows(int64_t row_length) {
  constexpr int64_t kTaskElements = 1 << 15;
  return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, row_length));
}

// t in the accumulation dtype `acc`: t itself when it has it, else a float32/float64 copy in
// cached memory (result_cache.h), as the kernels widen low-precision inputs once.
at::Tensor widened(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc) {
    return t;
  }
  return cpu::empty_cached(t.sizes(), acc).copy_(t);
}

// a (B, n, p) · b (B, p, m) -> (B, n, m) in a's dtype, in cached memory (result_cache.h).
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor result = cpu::empty_cached({a.size(0), a.size(1), b.size(2)}, a.scalar_type());
  at::bmm_out(result, a, b);
  return result;
}

// product(a, b) rounded to `dtype`: a result the op returns.
at::Tensor product_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype) {
  at::Tensor result = product(a, b);
  if (result.scalar_type() == dtype) {
    return result;
  }
  return cpu::empty_cached(result.sizes(), dtype).copy_(result);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, double scale) {
  const AttentionSizes s = check_forward_inputs(q_in, k_in, v_in);
  const NoAutocast no_autocast{};
  const at::ScalarType acc = lse_dtype_for(q_in.scalar_type());
  // Low-precision inputs are widened once, here.
  const at::Tensor q = widened(q_in, acc);
  const at::Tensor k = widened(k_in, acc);
  const at::Tensor v = widened(v_in, acc);
  at::Tensor lse = at::empty({s.B, s.K}, q.options());
  at::Tensor probs = product(q, k.transpose(1, 2));  // (B, K, M): scores, then P
  AT_DISPATCH_FLOATING_TYPES(acc, kForwardName, [&] {
    scalar_t* p_ptr = probs.mutable_data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.K, grain_rows(s.M), [&](int64_t begin, int64_t end) {
      cpu::softmax_rows(p_ptr, lse_ptr, begin, end, s.M, static_cast<scalar_t>(scale));
    });
  });
  return {product_as(probs, v, q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  const AttentionSizes s = check_backward_inputs(grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  const NoAutocast no_autocast{};
  const at::ScalarType acc = lse_in.scalar_type();
  // Our loops read grad_out and out row by row: .contiguous() also materialises an expanded
  // (stride-0) grad_out, e.g. the gradient of a sum().
  const at::Tensor go = widened(grad_out_in, acc).contiguous();
  const at::Tensor out = widened(out_in, acc).contiguous();
  const at::Tensor q = widened(q_in, acc);
  const at::Tensor k = widened(k_in, acc);
  const at::Tensor v = widened(v_in, acc);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor probs = product(q, k.transpose(1, 2));      // (B, K, M): scores, then P
  at::Tensor dscores = product(go, v.transpose(1, 2));  // (B, K, M): dP, then dS
  AT_DISPATCH_FLOATING_TYPES(acc, kBackwardName, [&] {
    scalar_t* p_ptr = probs.mutable_data_ptr<scalar_t>();
    scalar_t* ds_ptr = dscores.mutable_data_ptr<scalar_t>();
    const scalar_t* lse_ptr = lse.const_data_ptr<scalar_t>();
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.K, grain_rows(s.M + s.dv), [&](int64_t begin, int64_t end) {
      cpu::softmax_backward_rows(p_ptr, ds_ptr, lse_ptr, go_ptr, out_ptr, begin, end, s.M, s.dv,
                                 static_cast<scalar_t>(scale));
    });
  });
  const at::ScalarType dtype = q_in.scalar_type();
  return {product_as(dscores, k, dtype),                 // dq = dS · k
          product_as(dscores.transpose(1, 2), q, dtype),  // dk = dSᵀ · q
          product_as(probs.transpose(1, 2), go, dtype)};  // dv = Pᵀ · grad_out
}

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
  cpu::exp_f32(src.const_data_ptr<float>(), y.mutable_data_ptr<float>(), src.numel());
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

}  // namespace
}  // namespace dpt_fast

TORCH_LIBRARY(dpt_fast, m) {
  m.def(
      "class_aware_attention(Tensor q, Tensor k, Tensor v, float scale) "
      "-> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "class_aware_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(dpt_fast, CPU, m) {
  m.impl("class_aware_attention", &dpt_fast::forward_cpu);
  m.impl("class_aware_attention_backward", &dpt_fast::backward_cpu);
}

// `import dpt_fast._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpt_fast C++/CUDA kernels; the ops live in torch.ops.dpt_fast.";
  m.def("has_cuda", &dpt_fast::has_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("_exp_f32", &dpt_fast::exp_f32, "The CPU kernels' float32 exp (for tests).");
  m.def("_cpu_cache_bytes", &dpt_fast::cpu::cached_bytes,
        "Bytes the CPU result cache holds now.");
  m.def("_cpu_cache_limit", &dpt_fast::cpu::cache_limit,
        "Most bytes the CPU result cache keeps.");
  m.def("_set_cpu_cache_limit", &dpt_fast::cpu::set_cache_limit, pybind11::arg("bytes"),
        "Sets the CPU result cache's limit (0 turns it off), freeing blocks above it.");
  m.def("_release_cpu_cache", &dpt_fast::cpu::release_cache,
        "Frees every block the CPU result cache holds.");
  m.def("_parallel_for_threads", &dpt_fast::parallel_for_threads,
        "Distinct threads at::parallel_for uses for this many tasks (for tests).");
}
