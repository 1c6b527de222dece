// CUDA emulation stand-in for c10/cuda/CUDAFunctions.h (current_device is in CUDAGuard.h).
#pragma once
#include "CUDAGuard.h"
