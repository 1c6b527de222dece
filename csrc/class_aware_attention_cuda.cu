// CUDA kernels of the class-aware attention op (see class_aware_attention.cpp for the math).
//
//   q (B, K, dk), k (B, M, dk), v (B, M, dv) -> out (B, K, dv), lse (B, K)
//
// DPT runs this with K = 10 class queries over M = 207 tokens, dk = 32 and dv = 768/1024: every
// batch element's K rows fit in one block, the work is dominated by streaming v (forward) and
// v, dv (backward), and the launch count matters as much as bandwidth at small B. Hence:
//
// forward
//   1. caa_softmax_lse_kernel: scores, softmax and lse of a tile of KT query rows, one block per
//      (b, tile). Writes P (B, nT, M, KT) float: the KT probabilities of one key are contiguous,
//      so kernel 2 reads them with vector loads.
//   2. caa_pv_kernel: out = P · v. One block per (b, tile, 32·VEC columns of dv); its 8 warps
//      split the M keys, each lane owns VEC columns for all KT rows (coalesced loads along dv),
//      and the warps' partial sums are added in shared memory in a fixed order.
// backward (K <= 16 and dv % 4 == 0, the DPT case)
//   1. caa_row_dot_kernel: D = rowsum(grad_out ∘ out).
//   2. caa_backward_fused_kernel: one block per (b, 32 keys). Recomputes P from the saved lse,
//      then one pass over those rows of v gives dP = grad_out · vᵀ and dv = Pᵀ · grad_out
//      (grad_out of batch b is staged in shared memory), then dS = P ∘ (dP − D), dk = scale ·
//      dSᵀ · q and this block's share of dq = scale · dS · k.
//   3. caa_dq_reduce_kernel: dq = sum of the blocks' shares (fixed order: deterministic).
// other shapes and float64 use a general path: the same scores/softmax kernel and
// caa_softmax_grad_kernel for the softmax stages, cuBLAS (at::bmm) in float32/float64 for the
// products.
//
// Everything accumulates in float32 (float64 for float64 inputs); no atomics, so results are
// bitwise reproducible.

#include "class_aware_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace dpt_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Largest row tile of the fused kernels. K above it: several tiles in the forward pass, the
// general path in the backward pass.
constexpr int kMaxRowTile = 16;

// caa_softmax_lse_kernel: one thread per key in a chunk of kScoreThreads keys, dk in slices of
// kScoreDepth staged in shared memory.
constexpr int kScoreThreads = 128;
constexpr int kScoreWarps = kScoreThreads / kWarpSize;
constexpr int kScoreDepth = 32;

// caa_pv_kernel: 8 warps split the keys; each lane owns kPvVec columns (8-byte loads for 16-bit
// types, 16-byte loads for float32).
constexpr int kPvThreads = 256;
constexpr int kPvWarps = kPvThreads / kWarpSize;
constexpr int kPvVec = 4;
constexpr int kPvCols = kWarpSize * kPvVec;

// caa_backward_fused_kernel: a block handles kBwdKeys keys; each warp handles kBwdRowsPerWarp of
// them at once, so every grad_out value read from shared memory feeds 2 · kBwdRowsPerWarp FMAs.
constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / kWarpSize;
constexpr int kBwdKeys = 32;
constexpr int kBwdRowsPerWarp = 2;
constexpr int kBwdVec = 4;

constexpr int kRowDotThreads = 256;
constexpr int kElementwiseThreads = 256;

// Dynamic shared memory available without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

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

// Loads N consecutive scalar_t at src (aligned to N elements) as float.
template <int N, typename scalar_t>
__device__ __forceinline__ void load_as_float(const scalar_t* src, float (&dst)[N]) {
  const Pack<scalar_t, N> pack = *reinterpret_cast<const Pack<scalar_t, N>*>(src);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    dst[e] = static_cast<float>(pack.val[e]);
  }
}

// Stores N floats at dst (aligned to N elements) rounded to scalar_t.
template <int N, typename scalar_t>
__device__ __forceinline__ void store_from_float(scalar_t* dst, const float (&src)[N]) {
  Pack<scalar_t, N> pack;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    pack.val[e] = static_cast<scalar_t>(src[e]);
  }
  *reinterpret_cast<Pack<scalar_t, N>*>(dst) = pack;
}

