// Shared pieces of the CUDA kernels of the class-aware attention op
// (class_aware_attention_cuda_forward.cu, class_aware_attention_cuda_backward.cu): device helpers,
// launch helpers and the constants both passes use.
//
// DPT runs the op with K = 10 class queries over M = 207 tokens, dk = 32 and dv = 768/1024:
// every batch element's K rows fit in one block, the work is dominated by streaming v (forward)
// and v, dv (backward), and the launch count matters as much as bandwidth at small B; hence a few
// fused kernels per pass, working on tiles of KT rows. Everything accumulates in float32 (float64
// for float64 inputs); no atomics, so results are bitwise reproducible.
//
// One source for nvcc and for the CPU emulation of the kernels (csrc/cuda_emulation,
// docs/cuda-emulation.md), which compiles these files with g++ and DPT_FAST_CUDA_EMULATION
// defined: the kernels take global memory as GlobalPtr<T>, declare shared memory as
// SharedArray<T, N...> and DPT_DYNAMIC_SHARED, make vector accesses through pack_at and are
// launched by launch_kernel. Under nvcc these are plain pointers, arrays, reinterpret_cast and
// <<<...>>>, token for token what the code spelled before; the emulation makes them bounds-checked
// and runs the threads as fibers.
#pragma once

#include "class_aware_attention.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

namespace dpt_fast::caa_cuda {

#ifdef DPT_FAST_CUDA_EMULATION
template <typename T>
using GlobalPtr = cuda_emu::CheckedPtr<T>;
template <typename T, int... N>
using SharedArray = cuda_emu::SharedArray<T, N...>;
#define DPT_DYNAMIC_SHARED(type, name) \
  const cuda_emu::CheckedPtr<type> name = cuda_emu::dynamic_shared_array<type>()
using cuda_emu::launch_kernel;
#else
// A kernel parameter pointing to global memory.
template <typename T>
using GlobalPtr = T*;

// T[N0][N1]...: the type of a __shared__ array.
template <typename T, int... N>
struct ArrayOf;
template <typename T>
struct ArrayOf<T> {
  using type = T;
};
template <typename T, int N0, int... N>
struct ArrayOf<T, N0, N...> {
  using type = typename ArrayOf<T, N...>::type[N0];
};
template <typename T, int... N>
using SharedArray = typename ArrayOf<T, N...>::type;

// The kernel's dynamic shared memory as `type name[]`.
#define DPT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

// kernel<<<grid, block, shared_bytes, stream>>>(args...): one launch syntax for both builds.
template <auto kernel, typename... Args>
void launch_kernel(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
}
#endif

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

// Largest row tile of the fused kernels (caa_limits::kMaxFusedRows). K above it: several tiles in
// the forward pass, the general path in the backward pass.
inline constexpr int kMaxRowTile = caa_limits::kMaxFusedRows;

inline constexpr int kElementwiseThreads = 256;

// ---------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Merges softmax statistics (running max, sum of exp(s − max)) of b into a.
template <typename T>
__device__ __forceinline__ void merge_softmax_stats(T& max_a, T& sum_a, T max_b, T sum_b) {
  const T new_max = max_a > max_b ? max_a : max_b;
  if (new_max == -std::numeric_limits<T>::infinity()) {
    return;  // both empty
  }
  sum_a = sum_a * acc_exp(max_a - new_max) + sum_b * acc_exp(max_b - new_max);
  max_a = new_max;
}

// N consecutive elements as one aligned memory access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// The N elements at p (aligned to N elements) as one Pack, for one vector load or store.
#ifdef DPT_FAST_CUDA_EMULATION
template <int N, typename T>
auto& pack_at(const cuda_emu::CheckedPtr<T>& p) {
  using P = std::conditional_t<std::is_const_v<T>, const Pack<std::remove_const_t<T>, N>,
                               Pack<T, N>>;
  return cuda_emu::view_as<P>(p, N);
}
#else
template <int N, typename T>
__device__ __forceinline__ auto& pack_at(T* p) {
  using P = std::conditional_t<std::is_const_v<T>, const Pack<std::remove_const_t<T>, N>,
                               Pack<T, N>>;
  return *reinterpret_cast<P*>(p);
}
#endif

// Loads N consecutive scalar_t at src (aligned to N elements) as float.
template <int N, typename scalar_t>
__device__ __forceinline__ void load_as_float(GlobalPtr<const scalar_t> src, float (&dst)[N]) {
  const Pack<scalar_t, N> pack = pack_at<N>(src);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    dst[e] = static_cast<float>(pack.val[e]);
  }
}

// Stores N floats at dst (aligned to N elements) rounded to scalar_t.
template <int N, typename scalar_t>
__device__ __forceinline__ void store_from_float(GlobalPtr<scalar_t> dst,
                                                 const float (&src)[N]) {
  Pack<scalar_t, N> pack;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    pack.val[e] = static_cast<scalar_t>(src[e]);
  }
  pack_at<N>(dst) = pack;
}

// ---------------------------------------------------------------------------------------------
// Host helpers.
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The stream PyTorch is using on the current device (what at::cuda::getCurrentCUDAStream
// returns; ATen/cuda/CUDAContext.h is avoided since it needs the cuBLAS/cuSPARSE headers,
// which a toolkit-only install may lack).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Calls f(std::integral_constant<int, KT>) with the smallest row tile KT >= min(K, kMaxRowTile).
template <typename F>
void dispatch_row_tile(int64_t K, F&& f) {
  if (K <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (K <= 8) {
    f(std::integral_constant<int, 8>{});
  } else if (K <= 12) {
    f(std::integral_constant<int, 12>{});
  } else {
    f(std::integral_constant<int, kMaxRowTile>{});
  }
}

inline int row_tile_for(int64_t K) {
  int tile = 0;
  dispatch_row_tile(K, [&](auto kt) { tile = decltype(kt)::value; });
  return tile;
}

// Whether the fused kernels take this dtype (caa_limits::kFusedDtypes; they accumulate in float32,
// so only dtypes whose opmath type is float can be listed there).
inline bool is_fused_dtype(at::ScalarType dtype) {
  for (const at::ScalarType fused : caa_limits::kFusedDtypes) {
    if (fused == dtype) {
      return true;
    }
  }
  return false;
}

inline bool is_aligned(const at::Tensor& t, int elements) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * elements) == 0;
}

// The kernels index with int and launch grids whose y and z sizes are at most 65535.
inline void check_launch_sizes(const AttentionSizes& s) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  constexpr int64_t kGridYZMax = 65535;
  TORCH_CHECK(s.B <= kIntMax && s.M * s.dv <= kIntMax && s.M * s.dk <= kIntMax &&
                  s.K * s.dv <= kIntMax && s.K * s.M <= kIntMax,
              "class_aware_attention (CUDA): per-batch sizes must fit in int32, got B=", s.B,
              " K=", s.K, " M=", s.M, " dk=", s.dk, " dv=", s.dv);
  TORCH_CHECK(ceil_div(s.K, kMaxRowTile) <= kGridYZMax &&
                  ceil_div(s.dv, kWarpSize * caa_limits::kFusedVector) <= kGridYZMax,
              "class_aware_attention (CUDA): K=", s.K, " or dv=", s.dv, " is too large");
}

}  // namespace dpt_fast::caa_cuda

// Registers the op's CUDA kernels (the emulated build registers them as CPU kernels of its own
// namespace, dpt_fast_emulated: see csrc/cuda_emulation/cuda_emulation.h).
#ifndef DPT_FAST_CUDA_EMULATION
#define DPT_FAST_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(dpt_fast, CUDA, m)
#endif
