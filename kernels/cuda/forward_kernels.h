// The kernels of the CUDA forward: one POD params struct per kernel and its launch wrapper. A
// wrapper computes the grid, sets the shared-memory attribute, launches on the caller's stream and
// never synchronizes. Shapes are dispatched over a small explicit set (D in {64, 128}, head dim
// 16, row tiles of 16 or 64 tokens); anything else is absl::UnimplementedError.
//
// Data layout of one batch: the tokens of sample b are rows [tok_off, tok_off + L + C) of every
// activation buffer, its L x tokens first and then its C context tokens (the joint order of the
// attention), so samples of different L and C pack without padding.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mmdit {
namespace cuda {

constexpr int kHeadDim = 16;
constexpr int kFusedMaxLayers = 64;  // the fused forward stages its layers' weight pointers

enum class Precision { kBf16, kFp32 };

struct SampleInfo {
  int tok_off;    // first token row of the sample
  int seq_len;    // L
  int ctx_len;    // C
  int start_pos;  // RoPE offset
  int mask_off;   // word offset of the sample's mask bits; -1: everything visible
  int pad[3];
};

// Mask bits of a masked sample at mask_off, Wl = ceil(L / 32) words per row:
// [L][Wl] x-query x-key bits, then [Wl] row-any bits, then [Wl] column-any bits (MODEL.md step 6).

// The weights of the wgmma row kernel (bf16, D = 128): for each layer and stream, the chunks it
// streams into shared memory in the order it uses them, each kWgmmaChunkBytes: the output
// projection, then per kWgmmaHidden hidden units of the MLP the up rows (scaled by 1/2) and the
// down columns (16 KB each), then q, k and v. A chunk holds its matrices in wgmma's K-major
// layout without swizzle (cuda_forward.cc, PackWgmmaB).
constexpr int kWgmmaChunkBytes = 32768;
constexpr int kWgmmaHidden = 64;
constexpr int kWgmmaMaxDimFF = 2048;  // its shared memory holds the vectors of up to this F
__host__ __device__ constexpr int WgmmaChunksPerLayer(int dim_ff) {
  return 4 + dim_ff / kWgmmaHidden;
}
// The wgmma row kernel's order of the model dimension (D = 128). Its accumulator element for
// column n = 8j + 2t + e (lane t of a quad, n8 tile j) is feature 16 (j / 2) + 4t + 2 (j % 2) + e:
// each lane owns runs of four consecutive features and the four lanes of a quad adjacent runs,
// so global accesses are 8 or 16 bytes wide and a quad's cover whole sectors. The weight images
// are packed in this order; global memory keeps the natural one.
__host__ __device__ constexpr int WgmmaFeature(int n) {
  return 16 * (n >> 4) + 4 * ((n & 7) >> 1) + 2 * ((n >> 3) & 1) + (n & 1);
}

// Small batches: the CTAs of a cluster that share one 16-token tile of the mma.sync row kernel
// (at most; clusters of two take over at larger small batches).
constexpr int kClusterSplit = 4;

// Row tiles are listed x-stream tiles first, then context tiles.
struct RowTile {
  int sample;
  int stream;  // 0: x, 1: context
  int row0;    // first row within the stream
  int rows;
};

// A group of consecutive row tiles of one stream, processed together by one CTA of the wgmma row
// kernel (one tile per warpgroup, up to three). Each tile is given as the kernel uses it, so
// that a round of the kernel starts with one load instead of a chain of three (group, tile,
// sample).
struct alignas(16) GroupTile {  // two 16-byte loads
  int tok0;    // first token row
  int rows;
  int sample;
  int pos0;    // RoPE position of the first row (x stream)
  int sample_tok0;    // the sample's first token row (SampleInfo::tok_off)
  int sample_tokens;  // L + C
  int items_target;   // per-sample sync: the attention's count for the sample when it is done
  int pad;
};
struct RowGroup {
  int count;   // 1 to 3
  int stream;  // 0: x, 1: context
  int pad[2];
  GroupTile tiles[3];
};

// A tile of queries of one sample, with what the attention kernels need of the sample (one load
// per item instead of the tile's and then its sample's).
struct alignas(16) AttnTile {  // two 16-byte loads
  int tok_off;   // the sample's first token row
  int q0;        // first joint query row
  int seq_len;   // L
  int num_keys;  // L + C
  int mask_off;  // SampleInfo::mask_off
  int sample;
  int rows_target;  // per-sample sync: the row kernel's count for the sample when it is done
  int pad;
};

// One stream of one layer on the device. Matrices are in mma fragment order (see
// cuda_forward.cc, PackFragments); vectors are float32.
struct StreamWeightsDev {
  const void* qkv_w;   // [3D, D]
  const void* out_w;   // [D, D]
  const void* up_w;    // [F, D]
  const void* down_w;  // [D, F]
  const float* qkv_b;
  const float* rms_q;
  const float* rms_k;
  const float* out_b;
  const float* out_rms;
  const float* up_b;
  const float* down_b;
};

// mod[b][layer][stream][6][D] = adaLN(silu(y_b)).
struct AdaLnParams {
  const float* y;        // [B][D]
  const float* w_t;      // [N][2][D][6D]: transposed so that threads read along 6D (fp32)
  const void* w_frag;    // bf16: the same as [N * 2 * 6D][D] bf16 hi then lo parts, in mma
                         // fragment order; null: fp32
  const void* w_images;  // bf16, D = 128 on compute capability 9.0, or null: the same matrix as
                         // wgmma images and the bias, kAdaLnChunkBytes per kAdaLnChunkColumns
                         // outputs, taken from kAdaLnWgmmaMinBatch samples on
  const float* b;        // [N][2][6D]
  float* mod;            // [B][N][2][6D]
  unsigned* progress;    // where set (bf16), zeroed: the per-sample sync counters of the forward
  int progress_words;
  int batch;
  int dim;
  int num_layers;
  int num_sms;  // w_images: the grid is about one CTA per SM
};
// The wgmma adaLN's weight chunks (adaln_wgmma.cu): 64 output columns' B images over D = 128,
// bf16 hi then lo, then the columns' bias (fp32).
inline constexpr int kAdaLnChunkColumns = 64;
inline constexpr int kAdaLnChunkBytes = 2 * kAdaLnChunkColumns * 128 * 2 + kAdaLnChunkColumns * 4;
// Below this batch the mma.sync adaLN runs even where the wgmma one could: one 64-sample block
// leaves the wgmma kernel's second warpgroup idle, and at B = 1 it took 9.5 us against 6.9
// (Nsight, H100).
inline constexpr int kAdaLnWgmmaMinBatch = 65;
// Whether a forward of `batch` samples takes the wgmma adaLN, given its weight images.
inline bool AdaLnOnWgmma(const void* w_images, int batch) {
  return w_images != nullptr && batch >= kAdaLnWgmmaMinBatch;
}

// The row-local part of layers: for each tile of one stream of one sample, optionally the end of
// layer `post_layer` (output projection + RMSNorm + gated residual, modulated LN + MLP + gated
// residual) and then optionally the start of layer `qkv_layer` (modulated LN, q/k/v projection,
// q/k RMSNorm, RoPE on the x stream).
struct RowParams {
  const RowTile* tiles;
  const SampleInfo* samples;
  const StreamWeightsDev* weights;  // [N][2]
  const float* mod;                 // see AdaLnParams
  const float* x_src;               // residual in  [tokens][D] float32
  float* x_dst;                     // residual out (may equal x_src); null: not written
  // The wgmma kernel only: where set, the residual in (instead of x_src) or out (instead of
  // x_dst) as [tokens][D] bf16 (CudaForwardOptions::bf16_residual).
  const void* xb_src;
  void* xb_dst;
  const void* attn;                 // attention output [tokens][D], T-typed
  void* q;                          // [tokens][D], T-typed
  void* k;
  void* v;
  int num_tiles;
  int num_layers;
  int dim_ff;                       // F (a multiple of D)
  int post_layer;                   // -1: none
  int qkv_layer;                    // -1: none
  const float2* rope;               // [max_seq_len][kHeadDim / 2] (cos, sin) of pos * inv_freq
  const RowGroup* groups;           // the wgmma kernel's work: CTA c takes groups c, c + grid, ...
  int num_groups;
  int num_sms;                      // the wgmma kernel's grid: at most one CTA per SM
  // bf16, D = 128, 64-row tiles: the images of the wgmma row kernel ([N][2][chunks]); null:
  // the mma.sync kernel.
  const void* wgmma_images;
  // The mma.sync kernel with 16-token tiles: CTAs per tile (1, or a cluster of 2 or
  // kClusterSplit).
  int cluster_split;
  // q, k, v and the attention output of a sample as [head][token][Dh] instead of [token][D]
  // (the wgmma kernel only; CudaForwardOptions::head_major_attention).
  bool head_major;
  // Per-sample sync (the wgmma kernel, head-major; CudaForwardOptions::per_sample_sync): instead
  // of waiting for the whole previous kernel, a tile waits until items_done[sample] reaches its
  // GroupTile::items_target (the attention of post_layer), and each finished tile adds one to
  // rows_done[sample] (the q/k/v of qkv_layer). The first row kernel (no post_layer) still waits
  // for the adaLN, which zeroes every counter.
  bool sample_sync;
  const unsigned* items_done;
  unsigned* rows_done;
};

// Joint attention of one head over a tile of queries of one sample against all its keys.
struct AttentionParams {
  const AttnTile* tiles;
  const uint32_t* mask_bits;
  const void* q;  // [tokens][D], T-typed
  const void* k;
  const void* v;
  void* out;      // [tokens][D], T-typed
  int num_tiles;
  int dim;        // D
  float scale_log2;  // Dh^-0.5 * log2(e), or 1 where q carries it (bf16)
  int num_sms;    // the persistent kernel's grid is what fits on them at once
  // bf16, where scale_log2 is 1 and the q and k RMSNorm weights bound every score of this layer
  // to |s| <= kBoundedScoreMax (the host's bound): the bf16 kernels take exp2 of the scores as
  // they are, without a running maximum or rescaling (softmax does not depend on the offset).
  // The exponentials lie in [2^-64, 2^64], inside fp32 and bf16 range; a row's sums stay finite
  // while T |v| < 2^64 (the running maximum's: 2^120).
  bool scores_bounded;
  // The layer's keys and values (tokens x D x 2 x 2 bytes) fit in three quarters of the L2: the
  // bounded persistent kernel then runs four CTAs per SM instead of three. (More CTAs at once
  // read more samples' keys at once: at B = 512 on an H100, four were 20 % slower.)
  bool keys_fit_l2;
  bool head_major;  // as RowParams::head_major (the persistent bf16 kernel only)
  // Per-sample sync (the persistent bf16 kernel; RowParams::sample_sync): each CTA takes chunks of
  // H / 2 consecutive items (one tile, half its heads), chunks blockIdx.x, + gridDim.x, ... (every
  // CTA walks the samples in order, as the row kernels' rounds do); a chunk first waits until
  // rows_done[sample] reaches AttnTile::rows_target, and each CTA adds the chunk's H / 2 items to
  // items_done[sample] once it has finished them. Null: contiguous ranges after the whole previous
  // kernel.
  const unsigned* rows_done;
  unsigned* items_done;
};
constexpr double kBoundedScoreMax = 64.0;

// The forward of a small bf16 batch (D = 128) with each cluster computing its tile's attention
// (fused_forward.cu): the row tiles of `row` (16 tokens, clusters of kClusterSplit CTAs) from
// row.x_src to row.x_dst, with row.q, k and v as the attention's exchange. Either the whole
// forward in one launch (layer < 0; row.num_tiles clusters resident at once), or one launch per
// layer: the attention of `layer` (its q, k and v written by the launch before) and the row step
// that finishes it and computes the next layer's q, k and v.
constexpr int kFusedMaxDimFF = 2048;  // its shared memory holds the vectors of up to this F
struct FusedForwardParams {
  RowParams row;
  const uint32_t* mask_bits;
  float scale_log2;  // as AttentionParams'
  int layer;         // -1: the whole forward
  unsigned* sync;    // [2] the grid barrier's counters, zero between launches (one launch)
  // The q, k and v of odd layers (even layers': row.q, k, v), each [tokens][D] bf16, tokens
  // apart: a CTA may write layer l + 1's while another still reads layer l's.
  void* qkv_odd;
  int qkv_odd_tokens;
};

// Launches `kernel` with programmatic stream serialization (see LaunchDependents in mma.cuh):
// at small batches a forward is 26 short kernels, and this hides each one's launch and prologue
// behind its predecessor.
// cluster_x > 1 launches clusters of that many consecutive CTAs.
template <typename Params>
cudaError_t LaunchPdl(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, const Params& params, int cluster_x = 1) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = cluster_x;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = cluster_x > 1 ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, params);
}