// ---------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------

// Scores, softmax and log-sum-exp of one tile of KT query rows of one batch element.
// grid (B, nT), block kScoreThreads. Thread t scores keys t, t + kScoreThreads, ... against the
// KT rows; row statistics are merged across the block at the end.
template <typename scalar_t, typename acc_t, int KT>
__global__ void __launch_bounds__(kScoreThreads)
    caa_softmax_lse_kernel(const scalar_t* __restrict__ q,  // (B, K, dk)
                           const scalar_t* __restrict__ k,  // (B, M, dk)
                           acc_t* __restrict__ p,           // (B, nT, M, KT) out: P, 0 for rows >= K
                           acc_t* __restrict__ lse,         // (B, K) out
                           int K, int M, int dk, acc_t scale) {
  __shared__ acc_t q_s[kScoreDepth][KT];                 // q slice, transposed: [c][j]
  __shared__ acc_t k_s[kScoreThreads][kScoreDepth + 1];  // +1: thread t reads row t conflict-free
  __shared__ acc_t warp_max[kScoreWarps][KT];
  __shared__ acc_t warp_sum_exp[kScoreWarps][KT];
  __shared__ acc_t lse_s[KT];

  const int b = blockIdx.x;
  const int tile = blockIdx.y;
  const int n_tiles = gridDim.y;
  const int row0 = tile * KT;
  const int rows = min(KT, K - row0);
  const int tid = threadIdx.x;
  const scalar_t* q_rows = q + (static_cast<int64_t>(b) * K + row0) * dk;  // (rows, dk)
  const scalar_t* k_b = k + static_cast<int64_t>(b) * M * dk;             // (M, dk)
  acc_t* p_tile = p + (static_cast<int64_t>(b) * n_tiles + tile) * M * KT;  // (M, KT)

  acc_t run_max[KT];
  acc_t run_sum[KT];
#pragma unroll
  for (int j = 0; j < KT; ++j) {
    run_max[j] = -std::numeric_limits<acc_t>::infinity();
    run_sum[j] = 0;
  }

  for (int key0 = 0; key0 < M; key0 += kScoreThreads) {
    const int key = key0 + tid;
    acc_t s[KT];
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      s[j] = 0;
    }
    for (int d0 = 0; d0 < dk; d0 += kScoreDepth) {
      __syncthreads();  // the previous slice is fully consumed
      for (int e = tid; e < KT * kScoreDepth; e += kScoreThreads) {
        const int j = e / kScoreDepth;
        const int c = e % kScoreDepth;
        q_s[c][j] = (j < rows && d0 + c < dk) ? static_cast<acc_t>(q_rows[j * dk + d0 + c])
                                              : acc_t(0);
      }
      // Consecutive threads read consecutive elements of the (keys, dk) slice: coalesced.
      for (int e = tid; e < kScoreThreads * kScoreDepth; e += kScoreThreads) {
        const int r = e / kScoreDepth;
        const int c = e % kScoreDepth;
        k_s[r][c] = (key0 + r < M && d0 + c < dk)
                        ? static_cast<acc_t>(k_b[static_cast<int64_t>(key0 + r) * dk + d0 + c])
                        : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int c = 0; c < kScoreDepth; ++c) {
        const acc_t kc = k_s[tid][c];
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          s[j] += q_s[c][j] * kc;
        }
      }
    }
    if (key < M) {
      acc_t* p_key = p_tile + static_cast<int64_t>(key) * KT;
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        s[j] *= scale;
        merge_softmax_stats(run_max[j], run_sum[j], s[j], acc_t(1));
        p_key[j] = s[j];  // raw scores for now, exponentiated below once lse is known
      }
    }
  }

  // Block-wide merge of the per-thread statistics: shuffles within warps, then across warps.
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
#pragma unroll
  for (int j = 0; j < KT; ++j) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const acc_t other_max = __shfl_xor_sync(kFullMask, run_max[j], offset);
      const acc_t other_sum = __shfl_xor_sync(kFullMask, run_sum[j], offset);
      merge_softmax_stats(run_max[j], run_sum[j], other_max, other_sum);
    }
    if (lane == 0) {
      warp_max[warp][j] = run_max[j];
      warp_sum_exp[warp][j] = run_sum[j];
    }
  }
  __syncthreads();
  if (tid < KT) {
    acc_t row_max = warp_max[0][tid];
    acc_t row_sum = warp_sum_exp[0][tid];
    for (int w = 1; w < kScoreWarps; ++w) {
      merge_softmax_stats(row_max, row_sum, warp_max[w][tid], warp_sum_exp[w][tid]);
    }
    lse_s[tid] = row_max + acc_log(row_sum);
    if (tid < rows) {
      lse[static_cast<int64_t>(b) * K + row0 + tid] = lse_s[tid];
    }
  }
  __syncthreads();

  // Each thread exponentiates the scores it wrote itself (same keys as above): no sync needed.
  for (int key = tid; key < M; key += kScoreThreads) {
    acc_t* p_key = p_tile + static_cast<int64_t>(key) * KT;
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      p_key[j] = j < rows ? acc_exp(p_key[j] - lse_s[j]) : acc_t(0);
    }
  }
}

