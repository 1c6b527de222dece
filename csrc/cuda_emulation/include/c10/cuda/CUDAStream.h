// CUDA emulation stand-in for c10/cuda/CUDAStream.h: one stream, which kernels ignore (the
// emulation runs each launch to completion before returning).
#pragma once
#include "../../../cuda_emulation.h"

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char /*device*/ = -1) { return {}; }

}  // namespace c10::cuda
