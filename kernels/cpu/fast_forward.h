// The fast float32 CPU forward of MODEL.md: blocked GEMMs through a CPU BLAS over all tokens of a
// batch, fused norm passes, and a one-pass online-softmax attention, threaded across samples and
// heads. The reference (reference_forward.h) stays the oracle it is tested against.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"

namespace mmdit {

struct CpuForwardOptions {
  int threads = 0;         // 0 = all cores
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

  // Validates the batch (ValidateBatch), then computes every sample. Not thread-safe: one
  // instance per worker.
  absl::Status Run(ForwardBatch batch);

  class Impl;

 private:
  explicit CpuFastForward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mmdit
