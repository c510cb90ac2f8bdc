// Joint attention, bf16, for batches of a sample or two: one CTA per (16 queries, head) whose four
// warps split the keys (warp w takes the 64-key blocks w, w + 4, ...), each with its own online
// softmax, and combine their partial results through shared memory. With whole tiles per warp
// (attention_bf16.cu), a batch of one is 32 CTAs and each warp's four key blocks of a 250-token
// sample are one dependent chain; here it is 128 CTAs and one block per warp.
//
// Each warp streams its blocks through its own double buffer (cp.async): K and V rows as they are
// in global memory, read by ldmatrix (V transposed), as in the persistent kernel.
#include <cuda_bf16.h>

#include <atomic>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;

struct WarpBuffers {
  bf16 k[2][kKeyBlock * kBf16RowStride];
  bf16 v[2][kKeyBlock * kBf16RowStride];
};

// A warp's result for the two rows of one lane: unnormalised output, offset and row sum.
struct Partial {
  float o[2][4];
  float m0, m1, l0, l1;
};

struct Smem {
  WarpBuffers warp[kWarps];
  Partial part[kWarps][32];
};

__global__ void __launch_bounds__(kWarps * 32) AttentionSplitKeysKernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  LaunchDependents();
  const AttnTile tile = p.tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int T = tile.num_keys;
  const int r0 = tile.q0 + g, r1 = r0 + 8;
  const int rr0 = min(r0, T - 1), rr1 = min(r1, T - 1);
  const int base = tile.tok_off * p.dim + head * kHeadDim;  // Create bounds this below 2^30
  const uint32_t* mask = tile.mask_off >= 0 ? p.mask_bits + tile.mask_off : nullptr;
  const bf16* k = static_cast<const bf16*>(p.k) + base;
  const bf16* v = static_cast<const bf16*>(p.v) + base;
  WarpBuffers& wb = sm.warp[warp];
  const uint32_t k_lane = KRowOffset(lane), v_lane = VRowOffset(lane);

  auto stage = [&](int kb, int buf) {
#pragma unroll
    for (int i = lane; i < 2 * kKeyBlock; i += 32) {
      const int j = i >> 1, h = (i & 1) * 8;
      const bool valid = kb + j < T;
      const int src = (valid ? kb + j : 0) * p.dim + h;
      CpAsync16OrZero(wb.k[buf] + j * kBf16RowStride + h, k + src, valid);
      CpAsync16OrZero(wb.v[buf] + j * kBf16RowStride + h, v + src, valid);
    }
    CpAsyncCommit();
  };

  WaitForPredecessor();
  int kb = kKeyBlock * warp;
  if (kb < T) stage(kb, 0);
  uint32_t qa[4];
  {
    const bf16* q = static_cast<const bf16*>(p.q) + base + 2 * t;
    qa[0] = *reinterpret_cast<const uint32_t*>(q + rr0 * p.dim);
    qa[1] = *reinterpret_cast<const uint32_t*>(q + rr1 * p.dim);
    qa[2] = *reinterpret_cast<const uint32_t*>(q + rr0 * p.dim + 8);
    qa[3] = *reinterpret_cast<const uint32_t*>(q + rr1 * p.dim + 8);
  }

  float m0 = -INFINITY, m1 = -INFINITY;  // offsets of rows g, g + 8 (raw scores)
  float b0 = 0.0f, b1 = 0.0f;            // the same times scale_log2 (0 while -inf)
  const float lazy = kLazyLog2 / p.scale_log2;
  float o[2][4] = {};
  float osum[4] = {};  // row sums of P: rows g (0, 1) and g + 8 (2, 3)
  for (int buf = 0; kb < T; kb += kWarps * kKeyBlock, buf ^= 1) {
    const int next = kb + kWarps * kKeyBlock;
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
    float mx0, mx1;
    BlockRowMax(s, mx0, mx1);
    LazyRescale(mx0, mx1, lazy, p.scale_log2, m0, m1, b0, b1, o, osum);
    AccumulatePV(s, b0, b1, p.scale_log2, v_base, o, osum);
    __syncwarp();  // this buffer's ldmatrix reads are done before it is refilled
  }

  Partial& mine = sm.part[warp][lane];
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mine.o[n][e] = o[n][e];
  mine.m0 = m0;
  mine.m1 = m1;
  mine.l0 = osum[0];
  mine.l1 = osum[2];
  __syncthreads();
  if (warp != 0) return;
  // Warp 0 combines the four partials of its lane's rows, each rescaled to the largest offset (a
  // warp's partial is relative to its own offset, which the lazy maximum keeps within 2^8 of its
  // largest score; a warp that saw no visible key of a row has offset -inf and weight 0).
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    mx0 = fmaxf(mx0, sm.part[w][lane].m0);
    mx1 = fmaxf(mx1, sm.part[w][lane].m1);
  }
  float out[2][4] = {}, l0 = 0.0f, l1 = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const Partial& pw = sm.part[w][lane];
    const float f0 = pw.m0 == -INFINITY ? 0.0f : Exp2((pw.m0 - mx0) * p.scale_log2);
    const float f1 = pw.m1 == -INFINITY ? 0.0f : Exp2((pw.m1 - mx1) * p.scale_log2);
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
  bf16* dst = static_cast<bf16*>(p.out) + base + 2 * t;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    if (r0 < T) Store2(dst + r0 * p.dim + 8 * n, out[n][0] * inv0, out[n][1] * inv0);
    if (r1 < T) Store2(dst + r1 * p.dim + 8 * n, out[n][2] * inv1, out[n][3] * inv1);
  }
}

}  // namespace

absl::Status LaunchAttentionSplitKeys(const AttentionParams& params, cudaStream_t stream) {
  if (params.num_tiles == 0) return absl::OkStatus();
  static std::atomic<uint64_t> smem_set{0};
  const void* func = reinterpret_cast<const void*>(&AttentionSplitKeysKernel);
  if (absl::Status s = AllowDynamicSmem(func, sizeof(Smem), smem_set); !s.ok()) return s;
  CUDA_RETURN_IF_ERROR(LaunchPdl(AttentionSplitKeysKernel,
                                 dim3(params.num_tiles, params.dim / kHeadDim),
                                 dim3(kWarps * 32), sizeof(Smem), stream, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
