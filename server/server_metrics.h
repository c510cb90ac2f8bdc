// The server's named metric families (docs/METRICS.md lists them) and the calls the request
// path makes to record them. Names follow Triton's nv_inference_* set with an mmdit_ prefix and
// Prometheus' unit conventions (seconds, _total on counters).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/metrics.h"

namespace mmdit {

// Load state of a model, exported one-hot as mmdit_model_load_state{model,state}.
enum class ModelLoadState { kUnloaded, kLoading, kReady, kFailed };
const char* ModelLoadStateName(ModelLoadState state);  // "unloaded", "loading", "ready", "failed"

// The failure reason label of a status: invalid_argument, not_found, unavailable,
// deadline_exceeded, cancelled, resource_exhausted, unimplemented, or internal for any other
// non-OK code. Kept to this fixed set so that label cardinality stays bounded.
const char* FailureReason(absl::StatusCode code);

class ServerMetrics {
 public:
  struct Options {
    // Upper bounds of the request, queue and compute duration histograms, in seconds.
    // Default: 100 µs … ~52 s, doubling (20 buckets), which spans a GPU batch of 1 to a CPU
    // batch of 512.
    std::vector<double> duration_buckets_seconds;
    // Upper bounds of the batch size histogram (samples). Default: 1, 2, 4, … 512.
    std::vector<double> batch_size_buckets;
  };

  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(const Options& options);

  // Declares a model so that its series exist (at 0) before the first request and sets its
  // load state. Every other call counts a model that was never declared here under
  // model="_unknown", so clients cannot grow the label set by sending made-up names: declare a
  // model before recording anything for it.
  void SetModelState(absl::string_view model, ModelLoadState state);

  // One finished request (any outcome). `status` OK counts a success, otherwise a failure with
  // the reason of FailureReason(status.code()). `request_seconds` is the whole request as the
  // server saw it; `queue_seconds` < 0 means it never reached the queue (rejected earlier) and
  // records no queue duration.
  void RecordRequest(absl::string_view model, const absl::Status& status, double request_seconds,
                     double queue_seconds = -1.0);

  // One batch executed successfully on `worker` (a name such as "cpu:0" or "gpu:1"): adds
  // `batch_samples` to the inference count, 1 to the execution count, observes the batch size
  // and compute duration and adds `compute_seconds` to the worker's busy time.
  void RecordBatch(absl::string_view model, absl::string_view worker, int64_t batch_samples,
                   double compute_seconds);

  // A batch failed on `worker` and was handed to another worker to run again.
  void RecordBatchRerun(absl::string_view model, absl::string_view worker);

  // Whether `worker` is in service (a GPU worker that hit a CUDA error is taken out).
  void SetWorkerInService(absl::string_view model, absl::string_view worker, bool in_service);

  // Requests accepted and not yet answered (queued or running).
  void SetPending(absl::string_view model, int64_t pending);

  // The whole exposition, for GET /metrics.
  std::string Exposition() const { return registry_.Exposition(); }
  MetricsRegistry& registry() { return registry_; }

 private:
  ServerMetrics() = default;
  absl::Status Init(const Options& options);

  // The children of one model's label set, looked up once and then updated lock-free.
  struct ModelSeries {
    Counter* success = nullptr;
    Counter* inference_count = nullptr;
    Counter* exec_count = nullptr;
    Histogram* request_duration = nullptr;
    Histogram* queue_duration = nullptr;
    Histogram* compute_duration = nullptr;
    Histogram* batch_size = nullptr;
    Gauge* pending = nullptr;
  };
  ModelSeries* Series(absl::string_view model);
  ModelSeries* SeriesLocked(const std::string& model) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string ModelLabel(absl::string_view model);

  MetricsRegistry registry_;
  CounterFamily* success_ = nullptr;
  CounterFamily* failure_ = nullptr;
  CounterFamily* inference_count_ = nullptr;
  CounterFamily* exec_count_ = nullptr;
  HistogramFamily* request_duration_ = nullptr;
  HistogramFamily* queue_duration_ = nullptr;
  HistogramFamily* compute_duration_ = nullptr;
  HistogramFamily* batch_size_ = nullptr;
  GaugeFamily* pending_ = nullptr;
  CounterFamily* worker_busy_ = nullptr;
  CounterFamily* batch_rerun_ = nullptr;
  GaugeFamily* worker_in_service_ = nullptr;
  GaugeFamily* load_state_ = nullptr;

  std::mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<ModelSeries>> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mmdit