// out = P · v for one batch element, one tile of KT rows and kPvCols columns.
// grid (B, nT, ceil(dv / kPvCols)), block kPvThreads. Needs dv % kPvVec == 0 and v, out aligned
// to kPvVec elements. Warp w accumulates keys w, w + kPvWarps, ...; lane l owns columns
// [l·kPvVec, (l+1)·kPvVec) of the block's slice for all KT rows.
template <typename scalar_t, int KT>
__global__ void __launch_bounds__(kPvThreads)
    caa_pv_kernel(const float* __restrict__ p,     // (B, nT, M, KT) probabilities
                  const scalar_t* __restrict__ v,  // (B, M, dv)
                  scalar_t* __restrict__ out,      // (B, K, dv) out
                  int K, int M, int dv) {
  // Partial sums of warps 4..7, then 0..3: [warp % 4][row][column of the block's slice].
  __shared__ __align__(16) float partial[kPvWarps / 2][KT][kPvCols];

  const int b = blockIdx.x;
  const int tile = blockIdx.y;
  const int n_tiles = gridDim.y;
  const int col0 = blockIdx.z * kPvCols;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int col = col0 + lane * kPvVec;
  const bool has_cols = col < dv;  // dv % kPvVec == 0: the lane's kPvVec columns all exist
  const float* p_tile = p + (static_cast<int64_t>(b) * n_tiles + tile) * M * KT;  // (M, KT)
  const scalar_t* v_b = v + static_cast<int64_t>(b) * M * dv;                      // (M, dv)

  float acc[KT][kPvVec] = {};
#pragma unroll 2
  for (int key = warp; key < M; key += kPvWarps) {
    float pk[KT];  // the same KT floats for the whole warp: broadcast loads
    const float* p_key = p_tile + static_cast<int64_t>(key) * KT;
#pragma unroll
    for (int j = 0; j < KT; j += 4) {  // KT % 4 == 0 and p_key is 16-byte aligned
      const Pack<float, 4> quad = *reinterpret_cast<const Pack<float, 4>*>(p_key + j);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pk[j + e] = quad.val[e];
      }
    }
    float vk[kPvVec] = {};
    if (has_cols) {
      load_as_float<kPvVec>(v_b + static_cast<int64_t>(key) * dv + col, vk);
    }
#pragma unroll
    for (int j = 0; j < KT; ++j) {
#pragma unroll
      for (int e = 0; e < kPvVec; ++e) {
        acc[j][e] += pk[j] * vk[e];
      }
    }
  }

  // Fixed-order reduction over the 8 warps: (w + (w + 4)) for w < 4, then the four sums.
  constexpr int kHalf = kPvWarps / 2;
  if (warp >= kHalf) {
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      Pack<float, kPvVec> pack;  // one 16-byte store: conflict-free across the warp
#pragma unroll
      for (int e = 0; e < kPvVec; ++e) {
        pack.val[e] = acc[j][e];
      }
      *reinterpret_cast<Pack<float, kPvVec>*>(&partial[warp - kHalf][j][lane * kPvVec]) = pack;
    }
  }
  __syncthreads();
  if (warp < kHalf) {
#pragma unroll
    for (int j = 0; j < KT; ++j) {
#pragma unroll
      for (int e = 0; e < kPvVec; ++e) {
        partial[warp][j][lane * kPvVec + e] += acc[j][e];
      }
    }
  }
  __syncthreads();
  const int row0 = tile * KT;
  scalar_t* out_rows = out + (static_cast<int64_t>(b) * K + row0) * dv;  // (rows, dv)
  for (int e = threadIdx.x; e < KT * kPvCols; e += kPvThreads) {
    const int j = e / kPvCols;
    const int c = e % kPvCols;
    if (row0 + j < K && col0 + c < dv) {
      float sum = partial[0][j][c];
#pragma unroll
      for (int w = 1; w < kHalf; ++w) {
        sum += partial[w][j][c];
      }
      out_rows[static_cast<int64_t>(j) * dv + col0 + c] = static_cast<scalar_t>(sum);
    }
  }
}

