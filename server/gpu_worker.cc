#include "server/gpu_worker.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace mmdit {

absl::StatusOr<std::unique_ptr<GpuWorker>> GpuWorker::Create(const GpuWorkerSpec& spec) {
  if (spec.weights == nullptr) return absl::InvalidArgumentError("GPU worker: no weights");
  CudaForwardOptions options;
  options.device = spec.device;
  options.max_batch_size = spec.max_batch_size;
  options.max_seq_len = spec.weights->config.max_seq_len;
  options.max_context_len = spec.weights->config.max_seq_len;
  if (spec.precision == "bf16") {
    options.precision = CudaPrecision::kBf16;
  } else if (spec.precision == "fp32" || spec.precision.empty()) {
    options.precision = CudaPrecision::kFp32Accurate;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU worker: precision must be \"bf16\" or \"fp32\"; was \"", spec.precision, "\""));
  }
  absl::StatusOr<std::unique_ptr<CudaForward>> forward =
      CudaForward::Create(*spec.weights, options);
  if (!forward.ok()) {
    return absl::Status(forward.status().code(),
                        absl::StrCat("GPU worker on device ", spec.device, ": ",
                                     forward.status().message()));
  }
  return std::unique_ptr<GpuWorker>(
      new GpuWorker(std::move(*forward), absl::StrCat("gpu:", spec.device)));
}

absl::Status GpuWorker::Run(ForwardBatch batch) { return forward_->Run(batch); }

void RegisterGpuWorkers() {
  GpuWorkerBackend backend;
  backend.device_count = [] { return CudaForward::DeviceCount(); };
  backend.create = [](const GpuWorkerSpec& spec) -> absl::StatusOr<std::unique_ptr<Worker>> {
    absl::StatusOr<std::unique_ptr<GpuWorker>> w = GpuWorker::Create(spec);
    if (!w.ok()) return w.status();
    return std::unique_ptr<Worker>(std::move(*w));
  };
  SetGpuWorkerBackend(std::move(backend));
}

}  // namespace mmdit
