#include "server/served_model.h"

#include <algorithm>
#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/cpu_worker.h"

namespace mmdit {
namespace {

absl::Mutex gpu_backend_mu(absl::kConstInit);
GpuWorkerBackend* gpu_backend ABSL_GUARDED_BY(gpu_backend_mu) = nullptr;

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

}  // namespace

void SetGpuWorkerBackend(GpuWorkerBackend backend) {
  absl::MutexLock lock(&gpu_backend_mu);
  delete gpu_backend;
  gpu_backend = new GpuWorkerBackend(std::move(backend));
}

const GpuWorkerBackend* GetGpuWorkerBackend() {
  absl::MutexLock lock(&gpu_backend_mu);
  return gpu_backend;
}

absl::StatusOr<std::vector<std::unique_ptr<Worker>>> BuildWorkers(const LoadedModel& model,
                                                                  int cpu_threads) {
  const ModelConfig& config = model.config;
  const int max_batch_size = std::max(1, config.max_batch_size());
  std::vector<ModelInstanceGroup> groups(config.instance_group().begin(),
                                         config.instance_group().end());
  if (groups.empty()) {
    ModelInstanceGroup group;
    group.set_kind(ModelInstanceGroup::KIND_AUTO);
    group.set_count(1);
    groups.push_back(group);
  }
  const GpuWorkerBackend* gpu = GetGpuWorkerBackend();
  const int gpu_count = gpu != nullptr && gpu->device_count ? gpu->device_count() : 0;

  std::vector<std::unique_ptr<Worker>> workers;
  int cpu_index = 0;
  int gpu_index = 0;
  auto add_cpu = [&](int count, bool fallback_only = false) -> absl::Status {
    for (int i = 0; i < count; ++i) {
      CpuWorker::Options options;
      options.index = cpu_index++;
      options.threads = cpu_threads;
      options.max_batch_size = max_batch_size;
      options.fallback_only = fallback_only;
      absl::StatusOr<std::unique_ptr<CpuWorker>> worker =
          CpuWorker::Create(&model.weights, options);
      if (!worker.ok()) return worker.status();
      std::cerr << "mmdit-server: model '" << config.name() << "' worker " << (*worker)->name()
                << " (CPU forward, " << (*worker)->path() << " path, "
                << (cpu_threads > 0 ? absl::StrCat(cpu_threads, " threads") : "all cores")
                << (fallback_only ? "; fallback only, while no GPU worker is in service" : "")
                << ")\n";
      workers.push_back(*std::move(worker));
    }
    return absl::OkStatus();
  };

  for (const ModelInstanceGroup& group : groups) {
    const int count = std::max(1, group.count());
    if (group.kind() == ModelInstanceGroup::KIND_CPU) {
      if (absl::Status s = add_cpu(count); !s.ok()) return s;
      continue;
    }
    if (gpu_count == 0) {
      std::cerr << "mmdit-server: model '" << config.name() << "': instance_group "
                << ModelInstanceGroup::Kind_Name(group.kind())
                << " but no GPU worker is available in this build or on this machine; using "
                << count << " CPU worker(s) instead\n";
      if (absl::Status s = add_cpu(count); !s.ok()) return s;
      continue;
    }
    std::vector<int> devices(group.gpus().begin(), group.gpus().end());
    if (devices.empty()) {
      for (int d = 0; d < gpu_count; ++d) devices.push_back(d);
    }
    for (int device : devices) {
      if (device < 0 || device >= gpu_count) {
        return absl::InvalidArgumentError(
            absl::StrCat("model '", config.name(), "': instance_group names gpu ", device,
                         " but this machine has ", gpu_count, " GPU(s)"));
      }
      for (int i = 0; i < count; ++i) {
        GpuWorkerSpec spec;
        spec.weights = &model.weights;
        spec.precision = config.precision();
        spec.device = device;
        spec.index = gpu_index++;
        spec.max_batch_size = max_batch_size;
        absl::StatusOr<std::unique_ptr<Worker>> worker = gpu->create(spec);
        if (!worker.ok()) return worker.status();
        std::cerr << "mmdit-server: model '" << config.name() << "' worker " << (*worker)->name()
                  << " (GPU " << device << ", " << config.precision() << ")\n";
        workers.push_back(*std::move(worker));
      }
    }
  }
  if (gpu_index > 0 && cpu_index == 0) {
    // Only GPU workers: one CPU worker stands by, so that a CUDA error on the last GPU worker
    // re-runs its batch instead of failing it.
    if (absl::Status s = add_cpu(1, /*fallback_only=*/true); !s.ok()) return s;
  }
  return workers;
}

ServedModel::ServedModel(std::shared_ptr<const LoadedModel> model, const Options& options)
    : model_(std::move(model)),
      options_(options),
      clock_(options.clock != nullptr ? options.clock : RealClock::Get()) {}

absl::StatusOr<std::unique_ptr<ServedModel>> ServedModel::Create(
    std::shared_ptr<const LoadedModel> model, const Options& options) {
  if (model == nullptr) return absl::InvalidArgumentError("ServedModel needs a model");
  const ModelConfig& config = model->config;
  if (config.max_batch_size() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("model '", config.name(),
                                                   "': max_batch_size must be positive; was ",
                                                   config.max_batch_size()));
  }
  std::unique_ptr<ServedModel> served(new ServedModel(model, options));
  served->signature_.name = config.name();
  served->signature_.version = model->version;
  served->signature_.config = model->weights.config;
  served->signature_.max_batch_size = config.max_batch_size();
  served->default_timeout_micros_ =
      static_cast<int64_t>(config.dynamic_batching().default_timeout_microseconds());

