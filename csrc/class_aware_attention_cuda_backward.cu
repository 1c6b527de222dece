// CUDA backward kernels of the class-aware attention op (shared pieces:
// class_aware_attention_cuda.cuh). For K <= kMaxRowTile and dv % VEC == 0 (the DPT case):
//
//   1. caa_row_dot_kernel: D = rowsum(grad_out ∘ out).
//   2. caa_backward_fused_kernel: one block per (b, 32 keys). Recomputes P from the saved lse,
//      then one pass over those rows of v gives dP = grad_out · vᵀ and dv = Pᵀ · grad_out
//      (grad_out of batch b is staged in shared memory), then dS = P ∘ (dP − D), dk = scale ·
//      dSᵀ · q and this block's share of dq = scale · dS · k.
//   3. caa_dq_reduce_kernel: dq = sum of the blocks' shares (fixed order: deterministic).
//
// Other shapes and float64 use a general path: caa_row_dot_kernel and caa_softmax_grad_kernel for
// the softmax stages, cuBLAS (at::bmm) in float32/float64 for the products.
//
// Longer than most files here (about 460 lines) on purpose: the choice between the fused and the
// general path depends on the fused kernel's tile constants and shared-memory layout, so the
// backward kernels and their launchers stay in one unit.

#include "class_aware_attention.h"
#include "class_aware_attention_cuda.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace dpt_fast::caa_cuda {
namespace {

// caa_backward_fused_kernel: a block handles kBwdKeys keys; each warp handles kBwdRowsPerWarp of
// them at once, so every grad_out value read from shared memory feeds 2 · kBwdRowsPerWarp FMAs.
constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / kWarpSize;
constexpr int kBwdKeys = caa_limits::kBackwardKeyTile;
constexpr int kBwdRowsPerWarp = 2;
constexpr int kBwdVec = caa_limits::kFusedVector;

constexpr int kRowDotThreads = 256;

// Dynamic shared memory available without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// d[r] = a[r] · c[r] for each row r: one warp per row, coalesced along the row.
// grid ceil(rows / 8), block kRowDotThreads.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowDotThreads)
    caa_row_dot_kernel(GlobalPtr<const scalar_t> __restrict__ a,  // (rows, n) grad_out
                       GlobalPtr<const scalar_t> __restrict__ c,  // (rows, n) out
                       GlobalPtr<acc_t> __restrict__ d,           // (rows,) out
                       int64_t rows, int n) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowDotThreads / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) {
    return;  // whole warp: the shuffles below stay convergent
  }
  const auto a_row = a + row * n;
  const auto c_row = c + row * n;
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
// The explicit minimum of one block per SM lets ptxas use the registers it needs: left to its
// own occupancy target it held <float, 4> to 64 registers on sm_90 and spilled (nvcc 13.0,
// .ci/nvcc_check.py); with it, 96 registers and no spill.
template <typename scalar_t, int KT>
__global__ void __launch_bounds__(kBwdThreads, 1)
    caa_backward_fused_kernel(GlobalPtr<const scalar_t> __restrict__ q,   // (B, K, dk)
                              GlobalPtr<const scalar_t> __restrict__ k,   // (B, M, dk)
                              GlobalPtr<const scalar_t> __restrict__ v,   // (B, M, dv)
                              GlobalPtr<const scalar_t> __restrict__ go,  // (B, K, dv) grad_out
                              GlobalPtr<const float> __restrict__ lse,    // (B, K)
                              GlobalPtr<const float> __restrict__ dsum,   // (B, K) rowsum(go ∘ out)
                              GlobalPtr<scalar_t> __restrict__ grad_k,    // (B, M, dk) out
                              GlobalPtr<scalar_t> __restrict__ grad_v,    // (B, M, dv) out
                              GlobalPtr<float> __restrict__ dq_part,  // (B, nMT, K, dk) out: shares
                              int K, int M, int dk, int dv, float scale) {
  DPT_DYNAMIC_SHARED(float, smem);
  const FusedBackwardSmem layout(KT, dk, dv);
  const auto go_s = smem + layout.go;
  const auto q_s = smem + layout.q;
  const auto k_s = smem + layout.k;
  const auto ds_s = smem + layout.ds;
  const auto lse_s = smem + layout.lse;
  const auto d_s = smem + layout.d;

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
        const auto q_row = q_s + lane * (dk + 1);
        const auto k_row = k_s + (r0 + r) * dk;
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
        const Pack<float, kBwdVec> g = pack_at<kBwdVec>(go_s + j * dv + c0);
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
  const auto dq_block = dq_part + (static_cast<int64_t>(b) * n_key_tiles + key_tile) * K * dk;
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
    caa_dq_reduce_kernel(GlobalPtr<const float> __restrict__ dq_part,  // (B, nMT, K·dk)
                         GlobalPtr<scalar_t> __restrict__ grad_q,      // (B, K·dk) out
                         int64_t batch, int n_key_tiles, int row_elems) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
  if (e >= batch * row_elems) {
    return;
  }
  const int64_t b = e / row_elems;
  const int64_t within = e % row_elems;
  const auto part = dq_part + b * n_key_tiles * row_elems + within;
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
    caa_softmax_grad_kernel(GlobalPtr<acc_t> __restrict__ s,    // (B·K, M) in: q kᵀ; out: P
                            GlobalPtr<acc_t> __restrict__ dp,   // (B·K, M) in: go vᵀ; out: dS
                            GlobalPtr<const acc_t> __restrict__ lse,   // (B·K,)
                            GlobalPtr<const acc_t> __restrict__ dsum,  // (B·K,) rowsum(go ∘ out)
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

// Devices the per-device state below has room for (c10 builds allow at most 64).
constexpr int kMaxDevices = 64;

// The most dynamic shared memory a block may opt into on `device`, queried once per device (a
// driver call per backward pass would cost more than some of its launches).
int optin_shared_bytes(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cached{};  // 0: not queried yet
  TORCH_CHECK(device >= 0 && device < kMaxDevices,
              "class_aware_attention (CUDA): device index ", device, " out of range");
  int bytes = cached[device].load(std::memory_order_relaxed);
  if (bytes == 0) {
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cached[device].store(bytes, std::memory_order_relaxed);  // racing threads store the same
  }
  return bytes;
}

// Lets caa_backward_fused_kernel<scalar_t, KT> use up to the device's opt-in maximum of dynamic
// shared memory, once per device (the attribute belongs to the function on the current device).
// Setting the maximum rather than a call's own size means it never changes again, so no thread
// lowers it under another's launch; std::call_once makes every thread wait until it is set.
template <typename scalar_t, int KT>
void allow_optin_shared_memory(int device) {
  static std::array<std::once_flag, kMaxDevices> done;
  std::call_once(done[device], [device] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(caa_backward_fused_kernel<scalar_t, KT>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        optin_shared_bytes(device)));
  });
}