// d[r] = a[r] · c[r] for each row r: one warp per row, coalesced along the row.
// grid ceil(rows / 8), block kRowDotThreads.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowDotThreads)
    caa_row_dot_kernel(const scalar_t* __restrict__ a,  // (rows, n) grad_out
                       const scalar_t* __restrict__ c,  // (rows, n) out
                       acc_t* __restrict__ d,           // (rows,) out
                       int64_t rows, int n) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowDotThreads / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) {
    return;  // whole warp: the shuffles below stay convergent
  }
  const scalar_t* a_row = a + row * n;
  const scalar_t* c_row = c + row * n;
  acc_t sum = 0;
  for (int col = lane; col < n; col += kWarpSize) {
    sum += static_cast<acc_t>(a_row[col]) * static_cast<acc_t>(c_row[col]);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    d[row] = sum;
  }
}

// Shared-memory layout of caa_backward_fused_kernel, in floats.
struct FusedBackwardSmem {
  int go;     // [KT][dv]        grad_out of batch b, rows >= K zero
  int q;      // [KT][dk + 1]    q of batch b, rows >= K zero; +1: lane j reads row j conflict-free
  int k;      // [kBwdKeys][dk]  the block's keys
  int ds;     // [kBwdKeys][KT]  the block's dS (scale folded in), for its share of dq
  int lse;    // [KT]
  int d;      // [KT]            D = rowsum(grad_out ∘ out)
  int total;  // floats in all

  __host__ __device__ FusedBackwardSmem(int KT, int dk, int dv) {
    go = 0;
    q = go + KT * dv;
    k = q + KT * (dk + 1);
    ds = k + kBwdKeys * dk;
    lse = ds + kBwdKeys * KT;
    d = lse + KT;
    total = d + KT;
  }
};

