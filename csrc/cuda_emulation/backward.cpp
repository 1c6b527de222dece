// The CUDA backward kernels and their host code, compiled as C++ for the emulation (cuda_emulation.h).
#include "../class_aware_attention_cuda_backward.cu"
