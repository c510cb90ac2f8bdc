// The fast forward's task bodies for any x86-64 CPU (baseline SSE2).
#define MMDIT_ISA generic
#define MMDIT_ISA_NAME "generic"
#include "kernels/cpu/fast_forward_kernels.inc"
