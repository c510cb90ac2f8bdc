// A worker on one GPU: the fused CUDA forward (kernels/cuda/cuda_forward.h) on its own stream,
// with pinned staging and device buffers sized once for the model's max_batch_size. One thread
// at a time calls Run(), as Worker requires.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_forward.h"
#include "server/worker.h"

namespace mmdit {

class GpuWorker : public Worker {
 public:
  // spec.precision is "bf16" or "fp32" (the 1e-5 mode). Samples may have L and C up to the
  // model's max_seq_len.
  static absl::StatusOr<std::unique_ptr<GpuWorker>> Create(const GpuWorkerSpec& spec);

  // InvalidArgument for a batch the forward rejects (the worker stays in service); Internal for
  // a CUDA error (the worker is taken out of service by its owner).
  absl::Status Run(ForwardBatch batch) override;
  std::string name() const override { return name_; }

 private:
  GpuWorker(std::unique_ptr<CudaForward> forward, std::string name)
      : forward_(std::move(forward)), name_(std::move(name)) {}
  std::unique_ptr<CudaForward> forward_;
  std::string name_;
};

// Hands GpuWorker to the server (SetGpuWorkerBackend); call once at start-up.
void RegisterGpuWorkers();

}  // namespace mmdit
