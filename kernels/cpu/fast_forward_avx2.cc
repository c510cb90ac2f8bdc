// The fast forward's task bodies for x86-64 CPUs with AVX2 and FMA (compiled with -mavx2 -mfma;
// used only where the CPU reports both).
#define MMDIT_ISA avx2
#define MMDIT_ISA_NAME "avx2"
#include "kernels/cpu/fast_forward_kernels.inc"
