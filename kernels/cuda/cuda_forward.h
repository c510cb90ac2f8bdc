// The fused CUDA forward of MODEL.md: weights converted and laid out once at load, device scratch
// sized once for max_batch_size x the longest shapes, ragged batches (per-sample L and C through
// offsets, never padded). Plain C++: including this header needs no CUDA headers.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace mmdit {

enum class CudaPrecision { kBf16, kFp32Accurate };

inline constexpr int kFusedForwardMaxLayers = 64;

struct CudaForwardOptions {
  int device = 0;
  int max_batch_size = 1;
  int max_seq_len = 4096;      // longest L of one sample
  int max_context_len = 4096;  // longest C of one sample
  CudaPrecision precision = CudaPrecision::kBf16;
  // Bytes of attention-mask bits one batch may carry ((L + 2) x ceil(L / 32) words per masked
  // sample); a batch over it is rejected.
  int64_t max_mask_bytes = int64_t{64} << 20;
  // Tile sizes: 0 picks by batch size; otherwise 16 or 64 tokens per row-kernel CTA and 64 or
  // 128 queries per attention CTA, or (bf16) 16 with the keys split over the CTA's warps, or
  // (bf16, persistent attention) 256 (for measurements).
  int row_tile_rows = 0;
  int attn_tile_queries = 0;
  // bf16 with D = 128 on compute capability 9.0: 64-token row tiles on the warpgroup-MMA row
  // kernel (row_kernel_wgmma.cu); false: the mma.sync kernel (for comparisons).
  bool use_wgmma = true;
  // bf16 with D = 128 on compute capability 9.0, batches of 65 samples and more: the adaLN on
  // warpgroup MMAs with its weights streamed through shared memory (adaln_wgmma.cu); false: the
  // mma.sync kernel, which smaller batches always take (it is faster there). On an H100 the
  // kernel takes ~16 against 26 us at B = 256, and the forward ~1 % less at B = 100, 0.9 % at
  // B = 256 (launched) and 0.5-0.7 % at B = 512 (docs/BENCHMARKS.md, thirteenth round).
  bool wgmma_adaln = true;
  // bf16: the persistent attention kernel (attention_bf16.cu); false: one CTA per item.
  bool persistent_attention = true;
  // CTAs per 16-token row tile on compute capability 9.0 and up: 0 picks by batch size, 1 one
  // CTA, 2 or 4 a cluster of that many that splits the tile's MLP and q/k/v passes (for
  // measurements).
  int row_cluster_split = 0;
  // bf16, D = 128, compute capability 9.0 and up: a batch whose tiling is 16-token row tiles on
  // clusters of four and 16-query attention (picked for a sample or two, or forced by the options
  // above) runs as one launch for the whole forward when its clusters fit on the GPU at once
  // (fused_forward.cu), for models of up to kFusedForwardMaxLayers layers. Off by default: on an
  // H100 it is level with one launch per kernel, not faster (docs/BENCHMARKS.md, seventeenth
  // round).
  bool fused_forward = false;
  // The same batches, where fused_forward does not take them, as one launch per layer: each
  // cluster computes its tile's attention and then its rows (the same kernel), so that a layer
  // has one kernel boundary instead of two and the attention's output stays on chip. Off by
  // default: on an H100 at B = 1 it was ~2 % faster than one launch per kernel until the row
  // kernel let its successor launch later (fifteenth round), and is 1-2 % slower since
  // (docs/BENCHMARKS.md, seventeenth round).
  bool fused_layers = false;
  // bf16: where the q and k RMSNorm weights bound a layer's scores (AttentionParams::
  // scores_bounded), the attention takes their exponentials without a running maximum; false:
  // always the running maximum (for comparisons and tests).
  bool static_softmax_offsets = true;
  // bf16, where the warpgroup-MMA row kernel and the persistent attention run together: q, k,
  // v and the attention output of a sample head by head ([head][token][Dh]), so that an
  // attention item reads its keys and values and writes its output as contiguous blocks instead
  // of 32 bytes of every token's row; false: token by token ([token][D], as every other pairing
  // of kernels keeps them).
  bool head_major_attention = true;
  // bf16, between the warpgroup-MMA row kernels: the residual stream stored in bf16 (each
  // kernel still adds to it in fp32; the input and the last layer's output stay fp32), which
  // halves its DRAM traffic. -1: where the row kernel has more than two tiles per SM (at the
  // target shape, four tiles a sample, from B = 67 on an H100's 132 SMs; there 2-3 % faster at
  // B = 96 to 512, and at B = 64 2.6 % slower in one call and the same in another); 1: wherever
  // the wgmma row kernel runs; 0: never (fp32, as every other row kernel keeps it).
  int bf16_residual = -1;
  // bf16, where the warpgroup-MMA row kernel and the 256-query persistent attention exchange
  // q/k/v head by head and the row kernel has more than three tiles per SM (at the target
  // shape, from B = 100 on an H100's 132 SMs; at B = 96 it was 3 % slower): consecutive kernels
  // overlap, each waiting per sample for the previous one's work on that sample (counters in
  // global memory) instead of for the whole previous kernel, so that an SM that finishes its
  // share of one kernel starts on the next. Measured on an H100 (docs/BENCHMARKS.md, eleventh
  // round): 2.7 % faster at B = 256, 3.6 % at B = 128, 5.5 % at B = 512, 18 % at B = 100
  // (whose 400 row tiles leave 4 for a second round); false: each kernel waits for the whole
  // previous one.
  bool per_sample_sync = true;
  // Run(): a batch launched with the same kernel configuration as an earlier one (the same
  // counts of samples, tokens and tiles and the same tilings: at a fixed L and C, the same batch
  // size) replays a CUDA graph of the forward's kernels instead of launching them one by one.
  // A configuration's graph is captured the second time it is run, so that one-off shapes cost
  // no capture; up to graph_cache_size graphs are kept, the least recently used dropped first.
  // 0: every kernel launched by Run() (Stage / RunStaged / CaptureGraph are unaffected).
  int graph_cache_size = 8;
  // Host threads (the caller's among them) that copy a batch's inputs into the pinned staging
  // block and its outputs out of it, in 256 KB pieces, from 2 MB each way (below, the caller
  // copies alone). The block moves to and from the device in chunks (256 KB below 2 MB, else 4 MB
  // or a sixteenth of the batch), each chunk's transfer overlapping the copies of the next or the
  // one before. On the H100 host one thread copied ~5.7 GB/s: at B = 256 Run() took 11.6-12.8 ms
  // around a 1.5 ms forward, 5.1 with four threads, 4.2 with eight, and 3.8-5.3 with four threads
  // and the chunks (docs/BENCHMARKS.md, "The serving path").
  int copy_threads = 4;
};