// Backward pass for one batch element and kBwdKeys keys (see the file comment).
// grid (B, ceil(M / kBwdKeys)), block kBwdThreads, dynamic shared memory FusedBackwardSmem.
// Needs K <= KT <= 32 and dv % kBwdVec == 0 with v, grad_out, dv aligned to kBwdVec elements.
template <typename scalar_t, int KT>
__global__ void __launch_bounds__(kBwdThreads)
    caa_backward_fused_kernel(const scalar_t* __restrict__ q,   // (B, K, dk)
                              const scalar_t* __restrict__ k,   // (B, M, dk)
                              const scalar_t* __restrict__ v,   // (B, M, dv)
                              const scalar_t* __restrict__ go,  // (B, K, dv) grad_out
                              const float* __restrict__ lse,    // (B, K)
                              const float* __restrict__ dsum,   // (B, K) rowsum(grad_out ∘ out)
                              scalar_t* __restrict__ grad_k,    // (B, M, dk) out
                              scalar_t* __restrict__ grad_v,    // (B, M, dv) out
                              float* __restrict__ dq_part,      // (B, nMT, K, dk) out: dq shares
                              int K, int M, int dk, int dv, float scale) {
  extern __shared__ __align__(16) float smem[];
  const FusedBackwardSmem layout(KT, dk, dv);
  float* go_s = smem + layout.go;
  float* q_s = smem + layout.q;
  float* k_s = smem + layout.k;
  float* ds_s = smem + layout.ds;
  float* lse_s = smem + layout.lse;
  float* d_s = smem + layout.d;

  const int b = blockIdx.x;
  const int key_tile = blockIdx.y;
  const int n_key_tiles = gridDim.y;
  const int key0 = key_tile * kBwdKeys;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int64_t bK = static_cast<int64_t>(b) * K;
  const int64_t bM = static_cast<int64_t>(b) * M;

  // Stage everything the block reuses; coalesced loads, converted to float once.
  for (int e = tid; e < KT * dv; e += kBwdThreads) {
    const int j = e / dv;
    go_s[e] = j < K ? static_cast<float>(go[bK * dv + e]) : 0.f;
  }
  for (int e = tid; e < KT * dk; e += kBwdThreads) {
    const int j = e / dk;
    const int c = e % dk;
    q_s[j * (dk + 1) + c] = j < K ? static_cast<float>(q[bK * dk + e]) : 0.f;
  }
  for (int e = tid; e < kBwdKeys * dk; e += kBwdThreads) {
    const int r = e / dk;
    k_s[e] = key0 + r < M ? static_cast<float>(k[(bM + key0) * dk + e]) : 0.f;
  }
  if (tid < KT) {
    lse_s[tid] = tid < K ? lse[bK + tid] : 0.f;
    d_s[tid] = tid < K ? dsum[bK + tid] : 0.f;
  }
  __syncthreads();

  for (int r0 = warp * kBwdRowsPerWarp; r0 < kBwdKeys; r0 += kBwdWarps * kBwdRowsPerWarp) {
    // 1. P[:, key] from the saved lse: lane j scores query row j against the key.
    float p_lane[kBwdRowsPerWarp];       // P[lane, key_r]
    float p_all[kBwdRowsPerWarp][KT];    // P[:, key_r], the same in every lane
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      const int key = key0 + r0 + r;
      p_lane[r] = 0.f;
      if (lane < K && key < M) {
        const float* q_row = q_s + lane * (dk + 1);
        const float* k_row = k_s + (r0 + r) * dk;
        float s = 0.f;
        for (int c = 0; c < dk; ++c) {
          s += q_row[c] * k_row[c];
        }
        p_lane[r] = acc_exp(s * scale - lse_s[lane]);
      }
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        p_all[r][j] = __shfl_sync(kFullMask, p_lane[r], j);
      }
    }

    // 2. One pass over the keys' rows of v: dP partial sums and dv = Pᵀ · grad_out.
    float dp[kBwdRowsPerWarp][KT] = {};
    for (int c0 = lane * kBwdVec; c0 < dv; c0 += kWarpSize * kBwdVec) {
      float vk[kBwdRowsPerWarp][kBwdVec] = {};
      float dvk[kBwdRowsPerWarp][kBwdVec] = {};
#pragma unroll
      for (int r = 0; r < kBwdRowsPerWarp; ++r) {
        const int key = key0 + r0 + r;
        if (key < M) {
          load_as_float<kBwdVec>(v + (bM + key) * dv + c0, vk[r]);
        }
      }
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        const Pack<float, kBwdVec> g =
            *reinterpret_cast<const Pack<float, kBwdVec>*>(go_s + j * dv + c0);
#pragma unroll
        for (int r = 0; r < kBwdRowsPerWarp; ++r) {
#pragma unroll
          for (int e = 0; e < kBwdVec; ++e) {
            dp[r][j] += g.val[e] * vk[r][e];
            dvk[r][e] += p_all[r][j] * g.val[e];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kBwdRowsPerWarp; ++r) {
        const int key = key0 + r0 + r;
        if (key < M) {
          store_from_float<kBwdVec>(grad_v + (bM + key) * dv + c0, dvk[r]);
        }
      }
    }

    // 3. dS = scale · P ∘ (dP − D), then dk[key] = dSᵀ[key] · q.
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      const int key = key0 + r0 + r;
      float dp_lane = 0.f;  // dP[lane, key]: select from the reduced row without local memory
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        const float total = warp_sum(dp[r][j]);
        dp_lane = lane == j ? total : dp_lane;
      }
      const float ds_lane = lane < K ? scale * p_lane[r] * (dp_lane - d_s[lane]) : 0.f;
      if (lane < KT) {
        ds_s[(r0 + r) * KT + lane] = ds_lane;  // 0 for keys >= M since p_lane is 0 there
      }
      float ds_all[KT];
