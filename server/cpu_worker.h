// A worker that runs batches through the kernels' CPU forward: the fast path (CpuFastForward)
// where it is available, else the float32 reference.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/fast_forward.h"
#include "kernels/model_weights.h"
#include "server/worker.h"

namespace mmdit {

class CpuWorker final : public Worker {
 public:
  struct Options {
    int index = 0;           // named "cpu:<index>"
    int threads = 0;         // threads of the fast path; 0 = all cores
    int max_batch_size = 1;  // workspace of the fast path
    // Always use the reference forward (tests that need the oracle's exact numbers).
    bool force_reference = false;
    // Runs batches only while no other worker is in service (see Worker::fallback_only).
    bool fallback_only = false;
  };

  // `weights` must outlive the worker.
  static absl::StatusOr<std::unique_ptr<CpuWorker>> Create(const ModelWeights* weights,
                                                           const Options& options);

  absl::Status Run(ForwardBatch batch) override;
  std::string name() const override { return name_; }
  bool fallback_only() const override { return fallback_only_; }
  // "fast" or "reference": which forward runs the batches.
  const char* path() const { return fast_ != nullptr ? "fast" : "reference"; }

 private:
  CpuWorker(const ModelWeights* weights, std::string name, std::unique_ptr<CpuFastForward> fast,
            bool fallback_only)
      : weights_(weights),
        name_(std::move(name)),
        fast_(std::move(fast)),
        fallback_only_(fallback_only) {}

  const ModelWeights* const weights_;
  const std::string name_;
  std::unique_ptr<CpuFastForward> fast_;  // null: the reference forward
  const bool fallback_only_;
};

}  // namespace mmdit