  absl::StatusOr<std::vector<std::unique_ptr<Worker>>> workers =
      options.worker_factory ? options.worker_factory(*model)
                             : BuildWorkers(*model, options.cpu_threads);
  if (!workers.ok()) return workers.status();
  if (workers->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model '", config.name(), "' has no workers"));
  }
  // One batch thread per worker that takes batches in normal operation: a batch is formed only
  // when one of them can run it. Fallback workers run batches on those same threads.
  int num_workers = 0;
  for (const std::unique_ptr<Worker>& w : *workers) num_workers += w->fallback_only() ? 0 : 1;
  num_workers = std::max(num_workers, 1);
  {
    absl::MutexLock lock(&served->workers_mu_);
    for (std::unique_ptr<Worker>& w : *workers) {
      WorkerSlot slot;
      slot.worker = std::move(w);
      served->workers_.push_back(std::move(slot));
    }
  }

  Batcher::Options batcher_options;
  batcher_options.name = absl::StrCat("model '", config.name(), "'");
  batcher_options.max_batch_size = config.max_batch_size();
  batcher_options.max_queue_delay_micros =
      static_cast<int64_t>(config.dynamic_batching().max_queue_delay_microseconds());
  int preferred = 0;
  for (int p : config.dynamic_batching().preferred_batch_size()) preferred = std::max(preferred, p);
  batcher_options.preferred_batch_size = std::min(preferred, config.max_batch_size());
  batcher_options.max_queue_size = config.dynamic_batching().max_queue_size() > 0
                                       ? config.dynamic_batching().max_queue_size()
                                       : options.default_max_queue_size;
  batcher_options.num_batch_threads = num_workers;
  batcher_options.clock = served->clock_;
  ServedModel* self = served.get();
  absl::StatusOr<std::unique_ptr<Batcher>> batcher = Batcher::Create(
      batcher_options, [self](Batcher::Batch batch) { self->ProcessBatch(std::move(batch)); },
      [self](std::unique_ptr<InferTask> task, absl::Status status) {
        self->RejectTask(std::move(task), std::move(status));
      });
  if (!batcher.ok()) return batcher.status();
  served->batcher_ = *std::move(batcher);
  if (options.metrics != nullptr) {
    options.metrics->SetModelState(config.name(), ModelLoadState::kLoading);
    for (const std::string& name : served->worker_names()) {
      options.metrics->SetWorkerInService(config.name(), name, true);
    }
  }
  return served;
}

ServedModel::~ServedModel() { Stop(); }

void ServedModel::Stop() {
  if (batcher_ != nullptr) batcher_->Stop();
}