// Whether caa_backward_fused_kernel takes these inputs, and its shared-memory bytes.
bool fused_backward_fits(const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& grad_v,
                         const AttentionSizes& s, int device, size_t* smem_bytes) {
  if (s.K > kMaxRowTile || s.dv % kBwdVec != 0 ||
      !is_aligned(v, kBwdVec) || !is_aligned(grad_out, kBwdVec) || !is_aligned(grad_v, kBwdVec) ||
      ceil_div(s.M, kBwdKeys) > 65535) {
    return false;
  }
  const FusedBackwardSmem layout(row_tile_for(s.K), static_cast<int>(s.dk),
                                 static_cast<int>(s.dv));
  *smem_bytes = static_cast<size_t>(layout.total) * sizeof(float);
  return *smem_bytes <= static_cast<size_t>(optin_shared_bytes(device));
}

template <typename scalar_t>
void backward_fused(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& dsum,
                    double scale, const AttentionSizes& s, int device, size_t smem_bytes,
                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                    cudaStream_t stream) {
  const int64_t n_key_tiles = ceil_div(s.M, kBwdKeys);
  at::Tensor dq_part = at::empty({s.B, n_key_tiles, s.K, s.dk}, q.options().dtype(at::kFloat));
  dispatch_row_tile(s.K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    if (smem_bytes > kDefaultSharedBytes) {
      allow_optin_shared_memory<scalar_t, KT>(device);
    }
    const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(n_key_tiles));
    launch_kernel<caa_backward_fused_kernel<scalar_t, KT>>(
        grid, kBwdThreads, smem_bytes, stream, q.const_data_ptr<scalar_t>(),
        k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(),
        dsum.const_data_ptr<float>(),
        grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
        dq_part.mutable_data_ptr<float>(), static_cast<int>(s.K), static_cast<int>(s.M),
        static_cast<int>(s.dk), static_cast<int>(s.dv), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t numel = s.B * s.K * s.dk;
  if (numel > 0) {
    launch_kernel<caa_dq_reduce_kernel<scalar_t>>(
        static_cast<unsigned>(ceil_div(numel, kElementwiseThreads)), kElementwiseThreads, 0,
        stream, dq_part.const_data_ptr<float>(), grad_q.mutable_data_ptr<scalar_t>(), s.B,
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
  launch_kernel<caa_softmax_grad_kernel<acc_t>>(
      static_cast<unsigned>(ceil_div(numel, kElementwiseThreads)), kElementwiseThreads, 0,
      stream, probs.mutable_data_ptr<acc_t>(), dscores.mutable_data_ptr<acc_t>(),
      lse.const_data_ptr<acc_t>(), dsum.const_data_ptr<acc_t>(), numel, static_cast<int>(s.M),
      static_cast<acc_t>(scale));
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
  launch_kernel<caa_row_dot_kernel<scalar_t, acc_t>>(
      static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)), kRowDotThreads, 0, stream,
      grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
      dsum.mutable_data_ptr<acc_t>(), rows, static_cast<int>(s.dv));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (std::is_same_v<acc_t, float>) {  // the fused kernel works in float32
    size_t smem_bytes = 0;
    const int device = c10::cuda::current_device();  // q's, under the CUDAGuard
    if (is_fused_dtype(q.scalar_type()) &&
        fused_backward_fits(v, grad_out, grad_v, s, device, &smem_bytes)) {
      backward_fused<scalar_t>(grad_out, q, k, v, lse, dsum, scale, s, device, smem_bytes,
                               grad_q, grad_k, grad_v, stream);
      return;
    }
  }
  backward_general<scalar_t>(grad_out, q, k, v, lse, dsum, scale, s, grad_q, grad_k, grad_v,
                             stream);
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
}  // namespace dpt_fast::caa_cuda

DPT_FAST_CUDA_KERNELS(m) {
  m.impl("class_aware_attention_backward", &dpt_fast::caa_cuda::backward_cuda);
}
