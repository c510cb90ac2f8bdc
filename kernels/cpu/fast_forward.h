// The fast float32 CPU forward of MODEL.md: GEMMs through OpenBLAS (single-threaded, on row
// chunks of each sample), LayerNorm + modulation and RMSNorm + RoPE as single passes, and a
// one-pass online-softmax attention over x and context keys, threaded across samples, row chunks
// and heads by the instance's own threads; kernels for AVX-512, AVX2 or plain x86-64 picked at
// Create from the CPU. The reference (reference_forward.h) stays the oracle it is tested against.
// Measured numbers: docs/BENCHMARKS.md.
//
// Threads: each instance owns `threads` threads (the caller of Run is one of them) and sets
// OpenBLAS to one thread for the process, so several CPU workers should split the cores between
// them rather than each take all. Memory: Create allocates for max_batch_size samples of 256
// tokens; a batch with more tokens than any before grows the workspace once; a seen shape
// allocates nothing.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"

namespace mmdit {

struct CpuForwardOptions {
  int threads = 0;         // 0 = every core in the process's affinity mask
  int max_batch_size = 1;  // workspace is sized for this many samples at Create
};

class CpuFastForward {
 public:
  // Validates `options` and copies `weights` into the fast path's layout. The caller's
  // weights may be freed afterwards.
  static absl::StatusOr<std::unique_ptr<CpuFastForward>> Create(const ModelWeights& weights,
                                                                const CpuForwardOptions& options);

  ~CpuFastForward();
  CpuFastForward(const CpuFastForward&) = delete;
  CpuFastForward& operator=(const CpuFastForward&) = delete;

  // Validates the batch (ValidateBatch) and its size (at most max_batch_size samples, else
  // INVALID_ARGUMENT), then computes every sample; writes nothing when invalid. Not
  // thread-safe: one instance per worker.
  absl::Status Run(ForwardBatch batch);

  class Impl;

 private:
  explicit CpuFastForward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mmdit