absl::Status ServedModel::WarmUp() {
  const MmditConfig& config = signature_.config;
  const int L = std::min(8, config.max_seq_len);
  const int C = 2;
  const int D = config.dim;
  std::vector<float> x(L * D), y(D), context(C * D), x_out(L * D), context_out(C * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 17) - 0.08f;
  for (size_t i = 0; i < y.size(); ++i) y[i] = 0.02f * static_cast<float>(i % 5) - 0.04f;
  for (size_t i = 0; i < context.size(); ++i) context[i] = 0.01f * static_cast<float>(i % 7);
  ForwardSample sample;
  sample.seq_len = L;
  sample.context_len = C;
  sample.x = x.data();
  sample.y = y.data();
  sample.context = context.data();
  sample.x_out = x_out.data();
  sample.context_out = context_out.data();

  // Workers are idle before the first request; each runs the warm-up batch in turn.
  std::vector<std::pair<Worker*, WorkerSlot*>> slots;
  {
    absl::MutexLock lock(&workers_mu_);
    for (WorkerSlot& slot : workers_) {
      if (slot.in_service) slot.busy = true;
      slots.emplace_back(slot.worker.get(), &slot);
    }
  }
  int good = 0;
  std::string errors;
  for (auto& [worker, slot] : slots) {
    absl::Status status = worker->Run(ForwardBatch(&sample, 1));
    if (status.ok()) {
      ++good;
    } else {
      std::cerr << "mmdit-server: model '" << name() << "' worker " << worker->name()
                << " failed warm-up and is out of service: " << status << "\n";
      absl::StrAppend(&errors, errors.empty() ? "" : "; ", worker->name(), ": ",
                      status.message());
    }
    ReleaseWorker(slot, status.ok());
  }
  {
    absl::MutexLock lock(&workers_mu_);
    ready_ = good > 0;
  }
  if (options_.metrics != nullptr) {
    options_.metrics->SetModelState(name(),
                                    good > 0 ? ModelLoadState::kReady : ModelLoadState::kFailed);
  }
  if (good == 0) {
    return absl::UnavailableError(
        absl::StrCat("model '", name(), "': no worker passed warm-up: ", errors));
  }
  return absl::OkStatus();
}

bool ServedModel::ready() const {
  absl::MutexLock lock(&workers_mu_);
  return ready_;
}

std::vector<std::string> ServedModel::worker_names() const {
  absl::MutexLock lock(&workers_mu_);
  std::vector<std::string> names;
  for (const WorkerSlot& slot : workers_) names.push_back(slot.worker->name());
  return names;
}

int ServedModel::workers_in_service() const {
  absl::MutexLock lock(&workers_mu_);
  int n = 0;
  for (const WorkerSlot& slot : workers_) n += slot.in_service ? 1 : 0;
  return n;
}

int64_t ServedModel::batch_reruns() const {
  absl::MutexLock lock(&workers_mu_);
  return reruns_;
}

absl::StatusOr<uint64_t> ServedModel::Enqueue(std::unique_ptr<InferRequest> request, DoneFn done) {
  auto task = std::make_unique<InferTask>();
  task->request = std::move(request);
  task->done = std::move(done);
  task->enqueue_time = clock_->Now();
  uint64_t id = 0;
  AddPending(1);
  if (absl::Status s = batcher_->Schedule(&task, &id); !s.ok()) {
    AddPending(-1);
    return s;
  }
  return id;
}

std::unique_ptr<InferRequest> ServedModel::Cancel(uint64_t id) {
  std::unique_ptr<InferTask> task = batcher_->Remove(id);
  if (task == nullptr) return nullptr;
  AddPending(-1);
  return std::move(task->request);
}

void ServedModel::AddPending(int delta) {
  int64_t pending;
  {
    absl::MutexLock lock(&stats_mu_);
    pending_ += delta;
    pending = pending_;
  }
  if (options_.metrics != nullptr) options_.metrics->SetPending(name(), pending);
}

void ServedModel::RejectTask(std::unique_ptr<InferTask> task, absl::Status status) {
  RequestTiming timing;
  timing.queued = true;
  timing.queue = clock_->Now() - task->enqueue_time;
  AddPending(-1);
  task->done(std::move(task->request), std::move(status), timing);
}

void ServedModel::ProcessBatch(Batcher::Batch batch) {
  const absl::Time start = clock_->Now();
  std::vector<ForwardSample> samples;
  for (const std::unique_ptr<InferTask>& task : batch) {
    absl::Span<const ForwardSample> s = task->request->samples();
    samples.insert(samples.end(), s.begin(), s.end());
  }
  std::string worker_name;
  const absl::Status status = RunOnAnyWorker(samples, &worker_name);
  const absl::Time end = clock_->Now();
  const absl::Duration compute = end - start;
  const int n = static_cast<int>(samples.size());
  if (status.ok()) {
    {
      absl::MutexLock lock(&stats_mu_);
      ++execution_count_;
      inference_count_ += n;
      // As Triton counts it: once per request here, once per execution in batch_stats.
      for (size_t i = 0; i < batch.size(); ++i) compute_.Add(compute);
      batch_stats_[n].Add(compute);
      last_inference_ms_ = static_cast<uint64_t>(absl::ToUnixMillis(absl::Now()));
    }
    if (options_.metrics != nullptr) {
      options_.metrics->RecordBatch(name(), worker_name, n, Seconds(compute));
    }
  }
  for (std::unique_ptr<InferTask>& task : batch) {
    RequestTiming timing;
    timing.queued = true;
    timing.queue = start - task->enqueue_time;
    timing.compute = compute;
    AddPending(-1);
    task->done(std::move(task->request), status, timing);
  }
}

