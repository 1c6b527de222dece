// CUDA emulation stand-in for c10/cuda/CUDAException.h: a launch that fails throws from the
// launch itself, so the launch check has nothing left to do.
#pragma once
#include "../../../cuda_emulation.h"

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t dpt_emu_error = (expr);                                         \
    TORCH_CHECK(dpt_emu_error == cudaSuccess, "CUDA error (emulated): ",              \
                cudaGetErrorString(dpt_emu_error));                                   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
