// CUDA emulation: the project's CUDA kernels compiled by g++ as C++ and run on the CPU, for tests
// on machines without a GPU (docs/cuda-emulation.md). This header is force-included (g++
// -include) before the .cu sources; the rest of the runtime is in runtime.cpp. What it models:
//
//   * a grid of blocks run one after another; the threads of a block as fibers on one OS thread,
//     switched at every __syncthreads() and warp shuffle, the order among runnable fibers permuted
//     by a seed (set_schedule_seed): a missing barrier or a lane assumed in lockstep changes the
//     result under some order, which the tests compare across seeds;
//   * __shared__ arrays and dynamic shared memory per block, filled with NaN bytes (0xff) at the
//     block's start so a read of an element nobody wrote shows up;
//   * global pointers and shared arrays as bounds-checked views (CheckedPtr, SharedArray): an
//     access outside its allocation (global) or its array dimension (shared) throws, naming the
//     kernel, block, thread, buffer, index and extent;
//   * deadlocks (a barrier or shuffle some threads never reach) detected when no fiber can run,
//     and a wall-clock limit per launch as a backstop.
//
// The sources use GlobalPtr<T>, SharedArray<T, N...>, DPT_DYNAMIC_SHARED, pack_at and
// launch_kernel (class_aware_attention_cuda.cuh), which are plain pointers, arrays and <<<...>>>
// under nvcc, so the CUDA build is unchanged.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// CUDA keywords. __shared__ is empty: a SharedArray is a per-thread handle whose constructor
// finds the block's memory (see SharedArray), so it needs no storage class.
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__
// g++ rejects __restrict__ on class types (CheckedPtr); it is only an optimisation hint.
#define __restrict__

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace cuda_emu {

// The emulated device: the shared-memory limits of an H100 (sm_90).
inline constexpr size_t kStaticSharedLimit = 48 * 1024;
inline constexpr int kOptinSharedLimit = 227 * 1024;
inline constexpr int kWarpSize = 32;

// Where a fiber is: its CUDA built-in variables.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running fiber's built-ins (null outside a kernel).
inline thread_local ThreadState* current_thread = nullptr;
// Counts bounds-checked accesses, so a kernel looping without barriers still meets the deadline.
inline thread_local uint64_t access_count = 0;

// Error reporting: throws std::runtime_error naming the kernel, block and thread.
[[noreturn]] void fail(const std::string& message);
void check_deadline();

// Block-wide barrier; `line` identifies the __syncthreads() call, which all threads must share.
void syncthreads(int line);
// Exchanges `bytes` bytes of `value` among the lanes of `mask` and copies lane `src_lane`'s into
// `result`. All lanes of the mask must reach the same shuffle (same line and mask).
void shuffle(unsigned mask, const void* value, size_t bytes, int src_lane, void* result,
             int line, const char* what);
// The n-th __shared__ array this thread declares: the block's n-th allocation (made and poisoned
// by the first thread to reach it). `what` describes it in messages.
void* shared_array(size_t bytes, size_t align, const char* what);
// The block's dynamic shared memory and its size in bytes.
void* dynamic_shared(size_t* bytes);

// The allocation holding `p` (a CPU allocation made through PyTorch's allocator since this
// module was loaded): [begin, end). Fails when it is not one.
void find_allocation(const void* p, const void** begin, const void** end);

// Emulated CUDA runtime calls.
int optin_shared_limit();
void set_max_dynamic_shared(const void* kernel, int bytes);

// Runs the grid: `body` is the kernel called with its arguments.
void run_grid(const std::string& kernel, const void* kernel_id, dim3 grid, dim3 block,
              size_t dynamic_shared_bytes, const std::function<void()>& body);

// ---------------------------------------------------------------------------------------------
// Bounds-checked pointers.
// ---------------------------------------------------------------------------------------------

[[noreturn]] void out_of_bounds(const char* buffer, int64_t index, int64_t extent,
                                size_t element_size);

// A pointer with the extent it may touch, [begin, end). Arithmetic is free; each dereference is
// checked. `buffer` names the allocation in messages ("argument 3", "shared array 2 ...").
template <typename T>
class CheckedPtr {
 public:
  CheckedPtr() = default;
  CheckedPtr(T* p, T* begin, T* end, const char* buffer)
      : p_(p), begin_(begin), end_(end), buffer_(buffer) {}
  // A raw pointer handed to a kernel launch: its extent is the PyTorch allocation holding it.
  CheckedPtr(T* p) : p_(p), buffer_("global memory") {  // NOLINT: implicit, as T* is
    const void* begin = nullptr;
    const void* end = nullptr;
    find_allocation(p, &begin, &end);
    begin_ = static_cast<T*>(const_cast<void*>(begin));
    end_ = static_cast<T*>(const_cast<void*>(end));
  }
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  CheckedPtr(const CheckedPtr<U>& o)  // NOLINT: T* to const T*, as for raw pointers
      : p_(o.raw()), begin_(o.begin()), end_(o.end()), buffer_(o.buffer()) {}

  T* raw() const { return p_; }
  T* begin() const { return begin_; }
  T* end() const { return end_; }
  const char* buffer() const { return buffer_; }

  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  CheckedPtr operator+(I n) const { return {p_ + n, begin_, end_, buffer_}; }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  CheckedPtr operator-(I n) const { return {p_ - n, begin_, end_, buffer_}; }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I i) const { return *checked(p_ + i, 1); }
  T& operator*() const { return *checked(p_, 1); }

  // p_ .. p_ + n - 1 checked, and p_ aligned to `align` bytes; returns p_.
  T* checked(T* p, int64_t n, size_t align = alignof(T)) const {
    if ((++access_count & 0xfffff) == 0) {
      check_deadline();
    }
    if (p < begin_ || p + n > end_) {
      out_of_bounds(buffer_, p - begin_, end_ - begin_, sizeof(T));
    }
    if (reinterpret_cast<uintptr_t>(p) % align != 0) {
      fail(std::string("misaligned access to ") + buffer_ + ": " + std::to_string(n) +
           " elements at an address not aligned to " + std::to_string(align) + " bytes");
    }
    return p;
  }
  // The sub-range [p_ + offset, p_ + offset + n) as its own extent (a row of an array).
  CheckedPtr narrow(int64_t offset, int64_t n) const {
    T* b = checked(p_ + offset, n);
    return {b, b, b + n, buffer_};
  }

 private:
  T* p_ = nullptr;
  T* begin_ = nullptr;
  T* end_ = nullptr;
  const char* buffer_ = "";
};