ServedModel::WorkerSlot* ServedModel::IdleWorkerLocked() {
  bool primary_in_service = false;
  for (const WorkerSlot& slot : workers_) {
    primary_in_service |= slot.in_service && !slot.worker->fallback_only();
  }
  for (WorkerSlot& slot : workers_) {
    if (!slot.in_service || slot.busy) continue;
    if (primary_in_service && slot.worker->fallback_only()) continue;
    return &slot;
  }
  return nullptr;
}

ServedModel::WorkerSlot* ServedModel::AcquireWorker() {
  absl::MutexLock lock(&workers_mu_);
  while (true) {
    bool any_in_service = false;
    for (const WorkerSlot& slot : workers_) any_in_service |= slot.in_service;
    if (!any_in_service) return nullptr;
    if (WorkerSlot* slot = IdleWorkerLocked(); slot != nullptr) {
      slot->busy = true;
      return slot;
    }
    workers_cv_.Wait(&workers_mu_);
  }
}

void ServedModel::ReleaseWorker(WorkerSlot* slot, bool in_service) {
  bool none_left = false;
  {
    absl::MutexLock lock(&workers_mu_);
    slot->busy = false;
    if (!in_service) {
      slot->in_service = false;
      none_left = true;
      for (const WorkerSlot& s : workers_) none_left &= !s.in_service;
      if (none_left) ready_ = false;
    }
  }
  workers_cv_.SignalAll();
  if (!in_service && options_.metrics != nullptr) {
    options_.metrics->SetWorkerInService(name(), slot->worker->name(), false);
    if (none_left) options_.metrics->SetModelState(name(), ModelLoadState::kFailed);
  }
}

absl::Status ServedModel::RunOnAnyWorker(ForwardBatch samples, std::string* worker_name) {
  std::string failures;
  while (true) {
    WorkerSlot* slot = AcquireWorker();
    if (slot == nullptr) {
      return absl::UnavailableError(absl::StrCat("model '", name(), "' has no worker in service",
                                                 failures.empty() ? "" : ": ", failures));
    }
    Worker* worker = slot->worker.get();
    const absl::Status status = worker->Run(samples);
    if (status.ok() || absl::IsInvalidArgument(status)) {
      *worker_name = worker->name();
      ReleaseWorker(slot, /*in_service=*/true);
      return status;
    }
    std::cerr << "mmdit-server: model '" << name() << "' worker " << worker->name()
              << " failed a batch of " << samples.size()
              << " and is taken out of service; the batch runs again elsewhere: " << status
              << "\n";
    absl::StrAppend(&failures, failures.empty() ? "" : "; ", worker->name(), ": ",
                    status.message());
    ReleaseWorker(slot, /*in_service=*/false);
    {
      absl::MutexLock lock(&workers_mu_);
      ++reruns_;
    }
    if (options_.metrics != nullptr) options_.metrics->RecordBatchRerun(name(), worker->name());
  }
}

void ServedModel::RecordRequest(const absl::Status& status, absl::Duration request_duration,
                                const RequestTiming& timing) {
  {
    absl::MutexLock lock(&stats_mu_);
    (status.ok() ? success_ : fail_).Add(request_duration);
    if (timing.queued) queue_.Add(timing.queue);
  }
  if (options_.metrics != nullptr) {
    options_.metrics->RecordRequest(name(), status, Seconds(request_duration),
                                    timing.queued ? Seconds(timing.queue) : -1.0);
  }
}

void ServedModel::FillStatistics(inference::ModelStatistics* stats) const {
  auto fill = [](const Duration& d, inference::StatisticDuration* out) {
    out->set_count(d.count);
    out->set_ns(d.ns);
  };
  stats->set_name(name());
  stats->set_version(absl::StrCat(signature_.version));
  absl::MutexLock lock(&stats_mu_);
  stats->set_last_inference(last_inference_ms_);
  stats->set_inference_count(inference_count_);
  stats->set_execution_count(execution_count_);
  inference::InferStatistics* infer = stats->mutable_inference_stats();
  fill(success_, infer->mutable_success());
  fill(fail_, infer->mutable_fail());
  fill(queue_, infer->mutable_queue());
  fill(compute_, infer->mutable_compute_infer());
  for (const auto& [size, d] : batch_stats_) {
    inference::InferBatchStatistics* b = stats->add_batch_stats();
    b->set_batch_size(size);
    fill(d, b->mutable_compute_infer());
  }
}

}  // namespace mmdit
