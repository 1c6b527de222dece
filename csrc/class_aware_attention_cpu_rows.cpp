// The row stages of the CPU class-aware attention kernels (see class_aware_attention_cpu_rows.h).
//
// Why our own exp: std::exp is a library call, so a loop around it stays scalar, and the
// softmax stages then cost several times ATen's (which uses SLEEF). exp_poly below is branch-free
// arithmetic (Cody-Waite range reduction and a degree-6 polynomial, as in Cephes' expf), so every
// loop that calls it vectorises. Its relative error is below 1 ulp for x <= 88.37 and below 6 ulp
// up to the overflow threshold (where n is clamped and r grows to ln 2); the softmax stages only
// call it with x <= 0. Reductions (max, sum, dot) vectorise through `omp simd reduction`
// (setup.py compiles with -fopenmp, or -fopenmp-simd without it).
//
// On x86-64 Linux with GCC >= 12 or Clang >= 18 (older ones reject or miscompile x86-64-v*
// clones) the float32 entry points are compiled three times (AVX-512, AVX2+FMA, baseline SSE2)
// and the loader picks the best one the CPU has (target_clones, through a glibc ifunc). Results
// therefore differ between machines in float32 rounding: the summation order follows the SIMD
// width, and the AVX clones contract multiply-adds into FMAs where SSE2 rounds twice.

#include "class_aware_attention_cpu_rows.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GLIBC__) &&                      \
    ((defined(__clang__) && __clang_major__ >= 18) || \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
#define DPT_FAST_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPT_FAST_SIMD_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DPT_FAST_INLINE inline __attribute__((always_inline))
#else
#define DPT_FAST_INLINE inline
#endif

namespace dpt_fast::cpu_rows {
namespace {

// exp(x) for float32 without library calls. exp(x) = 2^n · exp(r), n = round(x · log2 e),
// r = x − n · ln 2 in [−ln2/2, ln2/2], ln 2 split in two so that n · ln2_hi is exact.
DPT_FAST_INLINE float exp_poly(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  // Beyond these, exp(x) is below the smallest normal float (flushed to 0) or overflows.
  constexpr float kMinX = -87.33654475f;
  constexpr float kMaxX = 88.72283905f;
  float n = (x * kLog2e + kRound) - kRound;
  // Keeps 2^n a normal float, and maps a NaN n to a number so the int conversion is defined
  // (a NaN x still gives NaN through r below).
  n = !(n >= -126.0f) ? -126.0f : n;
  n = n > 127.0f ? 127.0f : n;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  float y = poly * r * r + r + 1.0f;
  y *= std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);  // · 2^n
  y = x < kMinX ? 0.0f : y;
  y = x > kMaxX ? std::numeric_limits<float>::infinity() : y;
  return y;
}

DPT_FAST_INLINE float exp_of(float x) { return exp_poly(x); }
DPT_FAST_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
DPT_FAST_INLINE T dot(const T* a, const T* b, int64_t len) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    sum += a[j] * b[j];
  }
  return sum;
}

// The stages, written once for both dtypes; the float entry points below inline them into each
// SIMD clone.
template <typename T>
DPT_FAST_INLINE void softmax_rows_impl(T* p, T* lse, int64_t begin, int64_t end, int64_t M,
                                       T scale) {
  for (int64_t r = begin; r < end; ++r) {
    T* row = p + r * M;
    T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
    for (int64_t m = 0; m < M; ++m) {
      row[m] *= scale;
      row_max = row[m] > row_max ? row[m] : row_max;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t m = 0; m < M; ++m) {
      row[m] = exp_of(row[m] - row_max);
      sum += row[m];
    }
    const T inv_sum = T(1) / sum;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) {
      row[m] *= inv_sum;
    }
    lse[r] = row_max + std::log(sum);
  }
}

template <typename T>
DPT_FAST_INLINE void softmax_backward_rows_impl(T* p, T* ds, const T* lse, const T* go,
                                                const T* out, int64_t begin, int64_t end,
                                                int64_t M, int64_t dv, T scale) {
  for (int64_t r = begin; r < end; ++r) {
    // D = rowsum(P ∘ dP), computed as rowsum(grad_out ∘ out): dv values instead of M.
    const T d = dot(go + r * dv, out + r * dv, dv);
    T* p_row = p + r * M;
    T* ds_row = ds + r * M;
    const T row_lse = lse[r];
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) {
      const T prob = exp_of(p_row[m] * scale - row_lse);
      p_row[m] = prob;
      ds_row[m] = scale * prob * (ds_row[m] - d);  // the score scale, folded in for dq and dk
    }
  }
}

}  // namespace

DPT_FAST_SIMD_CLONES
void softmax_rows(float* p, float* lse, int64_t begin, int64_t end, int64_t M, float scale) {
  softmax_rows_impl(p, lse, begin, end, M, scale);
}

void softmax_rows(double* p, double* lse, int64_t begin, int64_t end, int64_t M, double scale) {
  softmax_rows_impl(p, lse, begin, end, M, scale);
}

DPT_FAST_SIMD_CLONES
void softmax_backward_rows(float* p, float* ds, const float* lse, const float* go,
                           const float* out, int64_t begin, int64_t end, int64_t M, int64_t dv,
                           float scale) {
  softmax_backward_rows_impl(p, ds, lse, go, out, begin, end, M, dv, scale);
}

void softmax_backward_rows(double* p, double* ds, const double* lse, const double* go,
                           const double* out, int64_t begin, int64_t end, int64_t M, int64_t dv,
                           double scale) {
  softmax_backward_rows_impl(p, ds, lse, go, out, begin, end, M, dv, scale);
}

DPT_FAST_SIMD_CLONES
void exp_f32(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = exp_poly(x[i]);
  }
}

}  // namespace dpt_fast::cpu_rows
