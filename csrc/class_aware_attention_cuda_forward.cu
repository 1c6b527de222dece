// CUDA forward kernels of the class-aware attention op (shared pieces:
// class_aware_attention_cuda.cuh):
//
//   1. caa_softmax_lse_kernel: scores, softmax and lse of a tile of KT query rows, one block per
//      (b, tile). Writes P (B, nT, M, KT) float: the KT probabilities of one key are contiguous,
//      so kernel 2 reads them with vector loads.
//   2. caa_pv_kernel: out = P · v. One block per (b, tile, 32·VEC columns of dv); its 8 warps
//      split the M keys, each lane owns VEC columns for all KT rows (coalesced loads along dv),
//      and the warps' partial sums are added in shared memory in a fixed order.
//
// Inputs caa_pv_kernel does not take (float64, dv not a multiple of VEC, misaligned v or out)
// compute P · v through cuBLAS in the accumulation type.

#include "class_aware_attention.h"
#include "class_aware_attention_cuda.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace dpt_fast::caa_cuda {
namespace {

// caa_softmax_lse_kernel: one thread per key in a chunk of kScoreThreads keys, dk in slices of
// kScoreDepth staged in shared memory.
constexpr int kScoreThreads = 128;
constexpr int kScoreWarps = kScoreThreads / kWarpSize;
constexpr int kScoreDepth = 32;

// caa_pv_kernel: 8 warps split the keys; each lane owns kPvVec columns (8-byte loads for 16-bit
// types, 16-byte loads for float32).
constexpr int kPvThreads = 256;
constexpr int kPvWarps = kPvThreads / kWarpSize;
constexpr int kPvVec = caa_limits::kFusedVector;
constexpr int kPvCols = kWarpSize * kPvVec;

// Scores, softmax and log-sum-exp of one tile of KT query rows of one batch element.
// grid (B, nT), block kScoreThreads. Thread t scores keys t, t + kScoreThreads, ... against the
// KT rows; row statistics are merged across the block at the end.
template <typename scalar_t, typename acc_t, int KT>
__global__ void __launch_bounds__(kScoreThreads)
    caa_softmax_lse_kernel(GlobalPtr<const scalar_t> __restrict__ q,  // (B, K, dk)
                           GlobalPtr<const scalar_t> __restrict__ k,  // (B, M, dk)
                           GlobalPtr<acc_t> __restrict__ p,    // (B, nT, M, KT) out: P, 0 rows >= K
                           GlobalPtr<acc_t> __restrict__ lse,  // (B, K) out
                           int K, int M, int dk, acc_t scale) {
  __shared__ SharedArray<acc_t, kScoreDepth, KT> q_s;  // q slice, transposed: [c][j]
  // +1: thread t reads row t conflict-free
  __shared__ SharedArray<acc_t, kScoreThreads, kScoreDepth + 1> k_s;
  __shared__ SharedArray<acc_t, kScoreWarps, KT> warp_max;
  __shared__ SharedArray<acc_t, kScoreWarps, KT> warp_sum_exp;
  __shared__ SharedArray<acc_t, KT> lse_s;

  const int b = blockIdx.x;
  const int tile = blockIdx.y;
  const int n_tiles = gridDim.y;
  const int row0 = tile * KT;
  const int rows = min(KT, K - row0);
  const int tid = threadIdx.x;
  const auto q_rows = q + (static_cast<int64_t>(b) * K + row0) * dk;       // (rows, dk)
  const auto k_b = k + static_cast<int64_t>(b) * M * dk;                   // (M, dk)
  const auto p_tile = p + (static_cast<int64_t>(b) * n_tiles + tile) * M * KT;  // (M, KT)

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
      const auto p_key = p_tile + static_cast<int64_t>(key) * KT;
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
    const auto p_key = p_tile + static_cast<int64_t>(key) * KT;
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
    caa_pv_kernel(GlobalPtr<const float> __restrict__ p,     // (B, nT, M, KT) probabilities
                  GlobalPtr<const scalar_t> __restrict__ v,  // (B, M, dv)
                  GlobalPtr<scalar_t> __restrict__ out,      // (B, K, dv) out
                  int K, int M, int dv) {
  // Partial sums of warps 4..7, then 0..3: [warp % 4][row][column of the block's slice].
  __shared__ __align__(16) SharedArray<float, kPvWarps / 2, KT, kPvCols> partial;

  const int b = blockIdx.x;
  const int tile = blockIdx.y;
  const int n_tiles = gridDim.y;
  const int col0 = blockIdx.z * kPvCols;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int col = col0 + lane * kPvVec;
  const bool has_cols = col < dv;  // dv % kPvVec == 0: the lane's kPvVec columns all exist
  const auto p_tile = p + (static_cast<int64_t>(b) * n_tiles + tile) * M * KT;  // (M, KT)
  const auto v_b = v + static_cast<int64_t>(b) * M * dv;                        // (M, dv)

  float acc[KT][kPvVec] = {};
  // Not unrolled: unrolled by 2, <float, 8> spilled on sm_80 (nvcc 13.0, .ci/nvcc_check.py).
#pragma unroll 1
  for (int key = warp; key < M; key += kPvWarps) {
    float pk[KT];  // the same KT floats for the whole warp: broadcast loads
    const auto p_key = p_tile + static_cast<int64_t>(key) * KT;
#pragma unroll
    for (int j = 0; j < KT; j += 4) {  // KT % 4 == 0 and p_key is 16-byte aligned
      const Pack<float, 4> quad = pack_at<4>(p_key + j);
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
      pack_at<kPvVec>(partial[warp - kHalf][j] + lane * kPvVec) = pack;
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
  const auto out_rows = out + (static_cast<int64_t>(b) * K + row0) * dv;  // (rows, dv)
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

// Launches caa_softmax_lse_kernel; returns P (B, nT, M, KT) in acc_t.
template <typename scalar_t, typename acc_t, int KT>
at::Tensor launch_softmax_lse(const at::Tensor& q, const at::Tensor& k, at::Tensor& lse,
                              const AttentionSizes& s, double scale, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(s.K, KT);
  at::Tensor p = at::empty({s.B, n_tiles, s.M, KT}, q.options().dtype(lse.scalar_type()));
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(n_tiles));
  launch_kernel<caa_softmax_lse_kernel<scalar_t, acc_t, KT>>(
      grid, kScoreThreads, 0, stream, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
      p.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), static_cast<int>(s.K),
      static_cast<int>(s.M), static_cast<int>(s.dk), static_cast<acc_t>(scale));
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
    const bool vectorizable = is_fused_dtype(q.scalar_type()) && s.dv % kPvVec == 0 &&
                              is_aligned(v, kPvVec) && is_aligned(out, kPvVec);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (vectorizable) {
        const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(p.size(1)),
                        static_cast<unsigned>(ceil_div(s.dv, kPvCols)));
        launch_kernel<caa_pv_kernel<scalar_t, KT>>(
            grid, kPvThreads, 0, stream, p.const_data_ptr<float>(), v.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), static_cast<int>(s.K), static_cast<int>(s.M),
            static_cast<int>(s.dv));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    pv_general(p, v, out, s);
  });
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

}  // namespace
}  // namespace dpt_fast::caa_cuda

DPT_FAST_CUDA_KERNELS(m) {
  m.impl("class_aware_attention", &dpt_fast::caa_cuda::forward_cuda);
}
