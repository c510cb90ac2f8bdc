// What the two attention kernels share: exp2 on the MUFU, the visibility bits of the mask
// (MODEL.md step 6), and the per-block steps of the online softmax on a warp's 16 x 64 score
// block in the m16n8 accumulator layout (s[j][0..1]: row g, keys 8j + 2t, +1; s[j][2..3]:
// row g + 8).
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

// Hides the keys of the block at kb that joint query rows rr0 and rr1 do not see; `mask` null:
// only the keys past the sample's last (T) are hidden.
__device__ __forceinline__ void MaskScoreBlock(float (&s)[8][4], const uint32_t* mask, int L, int T,
                                               int rr0, int rr1, int kb, int t) {
  const uint64_t vis0 =
      VisibleWord(mask, L, T, rr0, kb) | (uint64_t)VisibleWord(mask, L, T, rr0, kb + 32) << 32;
  const uint64_t vis1 =
      VisibleWord(mask, L, T, rr1, kb) | (uint64_t)VisibleWord(mask, L, T, rr1, kb + 32) << 32;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * t + e;
      if (!((vis0 >> col) & 1u)) s[j][e] = -INFINITY;
      if (!((vis1 >> col) & 1u)) s[j][2 + e] = -INFINITY;
    }
  }
}

// The maximum of each of this thread's two rows over the block, reduced over the row's quad.
__device__ __forceinline__ void BlockRowMax(const float (&s)[8][4], float& mx0, float& mx1) {
  mx0 = -INFINITY;
  mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
    mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
}

// Accumulators of rows g (elements 0, 1) and g + 8 (2, 3) times their rows' factors.
__device__ __forceinline__ void ScaleRows(float (&v)[4], float al0, float al1) {
  v[0] *= al0;
  v[1] *= al0;
  v[2] *= al1;
  v[3] *= al1;
}
template <int kN>
__device__ __forceinline__ void ScaleRows(float (&o)[kN][4], float al0, float al1) {
#pragma unroll
  for (int n = 0; n < kN; ++n) ScaleRows(o[n], al0, al1);
}

}  // namespace cuda
}  // namespace mmdit
