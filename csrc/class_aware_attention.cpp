// Class-aware attention: the op schemas and the input checks its CPU and CUDA kernels share
// (see class_aware_attention.h), so both backends reject bad inputs with the same messages.

#include "class_aware_attention.h"

#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>

namespace dpt_fast {
namespace {

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
  return std::find(caa_limits::kDtypes.begin(), caa_limits::kDtypes.end(), dtype) !=
         caa_limits::kDtypes.end();
}

// "float32, float64, bfloat16 or float16".
std::string supported_dtype_names() {
  std::string names;
  const size_t n = caa_limits::kDtypes.size();
  for (size_t i = 0; i < n; ++i) {
    names += i == 0 ? "" : (i + 1 == n ? " or " : ", ");
    names += python_dtype_name(caa_limits::kDtypes[i]);
  }
  return names;
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
  TORCH_CHECK(is_supported_dtype(q.scalar_type()), op, ": q, k and v must be ",
              supported_dtype_names(), ", got ", q.scalar_type());

  const AttentionSizes s{q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(k.size(0) == s.B && k.size(2) == s.dk, op,
              ": k must have shape (B, M, dk) = (", s.B, ", ?, ", s.dk, ") matching q, got ",
              shape_str(k.sizes()));
  TORCH_CHECK(v.size(0) == s.B && v.size(1) == s.M, op,
              ": v must have shape (B, M, dv) = (", s.B, ", ", s.M, ", ?) matching q and k, got ",
              shape_str(v.sizes()));
  TORCH_CHECK(s.M >= caa_limits::kMinKeys, op, ": k and v must hold at least ",
              caa_limits::kMinKeys, " key (M >= ", caa_limits::kMinKeys,
              "), since a softmax over zero keys is undefined; got k of shape ",
              shape_str(k.sizes()));
  return s;
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                      at::IntArrayRef expected, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", dims, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

}  // namespace

const char* python_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    default:
      return c10::toString(dtype);
  }
}

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

}  // namespace dpt_fast

// The op's schemas. The CPU emulation of the CUDA kernels (csrc/cuda_emulation) compiles this file
// too and defines DPT_FAST_OPS_LIBRARY to declare them in its own namespace, dpt_fast_emulated.
#ifndef DPT_FAST_OPS_LIBRARY
#define DPT_FAST_OPS_LIBRARY(m) TORCH_LIBRARY(dpt_fast, m)
#endif

DPT_FAST_OPS_LIBRARY(m) {
  m.def(
      "class_aware_attention(Tensor q, Tensor k, Tensor v, float scale) "
      "-> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "class_aware_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
      {at::Tag::pt2_compliant_tag});
}