absl::Status LaunchAdaLn(const AdaLnParams& params, cudaStream_t stream);
// bf16, D = 128, compute capability 9.0: AdaLnParams::w_images (adaln_wgmma.cu).
absl::Status LaunchAdaLnWgmma(const AdaLnParams& params, cudaStream_t stream);
absl::Status LaunchRow(const RowParams& params, Precision precision, int dim, int tile_rows,
                       cudaStream_t stream);
absl::Status LaunchRowWgmma(const RowParams& params, cudaStream_t stream);
absl::Status LaunchAttention(const AttentionParams& params, Precision precision,
                             int tile_queries, cudaStream_t stream);
// bf16 only: the persistent kernel (attention_bf16.cu), tiles of 64 or 128 queries.
absl::Status LaunchAttentionBf16Persistent(const AttentionParams& params, int tile_queries,
                                           cudaStream_t stream);
// bf16 only: tiles of 16 queries, the keys split over a CTA's warps (attention_split_keys.cu).
absl::Status LaunchAttentionSplitKeys(const AttentionParams& params, cudaStream_t stream);
// The fused forward: how many of its clusters fit on the current device at once, and its launch
// (cooperative: every cluster resident at once, or the launch fails).
absl::StatusOr<int> FusedForwardCapacity();
absl::Status LaunchFusedForward(const FusedForwardParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmdit
