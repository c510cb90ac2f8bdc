// One model as served: its weights, its dynamic batcher, the workers that run its batches (built
// from the config's instance_group), its readiness and its statistics. The batch dispatcher lives
// here: a batch runs on an idle worker in service; a worker that fails it is taken out of service
// and the batch runs again on another one.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/grpc_service.pb.h"
#include "server/clock.h"
#include "server/dynamic_batcher.h"
#include "server/infer_request.h"
#include "server/model_repository.h"
#include "server/server_metrics.h"
#include "server/worker.h"

namespace mmdit {

// How long one request spent where; `queued` is false when it never reached the queue.
struct RequestTiming {
  bool queued = false;
  absl::Duration queue = absl::ZeroDuration();
  absl::Duration compute = absl::ZeroDuration();
};

class ServedModel {
 public:
  using WorkerFactory =
      std::function<absl::StatusOr<std::vector<std::unique_ptr<Worker>>>(const LoadedModel&)>;

  struct Options {
    int cpu_threads = 0;             // threads of each CPU worker; 0 = all cores
    int default_max_queue_size = 1024;  // when the config's max_queue_size is 0
    ServerMetrics* metrics = nullptr;   // not owned; may be null
    const Clock* clock = nullptr;       // null: RealClock
    // Builds the workers instead of the config's instance_group (tests: fake or failing ones).
    WorkerFactory worker_factory;
  };

  // Builds the workers and the batcher. The model is not ready until WarmUp() succeeded.
  static absl::StatusOr<std::unique_ptr<ServedModel>> Create(
      std::shared_ptr<const LoadedModel> model, const Options& options);
  ~ServedModel();  // Stop()

  // Runs one small batch on every worker; a worker that fails it is taken out of service.
  // Ready afterwards if at least one worker is in service.
  absl::Status WarmUp();
  bool ready() const;

  const std::string& name() const { return signature_.name; }
  const ModelSignature& signature() const { return signature_; }
  const LoadedModel& model() const { return *model_; }
  int64_t default_timeout_micros() const { return default_timeout_micros_; }
  std::vector<std::string> worker_names() const;
  int workers_in_service() const;
  // Requests accepted and not yet answered (queued or running).
  int64_t pending() const {
    absl::MutexLock lock(&stats_mu_);
    return pending_;
  }
  // Requests waiting in the batcher's queue.
  int64_t num_queued() const { return batcher_->num_queued_tasks(); }
  // Batches that failed on a worker and ran again on another one.
  int64_t batch_reruns() const;

  // `done` runs exactly once, on a batch thread, with the request back and the outcome, unless
  // Cancel() took the request back first.
  using DoneFn =
      std::function<void(std::unique_ptr<InferRequest>, absl::Status, const RequestTiming&)>;
  // Queues a decoded request. On error (queue full: UNAVAILABLE) `done` never runs.
  absl::StatusOr<uint64_t> Enqueue(std::unique_ptr<InferRequest> request, DoneFn done);
  // Takes a still-queued request back (a cancelled call or a passed deadline); null when it has
  // already left the queue, in which case `done` runs (or ran).
  std::unique_ptr<InferRequest> Cancel(uint64_t id);

  // Records one finished request (any outcome) in the statistics and the metrics.
  void RecordRequest(const absl::Status& status, absl::Duration request_duration,
                     const RequestTiming& timing);

  // Stops taking requests, runs what is queued, and waits for it. Idempotent.
  void Stop();

  void FillStatistics(inference::ModelStatistics* stats) const;

 private:
  struct InferTask {
    std::unique_ptr<InferRequest> request;
    DoneFn done;
    absl::Time enqueue_time;
    int size() const { return request->batch_size(); }
    absl::Time deadline() const { return request->deadline(); }
  };
  using Batcher = DynamicBatcher<InferTask>;

  struct WorkerSlot {
    std::unique_ptr<Worker> worker;
    bool busy = false;
    bool in_service = true;
  };

  ServedModel(std::shared_ptr<const LoadedModel> model, const Options& options);
  void ProcessBatch(Batcher::Batch batch);
  void RejectTask(std::unique_ptr<InferTask> task, absl::Status status);
  // Runs `samples` on an idle worker in service, moving on to the next one when a worker fails.
  absl::Status RunOnAnyWorker(ForwardBatch samples, std::string* worker_name);
  WorkerSlot* AcquireWorker();
  // An idle worker in service; fallback workers only while no other worker is in service.
  WorkerSlot* IdleWorkerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(workers_mu_);
  void ReleaseWorker(WorkerSlot* slot, bool in_service);
  void AddPending(int delta);

  const std::shared_ptr<const LoadedModel> model_;
  const Options options_;
  const Clock* const clock_;
  ModelSignature signature_;
  int64_t default_timeout_micros_ = 0;
  std::unique_ptr<Batcher> batcher_;

  mutable absl::Mutex workers_mu_;
  // Signalled (outside workers_mu_) when a worker becomes idle or leaves service.
  absl::CondVar workers_cv_;
  std::vector<WorkerSlot> workers_ ABSL_GUARDED_BY(workers_mu_);
  bool ready_ ABSL_GUARDED_BY(workers_mu_) = false;
  int64_t reruns_ ABSL_GUARDED_BY(workers_mu_) = 0;

  struct Duration {
    uint64_t count = 0;
    uint64_t ns = 0;
    void Add(absl::Duration d) {
      ++count;
      ns += static_cast<uint64_t>(absl::ToInt64Nanoseconds(d));
    }
  };
  mutable absl::Mutex stats_mu_;
  Duration success_ ABSL_GUARDED_BY(stats_mu_);
  Duration fail_ ABSL_GUARDED_BY(stats_mu_);
  Duration queue_ ABSL_GUARDED_BY(stats_mu_);
  Duration compute_ ABSL_GUARDED_BY(stats_mu_);
  uint64_t inference_count_ ABSL_GUARDED_BY(stats_mu_) = 0;
  uint64_t execution_count_ ABSL_GUARDED_BY(stats_mu_) = 0;
  uint64_t last_inference_ms_ ABSL_GUARDED_BY(stats_mu_) = 0;
  std::map<int, Duration> batch_stats_ ABSL_GUARDED_BY(stats_mu_);
  int64_t pending_ ABSL_GUARDED_BY(stats_mu_) = 0;
};

// The workers of `model`'s instance_group: KIND_CPU count N → N CPU workers; KIND_GPU and
// KIND_AUTO → GPU workers when a GPU worker library registered and a GPU exists, else CPU
// workers (said on stderr). No instance_group: one KIND_AUTO worker. A set of GPU workers only
// gets one fallback-only CPU worker beside them.
absl::StatusOr<std::vector<std::unique_ptr<Worker>>> BuildWorkers(const LoadedModel& model,
                                                                  int cpu_threads);

}  // namespace mmdit
