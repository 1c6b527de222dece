// The class-aware attention op of DPT's CAVPT module, shared by its CPU and CUDA kernels:
//
//   q (B, K, dk), k (B, M, dk), v (B, M, dv)
//   out (B, K, dv) = softmax(q kᵀ · scale, dim=-1) · v
//   lse (B, K)     = logsumexp(q kᵀ · scale, dim=-1), saved for the backward pass
//
// Files: class_aware_attention.cpp (schemas, input checks), class_aware_attention_cpu*.cpp
// (CPU kernels), class_aware_attention_cuda*.cu (CUDA kernels). The limits below are the one
// source of the kernels' capabilities; the extension reports them to Python
// (dpt_fast.ops.class_aware_attention.capabilities), where a test checks that both agree.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <cstdint>

namespace dpt_fast {

namespace caa_limits {

// Input dtypes of the CPU and CUDA kernels (q, k and v share one).
inline constexpr std::array<at::ScalarType, 4> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                                          at::kHalf};
// M >= kMinKeys: a softmax over zero keys is undefined.
inline constexpr int64_t kMinKeys = 1;
// The CUDA kernels' largest row tile. The forward pass tiles any K with it; the fused backward
// kernel takes K <= kMaxFusedRows, larger K runs the general backward.
inline constexpr int kMaxFusedRows = 16;
// The CUDA fused kernels load dv in vectors of this many elements: dv % kFusedVector == 0 and
// v, out, grad_out, grad_v aligned to kFusedVector elements, else the general path.
inline constexpr int kFusedVector = 4;
// Dtypes of the CUDA fused kernels (float32 accumulation); float64 takes the general path.
inline constexpr std::array<at::ScalarType, 3> kFusedDtypes = {at::kFloat, at::kBFloat16,
                                                               at::kHalf};
// Keys per block of the CUDA fused backward kernel.
inline constexpr int kBackwardKeyTile = 32;

}  // namespace caa_limits

// The op names (torch.ops.dpt_fast.*), which prefix error messages.
inline constexpr const char* kForwardName = "class_aware_attention";
inline constexpr const char* kBackwardName = "class_aware_attention_backward";

// The Python name of a dtype ("float32" for at::kFloat), for messages and for Python.
const char* python_dtype_name(at::ScalarType dtype);

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

// dtype of the saved log-sum-exp and of the accumulation: float32, or float64 for float64
// inputs (so gradients of float64 inputs stay exact to float64 precision, as gradcheck requires).
at::ScalarType lse_dtype_for(at::ScalarType input_dtype);

// Validates q, k, v of the forward op (rank, shared sizes, dtype, device, M >= kMinKeys) and
// returns the sizes. Errors name the argument and the expected shape.
AttentionSizes check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Validates the backward op's inputs: the forward checks plus grad_out and out (B, K, dv) in the
// input dtype, lse (B, K) in lse_dtype_for(dtype), all on q's device.
AttentionSizes check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse);

}  // namespace dpt_fast