// `n` elements at p viewed as one V (a vector access: Pack<T, n>), bounds and alignment checked.
template <typename V, typename T>
V& view_as(const CheckedPtr<T>& p, int64_t n) {
  return *reinterpret_cast<V*>(p.checked(p.raw(), n, alignof(V)));
}

// ---------------------------------------------------------------------------------------------
// Shared arrays: T[N0][N1]... with every index checked against its dimension.
// ---------------------------------------------------------------------------------------------

[[noreturn]] void index_out_of_range(const char* buffer, int64_t index, int64_t size);

template <typename T, int... N>
class ArrayView;

template <typename T, int N0>
class ArrayView<T, N0> {
 public:
  explicit ArrayView(CheckedPtr<T> p) : p_(p) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I i) const {
    if (i < 0 || i >= N0) {
      index_out_of_range(p_.buffer(), i, N0);
    }
    return p_[i];
  }
  // Decay to a pointer to the first element (for vector accesses: pack_at(row + offset)).
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  CheckedPtr<T> operator+(I n) const { return p_ + n; }
  operator CheckedPtr<T>() const { return p_; }  // NOLINT: arrays decay

 protected:
  CheckedPtr<T> p_;
};

template <typename T, int N0, int N1, int... Rest>
class ArrayView<T, N0, N1, Rest...> {
 public:
  static constexpr int64_t kStride = (int64_t{N1} * ... * int64_t{Rest});
  explicit ArrayView(CheckedPtr<T> p) : p_(p) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  ArrayView<T, N1, Rest...> operator[](I i) const {
    if (i < 0 || i >= N0) {
      index_out_of_range(p_.buffer(), i, N0);
    }
    return ArrayView<T, N1, Rest...>(p_.narrow(static_cast<int64_t>(i) * kStride, kStride));
  }

