#include "server/cpu_worker.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/reference_forward.h"

namespace mmdit {

absl::StatusOr<std::unique_ptr<CpuWorker>> CpuWorker::Create(const ModelWeights* weights,
                                                             const Options& options) {
  if (weights == nullptr) return absl::InvalidArgumentError("CpuWorker needs weights");
  if (options.max_batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_size must be positive; was ", options.max_batch_size));
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must not be negative; was ", options.threads));
  }
  std::string name = absl::StrCat("cpu:", options.index);
  std::unique_ptr<CpuFastForward> fast;
  if (!options.force_reference) {
    CpuForwardOptions fast_options;
    fast_options.threads = options.threads;
    fast_options.max_batch_size = options.max_batch_size;
    absl::StatusOr<std::unique_ptr<CpuFastForward>> created =
        CpuFastForward::Create(*weights, fast_options);
    if (created.ok()) {
      fast = *std::move(created);
    } else if (!absl::IsUnimplemented(created.status())) {
      return created.status();
    }
  }
  return std::unique_ptr<CpuWorker>(
      new CpuWorker(weights, std::move(name), std::move(fast), options.fallback_only));
}

absl::Status CpuWorker::Run(ForwardBatch batch) {
  if (fast_ != nullptr) {
    absl::Status status = fast_->Run(batch);
    if (!absl::IsUnimplemented(status)) return status;
    // A shape the fast path does not cover; the reference computes the same function.
  }
  return ReferenceForward(*weights_, batch);
}

}  // namespace mmdit
