// The row stages of the CPU class-aware attention kernels: the softmax with its log-sum-exp
// (forward) and the softmax backward (dS). The matrix products around them go to ATen's BLAS;
// these loops are the rest, and they are vectorised: float32 rows use a polynomial exp that the
// compiler turns into SIMD code (one copy per x86-64 level, picked at load time where the
// compiler supports it), float64 rows keep std::exp, exact enough for gradcheck.
#pragma once

#include <cstdint>

namespace dpt_fast::cpu_rows {

// Rows [begin, end) of p (rows, M): in, raw scores s = q kᵀ; out, P = softmax(s · scale).
// lse (rows,): lse[r] = logsumexp(s[r] · scale).
void softmax_rows(float* p, float* lse, int64_t begin, int64_t end, int64_t M, float scale);
void softmax_rows(double* p, double* lse, int64_t begin, int64_t end, int64_t M, double scale);

// Rows [begin, end) of the softmax backward, in place:
//   p  (rows, M): in, raw scores s = q kᵀ; out, P = exp(s · scale − lse) from the saved lse
//   ds (rows, M): in, dP = grad_out vᵀ;    out, dS = scale · P ∘ (dP − D), D = rowsum(go ∘ out)
// lse (rows,); go = grad_out and out (rows, dv). The score scale is folded into dS, so dq = dS k
// and dk = dSᵀ q need no further scaling.
void softmax_backward_rows(float* p, float* ds, const float* lse, const float* go,
                           const float* out, int64_t begin, int64_t end, int64_t M, int64_t dv,
                           float scale);
void softmax_backward_rows(double* p, double* ds, const double* lse, const double* go,
                           const double* out, int64_t begin, int64_t end, int64_t M, int64_t dv,
                           double scale);

// exp over n floats, x (n,) -> y (n,), with the float32 kernels' polynomial exp; for tests of
// its accuracy against std::exp (it may be called with x == y).
void exp_f32(const float* x, float* y, int64_t n);

}  // namespace dpt_fast::cpu_rows
