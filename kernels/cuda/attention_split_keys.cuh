// The bf16 joint attention of 16 queries and one head with the keys split over warps, shared by
// the split-keys kernel (attention_split_keys.cu) and the fused small-batch forward
// (fused_forward.cu): each warp takes every parts-th 64-key block through its own cp.async double
// buffer (K and V rows as in global memory, read by ldmatrix, V transposed) with its own online
// softmax (the lazy maximum of attention_common.cuh, or none where the scores are bounded), and
// one warp combines the partials.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {

struct SplitKeysBuffers {
  __nv_bfloat16 k[2][kKeyBlock * kBf16RowStride];
  __nv_bfloat16 v[2][kKeyBlock * kBf16RowStride];
};

// A warp's result for the two rows of one lane: unnormalised output, offset and row sum.
struct SplitKeysPartial {
  float o[2][4];
  float m0, m1, l0, l1;
};

// One warp's partial for joint query rows q0 + g and q0 + g + 8 (clamped to the sample's last
// row) of the sample at `tile`, over its key blocks part, part + parts, ... q, k and v point at
// the sample's first row and the head's first column; rows are `dim` apart. q is read through L2
// (it may have been written by another CTA of the same launch). kBounded: the scores are exp2
// exponents as they are (AttentionParams::scores_bounded); the partial's offsets are 0.
template <bool kBounded>
__device__ __forceinline__ SplitKeysPartial SplitKeysWarp(const AttnTile& tile, int q0,
                                                          const __nv_bfloat16* q,
                                                          const __nv_bfloat16* k,
                                                          const __nv_bfloat16* v, int dim,
                                                          const uint32_t* mask, float scale_log2,
                                                          int part, int parts,
                                                          SplitKeysBuffers& wb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int T = tile.num_keys;
  const int rr0 = min(q0 + g, T - 1), rr1 = min(q0 + g + 8, T - 1);
  const uint32_t k_lane = KRowOffset(lane), v_lane = VRowOffset(lane);
  auto stage = [&](int kb, int buf) {
#pragma unroll
    for (int i = lane; i < 2 * kKeyBlock; i += 32) {
      const int j = i >> 1, h = (i & 1) * 8;
      const bool valid = kb + j < T;
      const int src = (valid ? kb + j : 0) * dim + h;
      CpAsync16OrZero(wb.k[buf] + j * kBf16RowStride + h, k + src, valid);
      CpAsync16OrZero(wb.v[buf] + j * kBf16RowStride + h, v + src, valid);
    }
    CpAsyncCommit();
  };
  int kb = kKeyBlock * part;
  if (kb < T) stage(kb, 0);
  uint32_t qa[4];
  {
    const __nv_bfloat16* qt = q + 2 * t;
    qa[0] = __ldcg(reinterpret_cast<const unsigned int*>(qt + rr0 * dim));
    qa[1] = __ldcg(reinterpret_cast<const unsigned int*>(qt + rr1 * dim));
    qa[2] = __ldcg(reinterpret_cast<const unsigned int*>(qt + rr0 * dim + 8));
    qa[3] = __ldcg(reinterpret_cast<const unsigned int*>(qt + rr1 * dim + 8));
  }

  float m0 = -INFINITY, m1 = -INFINITY;  // offsets of rows g, g + 8 (raw scores)
  float b0 = 0.0f, b1 = 0.0f;            // the same times scale_log2 (0 while -inf)
  const float lazy = kLazyLog2 / scale_log2;
  float o[2][4] = {};
  float osum[4] = {};  // row sums of P: rows g (0, 1) and g + 8 (2, 3)
  for (int buf = 0; kb < T; kb += parts * kKeyBlock, buf ^= 1) {
    const int next = kb + parts * kKeyBlock;
    if (next < T) stage(next, buf ^ 1);
    if (next < T) {
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    __syncwarp();
    const uint32_t k_base = k_lane + static_cast<uint32_t>(__cvta_generic_to_shared(wb.k[buf]));
    const uint32_t v_base = v_lane + static_cast<uint32_t>(__cvta_generic_to_shared(wb.v[buf]));
    float s[8][4];
    ScoreBlockBf16(s, qa, k_base);
    if (mask != nullptr || kb + kKeyBlock > T) {
      MaskScoreBlock(s, mask, tile.seq_len, T, rr0, rr1, kb, t);
    }
    if constexpr (kBounded) {
      m0 = m1 = 0.0f;
    } else {
      float mx0, mx1;
      BlockRowMax(s, mx0, mx1);
      LazyRescale(mx0, mx1, lazy, scale_log2, m0, m1, b0, b1, o, osum);
      ToExponents(s, b0, b1, scale_log2);
    }
    AccumulatePV(s, v_base, o, osum);
    __syncwarp();  // this buffer's ldmatrix reads are done before it is refilled
  }
  SplitKeysPartial r;
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) r.o[n][e] = o[n][e];
  r.m0 = m0;
  r.m1 = m1;
  r.l0 = osum[0];
  r.l1 = osum[2];
  return r;
}

// The normalised output of this lane's rows (out[n]: columns 8n + 2t, +1 of rows g (elements 0,
// 1) and g + 8 (2, 3)) from the partials part[w][lane] of `parts` warps, each rescaled to the
// largest offset (a warp's partial is relative to its own offset, which the lazy maximum keeps
// within 2^8 of its largest score; a warp that saw no visible key of a row has offset -inf and
// weight 0).
__device__ __forceinline__ void CombineSplitKeys(const SplitKeysPartial (*part)[32], int parts,
                                                 float scale_log2, float (&out)[2][4]) {
  const int lane = threadIdx.x & 31;
  float mx0 = -INFINITY, mx1 = -INFINITY;
  for (int w = 0; w < parts; ++w) {
    mx0 = fmaxf(mx0, part[w][lane].m0);
    mx1 = fmaxf(mx1, part[w][lane].m1);
  }
  float l0 = 0.0f, l1 = 0.0f;
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[n][e] = 0.0f;
  for (int w = 0; w < parts; ++w) {
    const SplitKeysPartial& pw = part[w][lane];
    const float f0 = pw.m0 == -INFINITY ? 0.0f : Exp2((pw.m0 - mx0) * scale_log2);
    const float f1 = pw.m1 == -INFINITY ? 0.0f : Exp2((pw.m1 - mx1) * scale_log2);
    l0 += f0 * pw.l0;
    l1 += f1 * pw.l1;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      out[n][0] += f0 * pw.o[n][0];
      out[n][1] += f0 * pw.o[n][1];
      out[n][2] += f1 * pw.o[n][2];
      out[n][3] += f1 * pw.o[n][3];
    }
  }
  // Approximate reciprocals: the output is rounded to bf16.
  const float inv0 = __fdividef(1.0f, l0), inv1 = __fdividef(1.0f, l1);
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    out[n][0] *= inv0;
    out[n][1] *= inv0;
    out[n][2] *= inv1;
    out[n][3] *= inv1;
  }
}

}  // namespace cuda
}  // namespace mmdit
