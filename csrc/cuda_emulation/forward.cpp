// The CUDA forward kernels and their host code, compiled as C++ for the emulation
// (cuda_emulation.h), with the op's schemas and input checks (in the dpt_fast_emulated
// namespace). One unit rather than two: each one parses ATen's headers, most of its build time.
#include "../class_aware_attention.cpp"
#include "../class_aware_attention_cuda_forward.cu"