#pragma unroll
      for (int j = 0; j < KT; ++j) {
        ds_all[j] = __shfl_sync(kFullMask, ds_lane, j);
      }
      if (key < M) {
        for (int c = lane; c < dk; c += kWarpSize) {
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < KT; ++j) {
            sum += ds_all[j] * q_s[j * (dk + 1) + c];
          }
          grad_k[(bM + key) * dk + c] = static_cast<scalar_t>(sum);
        }
      }
    }
  }
  __syncthreads();

  // 4. This block's share of dq = dS · k over its keys (summed by caa_dq_reduce_kernel).
  float* dq_block = dq_part + (static_cast<int64_t>(b) * n_key_tiles + key_tile) * K * dk;
  for (int e = tid; e < K * dk; e += kBwdThreads) {
    const int j = e / dk;
    const int c = e % dk;
    float sum = 0.f;
#pragma unroll 8
    for (int r = 0; r < kBwdKeys; ++r) {
      sum += ds_s[r * KT + j] * k_s[r * dk + c];
    }
    dq_block[e] = sum;
  }
}

// dq = sum over key tiles of dq_part, in tile order. grid ceil(B·K·dk / 256), block 256.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    caa_dq_reduce_kernel(const float* __restrict__ dq_part,  // (B, nMT, K·dk)
                         scalar_t* __restrict__ grad_q,      // (B, K·dk) out
                         int64_t batch, int n_key_tiles, int row_elems) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
  if (e >= batch * row_elems) {
    return;
  }
  const int64_t b = e / row_elems;
  const int64_t within = e % row_elems;
  const float* part = dq_part + b * n_key_tiles * row_elems + within;
  float sum = 0.f;
  for (int t = 0; t < n_key_tiles; ++t) {
    sum += part[static_cast<int64_t>(t) * row_elems];
  }
  grad_q[e] = static_cast<scalar_t>(sum);
}

// General-path softmax backward, elementwise over (B, K, M): P = exp(scale · s − lse) and
// dS = scale · P ∘ (dP − D), written over s and dp in place.
template <typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    caa_softmax_grad_kernel(acc_t* __restrict__ s,          // (B·K, M) in: q kᵀ; out: P
                            acc_t* __restrict__ dp,         // (B·K, M) in: grad_out vᵀ; out: dS
                            const acc_t* __restrict__ lse,  // (B·K,)
                            const acc_t* __restrict__ dsum, // (B·K,) rowsum(grad_out ∘ out)
                            int64_t numel, int M, acc_t scale) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
  if (e >= numel) {
    return;
  }
  const int64_t row = e / M;
  const acc_t prob = acc_exp(s[e] * scale - lse[row]);
  s[e] = prob;
  dp[e] = scale * prob * (dp[e] - dsum[row]);
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The stream PyTorch is using on the current device (what at::cuda::getCurrentCUDAStream
// returns; ATen/cuda/CUDAContext.h is avoided since it needs the cuBLAS/cuSPARSE headers,
// which a toolkit-only install may lack).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Calls f(std::integral_constant<int, KT>) with the smallest row tile KT >= min(K, 16).
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

int row_tile_for(int64_t K) {
  int tile = 0;
  dispatch_row_tile(K, [&](auto kt) { tile = decltype(kt)::value; });
  return tile;
}

bool is_aligned(const at::Tensor& t, int elements) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * elements) == 0;
}

void check_launch_sizes(const AttentionSizes& s) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  constexpr int64_t kGridYZMax = 65535;
  TORCH_CHECK(s.B <= kIntMax && s.M * s.dv <= kIntMax && s.M * s.dk <= kIntMax &&
                  s.K * s.dv <= kIntMax && s.K * s.M <= kIntMax,
              "class_aware_attention (CUDA): per-batch sizes must fit in int32, got B=", s.B,
              " K=", s.K, " M=", s.M, " dk=", s.dk, " dv=", s.dv);
  TORCH_CHECK(ceil_div(s.K, kMaxRowTile) <= kGridYZMax && ceil_div(s.dv, kPvCols) <= kGridYZMax,
              "class_aware_attention (CUDA): K=", s.K, " or dv=", s.dv, " is too large");
}

