// What the attention kernels share: exp2 on the MUFU, the visibility bits of the mask
// (MODEL.md step 6), and the per-block steps of the online softmax on a warp's 16 x 64 score
// block in the m16n8 accumulator layout (s[j][0..1]: row g, keys 8j + 2t, +1; s[j][2..3]:
// row g + 8); for the bf16 kernels with K and V staged row-major (attention_bf16.cu,
// attention_split_keys.cu), the block's products and its lazy offset update (which bounded
// scores, AttentionParams::scores_bounded, do without).
#pragma once

#include <cstdint>

#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {

// Keys per score block in registers (s[8][4]: a warp's 16 queries x 64 keys).
constexpr int kKeyBlock = 64;

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
  // Shifted by this lane's first column, so that each test below is of a constant bit (per-lane
  // bit masks, 32 of them, were spilled).
  const uint64_t vis0 =
      (VisibleWord(mask, L, T, rr0, kb) | (uint64_t)VisibleWord(mask, L, T, rr0, kb + 32) << 32) >>
      (2 * t);
  const uint64_t vis1 =
      (VisibleWord(mask, L, T, rr1, kb) | (uint64_t)VisibleWord(mask, L, T, rr1, kb + 32) << 32) >>
      (2 * t);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + e;
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

// bf16 K and V rows staged as in global memory, kBf16RowStride values apart (48 bytes:
// conflict-free ldmatrix). The byte offsets of this lane's ldmatrix rows within a 16-key group:
// K (keys x dims, not transposed) and V (transposed), see the fragment layouts in mma.cuh.
constexpr int kBf16RowStride = 24;
__device__ __forceinline__ uint32_t KRowOffset(int lane) {
  return 2 * ((((lane >> 4) << 3) + (lane & 7)) * kBf16RowStride + (((lane >> 3) & 1) << 3));
}
__device__ __forceinline__ uint32_t VRowOffset(int lane) {
  return 2 * (((((lane >> 3) & 1) << 3) + (lane & 7)) * kBf16RowStride + ((lane >> 4) << 3));
}

// ldmatrix x4 at a shared-memory address (this lane's row), plain and transposed.
__device__ __forceinline__ void LdMatrixX4At(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4TransAt(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The scores Q K^T of the 64 keys whose K rows start at k_addr (this lane's row offset
// included).
__device__ __forceinline__ void ScoreBlockBf16(float (&s)[8][4], const uint32_t (&qa)[4],
                                               uint32_t k_addr) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    uint32_t kf[4];
    LdMatrixX4At(kf, k_addr + 16 * u * kBf16RowStride * 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) MmaBf16Zero(s[2 * u + h], qa, kf[2 * h], kf[2 * h + 1]);
  }
}

// Lazy maximum: the offsets m (raw scores; b = m * scale_log2, 0 while -inf) move, and o and the
// row sums are rescaled, only when a row's block maximum exceeds its offset by more than `lazy`
// (kLazyLog2 in exp2 units), decided for the whole warp. Skipped, the exponentials stay below
// 2^kLazyLog2, far inside bf16 and fp32 range, and o / l does not depend on the offset.
constexpr float kLazyLog2 = 8.0f;
__device__ __forceinline__ void LazyRescale(float mx0, float mx1, float lazy, float scale_log2,
                                            float& m0, float& m1, float& b0, float& b1,
                                            float (&o)[2][4], float (&osum)[4]) {
  if (__any_sync(0xffffffffu, mx0 > m0 + lazy || mx1 > m1 + lazy)) {
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float nb0 = mn0 == -INFINITY ? 0.0f : mn0 * scale_log2;
    const float nb1 = mn1 == -INFINITY ? 0.0f : mn1 * scale_log2;
    const float al0 = Exp2(m0 * scale_log2 - nb0), al1 = Exp2(m1 * scale_log2 - nb1);
    m0 = mn0;
    m1 = mn1;
    b0 = nb0;
    b1 = nb1;
    ScaleRows(o, al0, al1);
    ScaleRows(osum, al0, al1);
  }
}

// Scores to exp2 exponents, in place: s * scale_log2 - b0 on row g, - b1 on row g + 8.
__device__ __forceinline__ void ToExponents(float (&s)[8][4], float b0, float b1,
                                            float scale_log2) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    s[j][0] = fmaf(s[j][0], scale_log2, -b0);
    s[j][1] = fmaf(s[j][1], scale_log2, -b0);
    s[j][2] = fmaf(s[j][2], scale_log2, -b1);
    s[j][3] = fmaf(s[j][3], scale_log2, -b1);
  }
}

// o += P V and osum += P 1 for P = exp2(e) of the 64 keys whose V rows start at v_addr (this
// lane's row offset included). Exponentials in fp32, packed to bf16 as P's A operand
// (ex2.approx.bf16x2 is two MUFU operations and a PRMT in SASS: no cheaper); row sums from the
// tensor cores as P times a column of ones.
__device__ __forceinline__ void AccumulatePV(const float (&e)[8][4], uint32_t v_addr,
                                             float (&o)[2][4], float (&osum)[4]) {
  constexpr uint32_t kOnes = 0x3f803f80u;  // bf16x2 (1, 1)
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    uint32_t a[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * u + h;
      a[2 * h] = PackBf16(Exp2(e[j][0]), Exp2(e[j][1]));
      a[2 * h + 1] = PackBf16(Exp2(e[j][2]), Exp2(e[j][3]));
    }
    uint32_t vf[4];
    LdMatrixX4TransAt(vf, v_addr + 16 * u * kBf16RowStride * 2);
    MmaBf16(o[0], a, vf[0], vf[1]);
    MmaBf16(o[1], a, vf[2], vf[3]);
    MmaBf16(osum, a, kOnes, kOnes);
  }
}

}  // namespace cuda
}  // namespace mmdit
