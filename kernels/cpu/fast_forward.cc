#include "kernels/cpu/fast_forward.h"

#include <utility>

namespace mmdit {

class CpuFastForward::Impl {};

CpuFastForward::CpuFastForward(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CpuFastForward::~CpuFastForward() = default;

absl::StatusOr<std::unique_ptr<CpuFastForward>> CpuFastForward::Create(
    const ModelWeights& weights, const CpuForwardOptions& options) {
  (void)weights;
  (void)options;
  return absl::UnimplementedError("CpuFastForward is not implemented yet");
}

absl::Status CpuFastForward::Run(ForwardBatch batch) {
  (void)batch;
  return absl::UnimplementedError("CpuFastForward is not implemented yet");
}

}  // namespace mmdit