// Launches caa_softmax_lse_kernel; returns P (B, nT, M, KT) in acc_t.
template <typename scalar_t, typename acc_t, int KT>
at::Tensor launch_softmax_lse(const at::Tensor& q, const at::Tensor& k, at::Tensor& lse,
                              const AttentionSizes& s, double scale, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(s.K, KT);
  at::Tensor p = at::empty({s.B, n_tiles, s.M, KT}, q.options().dtype(lse.scalar_type()));
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(n_tiles));
  caa_softmax_lse_kernel<scalar_t, acc_t, KT><<<grid, kScoreThreads, 0, stream>>>(
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), p.mutable_data_ptr<acc_t>(),
      lse.mutable_data_ptr<acc_t>(), static_cast<int>(s.K), static_cast<int>(s.M),
      static_cast<int>(s.dk), static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// out = P · v through cuBLAS in acc_t, for shapes caa_pv_kernel does not take.
void pv_general(const at::Tensor& p, const at::Tensor& v, at::Tensor& out,
                const AttentionSizes& s) {
  const int64_t kt = p.size(3);
  const at::Tensor probs =
      p.permute({0, 1, 3, 2}).reshape({s.B, p.size(1) * kt, s.M}).narrow(1, 0, s.K);
  out.copy_(at::bmm(probs, v.to(p.scalar_type())));
}

template <typename scalar_t>
void forward_cuda_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double scale, const AttentionSizes& s, at::Tensor& out,
                        at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = current_stream();
  dispatch_row_tile(s.K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    const at::Tensor p = launch_softmax_lse<scalar_t, acc_t, KT>(q, k, lse, s, scale, stream);
    if (s.dv == 0) {
      return;  // out is empty; a zero-sized grid would be an invalid launch
    }
    const bool vectorizable =
        s.dv % kPvVec == 0 && is_aligned(v, kPvVec) && is_aligned(out, kPvVec);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (vectorizable) {
        const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(p.size(1)),
                        static_cast<unsigned>(ceil_div(s.dv, kPvCols)));
        caa_pv_kernel<scalar_t, KT><<<grid, kPvThreads, 0, stream>>>(
            p.const_data_ptr<float>(), v.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), static_cast<int>(s.K), static_cast<int>(s.M),
            static_cast<int>(s.dv));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    pv_general(p, v, out, s);
  });
}

