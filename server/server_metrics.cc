#include "server/server_metrics.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

constexpr char kUnknownModel[] = "_unknown";
constexpr ModelLoadState kAllStates[] = {ModelLoadState::kUnloaded, ModelLoadState::kLoading,
                                         ModelLoadState::kReady, ModelLoadState::kFailed};
// One failure series per reason is exported at 0 from the model's declaration on.
constexpr absl::StatusCode kReasonCodes[] = {
    absl::StatusCode::kInvalidArgument,  absl::StatusCode::kNotFound,
    absl::StatusCode::kUnavailable,      absl::StatusCode::kDeadlineExceeded,
    absl::StatusCode::kCancelled,        absl::StatusCode::kResourceExhausted,
    absl::StatusCode::kUnimplemented,    absl::StatusCode::kInternal};

template <typename T>
absl::Status Assign(absl::StatusOr<T*> family, T** out) {
  if (!family.ok()) return family.status();
  *out = *family;
  return absl::OkStatus();
}

}  // namespace

const char* ModelLoadStateName(ModelLoadState state) {
  switch (state) {
    case ModelLoadState::kUnloaded: return "unloaded";
    case ModelLoadState::kLoading: return "loading";
    case ModelLoadState::kReady: return "ready";
    case ModelLoadState::kFailed: return "failed";
  }
  return "unloaded";
}

const char* FailureReason(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument: return "invalid_argument";
    case absl::StatusCode::kNotFound: return "not_found";
    case absl::StatusCode::kUnavailable: return "unavailable";
    case absl::StatusCode::kDeadlineExceeded: return "deadline_exceeded";
    case absl::StatusCode::kCancelled: return "cancelled";
    case absl::StatusCode::kResourceExhausted: return "resource_exhausted";
    case absl::StatusCode::kUnimplemented: return "unimplemented";
    default: return "internal";
  }
}

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(const Options& options) {
  std::unique_ptr<ServerMetrics> metrics(new ServerMetrics());
  if (absl::Status s = metrics->Init(options); !s.ok()) return s;
  return metrics;
}

absl::Status ServerMetrics::Init(const Options& options) {
  std::vector<double> durations = options.duration_buckets_seconds;
  if (durations.empty()) durations = ExponentialBuckets(100e-6, 2.0, 20);
  std::vector<double> batch_sizes = options.batch_size_buckets;
  if (batch_sizes.empty()) batch_sizes = ExponentialBuckets(1.0, 2.0, 10);

  MetricsRegistry& r = registry_;
  absl::Status s;
  s.Update(Assign(r.AddCounter("mmdit_request_success_total",
                               "Inference requests answered successfully.", {"model"}),
                  &success_));
  s.Update(Assign(r.AddCounter("mmdit_request_failure_total",
                               "Inference requests that failed, by gRPC status reason.",
                               {"model", "reason"}),
                  &failure_));
  s.Update(Assign(r.AddCounter("mmdit_inference_count_total",
                               "Samples (batch rows) run through the model in successful "
                               "executions.",
                               {"model"}),
                  &inference_count_));
  s.Update(Assign(r.AddCounter("mmdit_inference_exec_count_total",
                               "Batches executed by the model's workers.", {"model"}),
                  &exec_count_));
  s.Update(Assign(r.AddHistogram("mmdit_request_duration_seconds",
                                 "Time from receiving a request to its answer, any outcome.",
                                 {"model"}, durations),
                  &request_duration_));
  s.Update(Assign(r.AddHistogram("mmdit_queue_duration_seconds",
                                 "Time a request waited in the batch queue.", {"model"},
                                 durations),
                  &queue_duration_));
  s.Update(Assign(r.AddHistogram("mmdit_compute_duration_seconds",
                                 "Time a worker spent running one batch.", {"model"}, durations),
                  &compute_duration_));
  s.Update(Assign(r.AddHistogram("mmdit_batch_size", "Samples per executed batch.", {"model"},
                                 batch_sizes),
                  &batch_size_));
  s.Update(Assign(r.AddGauge("mmdit_pending_requests",
                             "Requests accepted and not yet answered (queued or running).",
                             {"model"}),
                  &pending_));
  s.Update(Assign(r.AddCounter("mmdit_worker_busy_seconds_total",
                               "Time each worker spent running batches.", {"model", "worker"}),
                  &worker_busy_));
  s.Update(Assign(r.AddCounter("mmdit_batch_rerun_total",
                               "Batches that failed on a worker (a GPU error) and were run again "
                               "on another worker.",
                               {"model", "worker"}),
                  &batch_rerun_));
  s.Update(Assign(r.AddGauge("mmdit_worker_in_service",
                             "1 while the worker takes batches, 0 once taken out of service.",
                             {"model", "worker"}),
                  &worker_in_service_));
  s.Update(Assign(r.AddGauge("mmdit_model_load_state",
                             "1 for the model's current load state, 0 for the others.",
                             {"model", "state"}),
                  &load_state_));
  return s;
}

