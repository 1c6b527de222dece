// Small kernels that show the emulation's checks at work (tests/ops/test_cuda_emulation.py): each
// breaks one rule on purpose, and the test expects the emulation to say so.
#include "cuda_emulation.h"

#include <cstdio>
#include <stdexcept>

namespace {

using cuda_emu::CheckedPtr;
using cuda_emu::SharedArray;

// Block sum through shared memory and a warp shuffle: correct, the control case.
__global__ void selftest_sum_kernel(CheckedPtr<float> data, int n) {
  __shared__ SharedArray<float, 64> partial;
  float x = threadIdx.x < static_cast<unsigned>(n) ? data[threadIdx.x] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  if (threadIdx.x % 32 == 0) {
    partial[threadIdx.x / 32] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    data[0] = partial[0] + partial[1];
  }
}

// A barrier only the first warp reaches: the second warp exits, the first waits forever.
__global__ void selftest_deadlock_kernel(CheckedPtr<float> data, int /*n*/) {
  if (threadIdx.x < 32) {
    __syncthreads();
    data[threadIdx.x] = 1.f;
  }
}

// Reads one element past a __shared__ tile.
__global__ void selftest_shared_oob_kernel(CheckedPtr<float> data, int /*n*/) {
  __shared__ SharedArray<float, 64> tile;
  tile[threadIdx.x] = 1.f;
  __syncthreads();
  data[threadIdx.x] = tile[threadIdx.x + 1];
}

// Reads one element past the global buffer.
__global__ void selftest_global_oob_kernel(CheckedPtr<float> data, int n) {
  data[threadIdx.x] = data[threadIdx.x + (threadIdx.x + 1 == static_cast<unsigned>(n) ? 1 : 0)];
}

// Neighbour exchange through shared memory without the barrier between write and read: the
// result depends on the order in which threads run.
__global__ void selftest_race_kernel(CheckedPtr<float> data, int /*n*/) {
  __shared__ SharedArray<float, 64> tile;
  tile[threadIdx.x] = data[threadIdx.x];
  data[threadIdx.x] = tile[(threadIdx.x + 1) % 64];
}

// Writes one element past a local array (registers on a GPU): -fsanitize=bounds reports it.
__global__ void selftest_local_oob_kernel(CheckedPtr<float> data, int n) {
  float r[4] = {};
  const int rows = n / 16;  // 4, but not a constant the compiler could check at build time
  for (int i = 0; i <= rows; ++i) {
    r[i] = data[threadIdx.x];
  }
  data[threadIdx.x] = r[0] + r[3];
}

}  // namespace

// Runs self-test kernel `which` with 64 threads on data (64 floats); returns 0, or 1 with the
// error message in err.
extern "C" __attribute__((visibility("default"))) int cuda_emu_selftest(int which, float* data,
                                                                       char* err, size_t size) {
  try {
    switch (which) {
      case 0:
        cuda_emu::launch_kernel<selftest_sum_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      case 1:
        cuda_emu::launch_kernel<selftest_deadlock_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      case 2:
        cuda_emu::launch_kernel<selftest_shared_oob_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      case 3:
        cuda_emu::launch_kernel<selftest_global_oob_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      case 4:
        cuda_emu::launch_kernel<selftest_race_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      case 5:
        cuda_emu::launch_kernel<selftest_local_oob_kernel>(1, 64, 0, nullptr, data, 64);
        break;
      default:
        throw std::runtime_error("no such self-test");
    }
  } catch (const std::exception& e) {
    std::snprintf(err, size, "%s", e.what());
    return 1;
  }
  return 0;
}