// The most dynamic shared memory a block may opt into on the current device.
int optin_shared_bytes() {
  int device = 0;
  int bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Whether caa_backward_fused_kernel takes these inputs, and its shared-memory bytes.
bool fused_backward_fits(const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& grad_v,
                         const AttentionSizes& s, size_t* smem_bytes) {
  if (s.K > kMaxRowTile || s.dv % kBwdVec != 0 ||
      !is_aligned(v, kBwdVec) || !is_aligned(grad_out, kBwdVec) || !is_aligned(grad_v, kBwdVec) ||
      ceil_div(s.M, kBwdKeys) > 65535) {
    return false;
  }
  const FusedBackwardSmem layout(row_tile_for(s.K), static_cast<int>(s.dk),
                                 static_cast<int>(s.dv));
  *smem_bytes = static_cast<size_t>(layout.total) * sizeof(float);
  return *smem_bytes <= static_cast<size_t>(optin_shared_bytes());
}

template <typename scalar_t>
void backward_fused(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& dsum,
                    double scale, const AttentionSizes& s, size_t smem_bytes,
                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                    cudaStream_t stream) {
  const int64_t n_key_tiles = ceil_div(s.M, kBwdKeys);
  at::Tensor dq_part = at::empty({s.B, n_key_tiles, s.K, s.dk}, q.options().dtype(at::kFloat));
  dispatch_row_tile(s.K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    const auto kernel = caa_backward_fused_kernel<scalar_t, KT>;
    if (smem_bytes > kDefaultSharedBytes) {
      // The device's opt-in maximum, not this call's size: host threads launching with other
      // sizes then all set the same value, and none lowers it under another's launch.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          optin_shared_bytes()));
    }
    const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(n_key_tiles));
    kernel<<<grid, kBwdThreads, smem_bytes, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
        lse.const_data_ptr<float>(), dsum.const_data_ptr<float>(),
        grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
        dq_part.mutable_data_ptr<float>(), static_cast<int>(s.K), static_cast<int>(s.M),
        static_cast<int>(s.dk), static_cast<int>(s.dv), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t numel = s.B * s.K * s.dk;
  if (numel > 0) {
    caa_dq_reduce_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(numel, kElementwiseThreads)), kElementwiseThreads, 0,
           stream>>>(dq_part.const_data_ptr<float>(), grad_q.mutable_data_ptr<scalar_t>(), s.B,
                     static_cast<int>(n_key_tiles), static_cast<int>(s.K * s.dk));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Any shape and dtype: cuBLAS in acc_t for the products, our kernels for the softmax stages.
template <typename scalar_t>
void backward_general(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& lse, const at::Tensor& dsum,
                      double scale, const AttentionSizes& s, at::Tensor& grad_q,
                      at::Tensor& grad_k, at::Tensor& grad_v, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = lse.scalar_type();
  const at::Tensor qf = q.to(acc);
  const at::Tensor kf = k.to(acc);
  const at::Tensor gof = grad_out.to(acc);
  at::Tensor probs = at::bmm(qf, kf.transpose(1, 2));             // (B, K, M): scores for now
  at::Tensor dscores = at::bmm(gof, v.to(acc).transpose(1, 2));  // (B, K, M): dP for now
  const int64_t numel = probs.numel();
  caa_softmax_grad_kernel<acc_t>
      <<<static_cast<unsigned>(ceil_div(numel, kElementwiseThreads)), kElementwiseThreads, 0,
         stream>>>(probs.mutable_data_ptr<acc_t>(), dscores.mutable_data_ptr<acc_t>(),
                   lse.const_data_ptr<acc_t>(), dsum.const_data_ptr<acc_t>(), numel,
                   static_cast<int>(s.M), static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_v.copy_(at::bmm(probs.transpose(1, 2), gof));
  grad_q.copy_(at::bmm(dscores, kf));
  grad_k.copy_(at::bmm(dscores.transpose(1, 2), qf));
}

template <typename scalar_t>
void backward_cuda_typed(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                         double scale, const AttentionSizes& s, at::Tensor& grad_q,
                         at::Tensor& grad_k, at::Tensor& grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = current_stream();
  at::Tensor dsum = at::empty({s.B, s.K}, lse.options());
  const int64_t rows = s.B * s.K;
  constexpr int64_t kRowsPerBlock = kRowDotThreads / kWarpSize;
  caa_row_dot_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)), kRowDotThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
          dsum.mutable_data_ptr<acc_t>(), rows, static_cast<int>(s.dv));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (std::is_same_v<acc_t, float>) {  // the fused kernel works in float32
    size_t smem_bytes = 0;
    if (fused_backward_fits(v, grad_out, grad_v, s, &smem_bytes)) {
      backward_fused<scalar_t>(grad_out, q, k, v, lse, dsum, scale, s, smem_bytes, grad_q,
                               grad_k, grad_v, stream);
      return;
    }
  }
  backward_general<scalar_t>(grad_out, q, k, v, lse, dsum, scale, s, grad_q, grad_k, grad_v,
                             stream);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, double scale) {
  const AttentionSizes s = check_forward_inputs(q_in, k_in, v_in);
  const NoAutocast no_autocast{};
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  at::Tensor out = at::empty({s.B, s.K, s.dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.K}, q.options().dtype(lse_dtype_for(q.scalar_type())));
  if (s.B == 0 || s.K == 0) {
    return {out, lse};  // nothing to compute; zero-sized grids are invalid launches
  }
  check_launch_sizes(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "class_aware_attention_cuda", [&] {
                                    forward_cuda_typed<scalar_t>(q, k, v, scale, s, out, lse);
                                  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  const AttentionSizes s = check_backward_inputs(grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  const NoAutocast no_autocast{};
  const c10::cuda::CUDAGuard guard(q_in.device());
  // grad_out is often an expanded (stride-0) tensor, e.g. the gradient of a sum().
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (s.B == 0 || s.K == 0) {
    // No query rows: nothing flows back to k and v.
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  check_launch_sizes(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "class_aware_attention_backward_cuda", [&] {
        backward_cuda_typed<scalar_t>(grad_out, q, k, v, out, lse, scale, s, grad_q, grad_k,
                                      grad_v);
      });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace dpt_fast

TORCH_LIBRARY_IMPL(dpt_fast, CUDA, m) {
  m.impl("class_aware_attention", &dpt_fast::forward_cuda);
  m.impl("class_aware_attention_backward", &dpt_fast::backward_cuda);
}