ServerMetrics::ModelSeries* ServerMetrics::SeriesLocked(const std::string& model) {
  auto it = models_.find(model);
  if (it != models_.end()) return it->second.get();
  auto series = std::make_unique<ModelSeries>();
  const std::vector<std::string> labels = {model};
  series->success = &success_->WithLabels(labels);
  series->inference_count = &inference_count_->WithLabels(labels);
  series->exec_count = &exec_count_->WithLabels(labels);
  series->request_duration = &request_duration_->WithLabels(labels);
  series->queue_duration = &queue_duration_->WithLabels(labels);
  series->compute_duration = &compute_duration_->WithLabels(labels);
  series->batch_size = &batch_size_->WithLabels(labels);
  series->pending = &pending_->WithLabels(labels);
  for (absl::StatusCode code : kReasonCodes) failure_->WithLabels({model, FailureReason(code)});
  ModelSeries* raw = series.get();
  models_.emplace(model, std::move(series));
  return raw;
}

std::string ServerMetrics::ModelLabel(absl::string_view model) {
  std::lock_guard<std::mutex> lock(mu_);
  if (models_.contains(model)) return std::string(model);
  return kUnknownModel;
}

ServerMetrics::ModelSeries* ServerMetrics::Series(absl::string_view model) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(model);
  if (it != models_.end()) return it->second.get();
  return SeriesLocked(kUnknownModel);
}

void ServerMetrics::SetModelState(absl::string_view model, ModelLoadState state) {
  const std::string name(model);
  {
    std::lock_guard<std::mutex> lock(mu_);
    SeriesLocked(name);
  }
  for (ModelLoadState s : kAllStates) {
    load_state_->WithLabels({name, ModelLoadStateName(s)}).Set(s == state ? 1.0 : 0.0);
  }
}

void ServerMetrics::RecordRequest(absl::string_view model, const absl::Status& status,
                                  double request_seconds, double queue_seconds) {
  ModelSeries* series = Series(model);
  if (status.ok()) {
    series->success->Increment();
  } else {
    failure_->WithLabels({ModelLabel(model), FailureReason(status.code())}).Increment();
  }
  series->request_duration->Observe(request_seconds);
  if (queue_seconds >= 0.0) series->queue_duration->Observe(queue_seconds);
}

void ServerMetrics::RecordBatch(absl::string_view model, absl::string_view worker,
                                int64_t batch_samples, double compute_seconds) {
  ModelSeries* series = Series(model);
  series->inference_count->Increment(static_cast<double>(batch_samples));
  series->exec_count->Increment();
  series->batch_size->Observe(static_cast<double>(batch_samples));
  series->compute_duration->Observe(compute_seconds);
  worker_busy_->WithLabels({ModelLabel(model), std::string(worker)}).Increment(compute_seconds);
}

void ServerMetrics::RecordBatchRerun(absl::string_view model, absl::string_view worker) {
  batch_rerun_->WithLabels({ModelLabel(model), std::string(worker)}).Increment();
}

void ServerMetrics::SetWorkerInService(absl::string_view model, absl::string_view worker,
                                       bool in_service) {
  const std::vector<std::string> labels = {ModelLabel(model), std::string(worker)};
  worker_in_service_->WithLabels(labels).Set(in_service ? 1.0 : 0.0);
  // Export the worker's other series at 0 from the start, so that rate() has a baseline.
  worker_busy_->WithLabels(labels);
  batch_rerun_->WithLabels(labels);
}

void ServerMetrics::SetPending(absl::string_view model, int64_t pending) {
  Series(model)->pending->Set(static_cast<double>(pending));
}

}  // namespace mmdit
