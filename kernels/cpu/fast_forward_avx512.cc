// The fast forward's task bodies for x86-64 CPUs with AVX-512 (F, VL, BW, DQ; Skylake-SP and
// later), compiled with those flags and used only where the CPU reports them.
#define MMDIT_ISA avx512
#define MMDIT_ISA_NAME "avx512"
#include "kernels/cpu/fast_forward_kernels.inc"
