// The op schemas and input checks, compiled for the emulation (dpt_fast_emulated namespace).
#include "../class_aware_attention.cpp"