class CudaForwardImpl;

class CudaForward {
 public:
  static absl::StatusOr<std::unique_ptr<CudaForward>> Create(const ModelWeights& weights,
                                                             const CudaForwardOptions& options);

  // Synchronous: copies the batch in (pinned staging), runs on this object's stream (from a
  // cached CUDA graph where CudaForwardOptions::graph_cache_size allows), copies out, waits. Not
  // thread-safe; one per worker.
  absl::Status Run(ForwardBatch batch);
  // Runs of Run() that launched a cached graph (its capture's run included), and the graphs
  // cached now.
  int64_t graph_runs() const;
  int cached_graphs() const;

  // 0 when there is no GPU or no driver; never aborts.
  static int DeviceCount();

  // For the benchmark: stages `batch`'s inputs once (shapes, offsets, masks, inputs on the
  // device), after which RunStaged() launches the whole forward on stream() without copies or
  // synchronization, and FetchStaged() copies the outputs back into the batch's pointers.
  absl::Status Stage(ForwardBatch batch);
  absl::Status RunStaged();
  absl::Status FetchStaged(ForwardBatch batch);
  // Captures RunStaged() into a CUDA graph (for the currently staged batch) and replays it.
  absl::Status CaptureGraph();
  absl::Status ReplayGraph();
  CUstream_st* stream() const;
  // Called on the launching thread after each kernel launch of RunStaged() with the kernel's
  // name ("adaln", "row", "attention"), e.g. to record events for a per-kernel breakdown.
  void set_launch_hook(std::function<void(const char*)> hook);

  const CudaForwardOptions& options() const;
  // The tile sizes chosen for the staged batch.
  int tile_rows() const;
  int tile_queries() const;
  int row_cluster_split() const;
  // Whether the staged batch runs as the one-launch forward (CudaForwardOptions::fused_forward).
  bool fused() const;
  // Whether it runs as one launch per layer (CudaForwardOptions::fused_layers).
  bool fused_layers() const;
  // Whether the staged batch's kernels overlap with per-sample sync
  // (CudaForwardOptions::per_sample_sync).
  bool per_sample_sync() const;
  // Whether the adaLN runs on the warpgroup-MMA kernel (CudaForwardOptions::wgmma_adaln).
  bool wgmma_adaln() const;
  // Layers whose attention takes exp2 of the scores without a running maximum
  // (CudaForwardOptions::static_softmax_offsets; the one-launch forward keeps the maximum).
  int bounded_score_layers() const;

  ~CudaForward();

 private:
  explicit CudaForward(std::unique_ptr<CudaForwardImpl> impl);
  std::unique_ptr<CudaForwardImpl> impl_;
};

}  // namespace mmdit
