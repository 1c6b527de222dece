// CUDA emulation stand-in for the toolkit's cuda_runtime.h: what the host code uses is declared in
// cuda_emulation.h, which the emulated build force-includes before every source.
#pragma once
#include "../cuda_emulation.h"
