// A worker runs whole batches of one model on one device (a CPU thread pool or one GPU). The
// model's dispatcher owns a set of workers; a worker whose Run() fails for any reason other than
// the batch's own data is taken out of service and the batch runs again on another worker.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"

namespace mmdit {

class Worker {
 public:
  virtual ~Worker() = default;
  // Computes every sample of `batch` (outputs through the samples' pointers). Called by one
  // thread at a time. InvalidArgument means the batch itself is bad (the worker stays in
  // service); any other error takes the worker out of service.
  virtual absl::Status Run(ForwardBatch batch) = 0;
  // "cpu:0", "gpu:1", …: the label of its metrics and log lines.
  virtual std::string name() const = 0;
  // A fallback worker takes batches only while no other worker of the model is in service (the
  // CPU worker beside GPU workers, so that a GPU error does not take the model down).
  virtual bool fallback_only() const { return false; }
};

// What a GPU worker factory gets for one worker of an instance group.
struct GpuWorkerSpec {
  const ModelWeights* weights = nullptr;  // outlives the worker
  std::string precision;                  // the model's "fp32" or "bf16"
  int device = 0;                         // CUDA device ordinal
  int index = 0;                          // the worker's number among the model's workers
  int max_batch_size = 1;                 // device buffers are sized for this many samples
};

// The GPU worker library registers itself here at start-up (RegisterGpuWorkers() in
// gpu_worker.h); without it, KIND_GPU and KIND_AUTO instance groups get CPU workers.
struct GpuWorkerBackend {
  std::function<int()> device_count;
  std::function<absl::StatusOr<std::unique_ptr<Worker>>(const GpuWorkerSpec&)> create;
};
void SetGpuWorkerBackend(GpuWorkerBackend backend);
// Null when no GPU worker library registered.
const GpuWorkerBackend* GetGpuWorkerBackend();

}  // namespace mmdit
