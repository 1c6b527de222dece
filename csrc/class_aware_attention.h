// Shared declarations of the class-aware attention op: the input checks and size bookkeeping
// used by both the CPU kernels (class_aware_attention.cpp) and the CUDA kernels
// (class_aware_attention_cuda.cu), so both backends reject bad inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>

namespace dpt_fast {

// Sizes of one call: q (B, K, dk), k (B, M, dk), v (B, M, dv), out (B, K, dv), lse (B, K).
struct AttentionSizes {
  int64_t B;
  int64_t K;
  int64_t M;
  int64_t dk;
  int64_t dv;
};

// Turns autocast off for the op's own ATen calls (at::bmm, casts). The op has no autocast kernel,
// so it runs with the caller's autocast state, which would otherwise make those calls return
// bfloat16/float16 where the kernels expect the accumulation dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// dtype of the saved log-sum-exp: float32, or float64 for float64 inputs (so gradients of
// float64 inputs stay exact to float64 precision, as gradcheck requires).
at::ScalarType lse_dtype_for(at::ScalarType input_dtype);

// Validates q, k, v of the forward op (rank, shared sizes, dtype, device, M >= 1) and returns
// the sizes. Errors name the argument and the expected shape.
AttentionSizes check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Validates the backward op's inputs: the forward checks plus grad_out and out (B, K, dv) in the
// input dtype, lse (B, K) in lse_dtype_for(dtype), all on q's device.
AttentionSizes check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse);

}  // namespace dpt_fast
