// What the two attention kernels share: exp2 on the MUFU and the visibility bits of the mask
// (MODEL.md step 6) for one query row and 32 keys.
#pragma once

#include <cstdint>

namespace mmdit {
namespace cuda {

// exp2 on the MUFU alone: exp2f() adds denormal handling on the ALU pipe, the busiest pipe of
// this kernel in the first profile (45 %). Inputs are <= 0; flushing results below 2^-126 to 0
// changes nothing that a softmax keeps.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 2^x for two bf16 values at once.
__device__ __forceinline__ uint32_t Exp2Bf16x2(uint32_t x) {
  uint32_t y;
  asm("ex2.approx.ftz.bf16x2 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Bits i of the result: key base + i is visible from joint query row r (MODEL.md step 6).
__device__ __forceinline__ uint32_t RangeBits(int base, int lo, int hi) {
  const int a = min(max(lo - base, 0), 32), b = min(max(hi - base, 0), 32);
  if (b <= a) return 0u;
  const uint32_t upto_b = b == 32 ? 0xffffffffu : ((1u << b) - 1u);
  const uint32_t upto_a = a == 32 ? 0xffffffffu : ((1u << a) - 1u);
  return upto_b & ~upto_a;
}

__device__ __forceinline__ uint32_t VisibleWord(const uint32_t* mask, int L, int T, int r,
                                                int base) {
  if (mask == nullptr) return RangeBits(base, 0, T);
  const int wl = (L + 31) / 32;
  const uint32_t* row_any = mask + (size_t)L * wl;
  const uint32_t* col_any = row_any + wl;
  const int w = base / 32;
  uint32_t x_bits = 0u;
  if (w < wl) x_bits = r < L ? mask[(size_t)r * wl + w] : col_any[w];
  x_bits &= RangeBits(base, 0, L);
  const bool sees_context = r >= L || ((row_any[r / 32] >> (r % 32)) & 1u);
  return x_bits | (sees_context ? RangeBits(base, L, T) : 0u);
}

}  // namespace cuda
}  // namespace mmdit
