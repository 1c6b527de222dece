// CPU kernels of the class-aware attention op (see class_aware_attention.h).
//
// They widen the inputs once to the accumulation type (float32, or float64 for float64 inputs)
// and keep every intermediate in it; only the outputs are rounded to the input dtype. The
// matrix products go to ATen's batched BLAS (MKL, OpenBLAS, ...), which beats hand-written loops
// for them, fused per-batch loops included; the softmax, lse and dS stages are our vectorised
// row loops (class_aware_attention_cpu_rows.h), at::parallel_for over the B·K rows (BLAS calls
// inside at::parallel_for would oversubscribe the cores, hence two levels). Large results and
// widened copies take their memory from the CPU block cache (cpu_block_cache.h), so a training
// loop reuses last step's memory instead of faulting in fresh pages.

#include "class_aware_attention.h"
#include "class_aware_attention_cpu_rows.h"
#include "cpu_block_cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace dpt_fast {
namespace {

// Rows per at::parallel_for task: enough elements that a task outweighs its scheduling.
int64_t grain_rows(int64_t row_length) {
  constexpr int64_t kTaskElements = 1 << 15;
  return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, row_length));
}

// t in the accumulation dtype `acc`: t itself when it has it, else a float32/float64 copy in
// memory from the CPU block cache, as the kernels widen low-precision inputs once.
at::Tensor widened(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc) {
    return t;
  }
  return cpu_block_cache::empty(t.sizes(), acc).copy_(t);
}

// a (B, n, p) · b (B, p, m) -> (B, n, m) in a's dtype, in memory from the CPU block cache.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor result = cpu_block_cache::empty({a.size(0), a.size(1), b.size(2)}, a.scalar_type());
  at::bmm_out(result, a, b);
  return result;
}

// product(a, b) rounded to `dtype`: a result the op returns.
at::Tensor product_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype) {
  at::Tensor result = product(a, b);
  if (result.scalar_type() == dtype) {
    return result;
  }
  return cpu_block_cache::empty(result.sizes(), dtype).copy_(result);
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
      cpu_rows::softmax_rows(p_ptr, lse_ptr, begin, end, s.M, static_cast<scalar_t>(scale));
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
      cpu_rows::softmax_backward_rows(p_ptr, ds_ptr, lse_ptr, go_ptr, out_ptr, begin, end, s.M,
                                      s.dv, static_cast<scalar_t>(scale));
    });
  });
  const at::ScalarType dtype = q_in.scalar_type();
  return {product_as(dscores, k, dtype),                 // dq = dS · k
          product_as(dscores.transpose(1, 2), q, dtype),  // dk = dSᵀ · q
          product_as(probs.transpose(1, 2), go, dtype)};  // dv = Pᵀ · grad_out
}

}  // namespace
}  // namespace dpt_fast

TORCH_LIBRARY_IMPL(dpt_fast, CPU, m) {
  m.impl("class_aware_attention", &dpt_fast::forward_cpu);
  m.impl("class_aware_attention_backward", &dpt_fast::backward_cpu);
}