 protected:
  CheckedPtr<T> p_;
};

const char* describe_shared_array(size_t element_size, const int64_t* dims, int rank);

// A __shared__ T[N0][N1]...: each thread's handle points at the block's one copy.
template <typename T, int... N>
class SharedArray : public ArrayView<T, N...> {
 public:
  static constexpr int64_t kElements = (int64_t{N} * ...);
  SharedArray() : ArrayView<T, N...>(allocate()) {}

 private:
  static CheckedPtr<T> allocate() {
    static constexpr int64_t dims[] = {N...};
    const char* what = describe_shared_array(sizeof(T), dims, sizeof...(N));
    T* p = static_cast<T*>(shared_array(sizeof(T) * kElements, alignof(T), what));
    return CheckedPtr<T>(p, p, p + kElements, what);
  }
};

template <typename T>
CheckedPtr<T> dynamic_shared_array() {
  size_t bytes = 0;
  T* p = static_cast<T*>(dynamic_shared(&bytes));
  return CheckedPtr<T>(p, p, p + bytes / sizeof(T), "dynamic shared memory");
}

// ---------------------------------------------------------------------------------------------
// Kernel launch: the arguments converted to the kernel's parameter types once, on the host (raw
// pointers become CheckedPtr over their allocation), then every thread calls the kernel.
// ---------------------------------------------------------------------------------------------

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

// "caa_pv_kernel<float, 4>" from this function's signature (kernel = ...::caa_pv_kernel<...>).
std::string kernel_name_from_signature(const char* pretty_function);

template <auto kernel>
const std::string& kernel_name() {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  return name;
}

template <auto kernel, typename... Args>
void launch_kernel(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t /*stream*/,
                   Args&&... args) {
  const typename KernelParams<decltype(kernel)>::type params(std::forward<Args>(args)...);
  run_grid(kernel_name<kernel>(), reinterpret_cast<const void*>(kernel), grid, block,
           dynamic_shared_bytes, [&params] { std::apply(kernel, params); });
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles (width 32 only: what the kernels use).
// ---------------------------------------------------------------------------------------------

template <typename T>
T shuffle_value(unsigned mask, T var, int src_lane, int line, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16);
  T result;
  shuffle(mask, &var, sizeof(T), src_lane, &result, line, what);
  return result;
}

inline int lane_id() {
  const ThreadState& t = *current_thread;
  const unsigned linear =
      t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z);
  return static_cast<int>(linear % kWarpSize);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::current_thread->thread_idx)
#define blockIdx (::cuda_emu::current_thread->block_idx)
#define blockDim (::cuda_emu::current_thread->block_dim)
#define gridDim (::cuda_emu::current_thread->grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads(__LINE__)

// The line of the caller (__builtin_LINE as a default argument) identifies the shuffle.
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, int line = __builtin_LINE()) {
  if (width != 32) {
    ::cuda_emu::fail("__shfl_sync: the emulation supports width 32 only");
  }
  return ::cuda_emu::shuffle_value(mask, var, src_lane & 31, line, "__shfl_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  int line = __builtin_LINE()) {
  if (width != 32) {
    ::cuda_emu::fail("__shfl_xor_sync: the emulation supports width 32 only");
  }
  return ::cuda_emu::shuffle_value(mask, var, (::cuda_emu::lane_id() ^ lane_mask) & 31, line,
                                   "__shfl_xor_sync");
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Emulated runtime API (what the host code calls).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  *value = ::cuda_emu::optin_shared_limit();
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > ::cuda_emu::optin_shared_limit()) {
    return cudaErrorInvalidValue;
  }
  ::cuda_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

// The kernels register as CPU kernels of the emulated op namespace (torch.ops.dpt_fast_emulated),
// whose schemas class_aware_attention.cpp declares under DPT_FAST_OPS_LIBRARY.
#define DPT_FAST_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(dpt_fast_emulated, CPU, m)
#define DPT_FAST_OPS_LIBRARY(m) TORCH_LIBRARY(dpt_fast_emulated, m)
