// Joint attention, bf16, for batches of a sample or two: one CTA per (16 queries, head) whose four
// warps split the keys (warp w takes the 64-key blocks w, w + 4, ...) and combine their partial
// results through shared memory (attention_split_keys.cuh). With whole tiles per warp
// (attention_bf16.cu), a batch of one is 32 CTAs and each warp's four key blocks of a 250-token
// sample are one dependent chain; here it is 128 CTAs and one block per warp.
#include <cuda_bf16.h>

#include <atomic>

#include "kernels/cuda/attention_split_keys.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;

struct Smem {
  SplitKeysBuffers warp[kWarps];
  SplitKeysPartial part[kWarps][32];
};

template <bool kBounded>
__global__ void __launch_bounds__(kWarps * 32) AttentionSplitKeysKernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  LaunchDependents();
  const AttnTile tile = p.tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int T = tile.num_keys;
  const int r0 = tile.q0 + g, r1 = r0 + 8;
  const int base = tile.tok_off * p.dim + head * kHeadDim;  // Create bounds this below 2^30
  const uint32_t* mask = tile.mask_off >= 0 ? p.mask_bits + tile.mask_off : nullptr;
  WaitForPredecessor();
  sm.part[warp][lane] =
      SplitKeysWarp<kBounded>(tile, tile.q0, static_cast<const bf16*>(p.q) + base,
                              static_cast<const bf16*>(p.k) + base,
                              static_cast<const bf16*>(p.v) + base, p.dim, mask, p.scale_log2,
                              warp, kWarps, sm.warp[warp]);
  __syncthreads();
  if (warp != 0) return;
  float out[2][4];
  CombineSplitKeys(sm.part, kWarps, p.scale_log2, out);
  bf16* dst = static_cast<bf16*>(p.out) + base + 2 * t;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    if (r0 < T) Store2(dst + r0 * p.dim + 8 * n, out[n][0], out[n][1]);
    if (r1 < T) Store2(dst + r1 * p.dim + 8 * n, out[n][2], out[n][3]);
  }
}

template <bool kBounded>
absl::Status Launch(const AttentionParams& params, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  const void* func = reinterpret_cast<const void*>(&AttentionSplitKeysKernel<kBounded>);
  if (absl::Status s = AllowDynamicSmem(func, sizeof(Smem), smem_set); !s.ok()) return s;
  CUDA_RETURN_IF_ERROR(LaunchPdl(AttentionSplitKeysKernel<kBounded>,
                                 dim3(params.num_tiles, params.dim / kHeadDim),
                                 dim3(kWarps * 32), sizeof(Smem), stream, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchAttentionSplitKeys(const AttentionParams& params, cudaStream_t stream) {
  if (params.num_tiles == 0) return absl::OkStatus();
  return params.scores_bounded ? Launch<true>(params, stream) : Launch<false>(params, stream);
}

}  // namespace cuda
}  // namespace mmdit
