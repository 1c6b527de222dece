// CUDA emulation stand-in for c10/cuda/CUDAGuard.h: one emulated device, index 0; the tensors
// are CPU tensors.
#pragma once
#include "../../../cuda_emulation.h"

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device /*device*/) {}
};

inline signed char current_device() { return 0; }

}  // namespace c10::cuda
