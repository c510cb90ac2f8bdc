// The dynamic batcher of one model, in the shape of TensorFlow Serving's BatchScheduler: callers
// Schedule() tasks (requests of one or more samples); batch threads take tasks off the queue in
// arrival order, as many as fit in max_batch_size samples, once enough samples are queued or the
// oldest task has waited max_queue_delay_micros, and hand the batch to a callback. A task never
// splits across batches, and tasks of different shapes join one batch (the callback packs them).
//
// TaskType provides `int size() const` (samples, >= 1) and `absl::Time deadline() const`
// (absl::InfiniteFuture() for none). A task whose deadline passes while queued leaves the queue
// through the reject callback with DEADLINE_EXCEEDED; it never reaches a batch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"

namespace mmdit {

template <typename TaskType>
class DynamicBatcher {
 public:
  struct Options {
    std::string name = "batcher";  // used in messages
    // Samples in one batch; a task larger than this is refused at Schedule().
    int max_batch_size = 1;
    // How long the oldest queued task may wait for others before a partial batch is sent.
    int64_t max_queue_delay_micros = 0;
    // A batch is sent at once when this many samples are queued (Triton's preferred batch size);
    // 0 means max_batch_size.
    int preferred_batch_size = 0;
    // Tasks (not samples) waiting; Schedule() beyond this answers UNAVAILABLE at once.
    int max_queue_size = 1024;
    // Batches processed at once: one thread per worker, so a batch is formed only when a worker
    // can take it and the queue fills meanwhile, which is what makes batches under load.
    int num_batch_threads = 1;
    // Not owned; null means RealClock.
    const Clock* clock = nullptr;
  };

  using Batch = std::vector<std::unique_ptr<TaskType>>;
  // Runs one batch on a batch thread, never under the batcher's lock.
  using ProcessBatchFn = std::function<void(Batch batch)>;
  // Receives a task that leaves the queue without running, with the reason.
  using RejectFn = std::function<void(std::unique_ptr<TaskType> task, absl::Status status)>;

  static absl::StatusOr<std::unique_ptr<DynamicBatcher>> Create(const Options& options,
                                                                ProcessBatchFn process,
                                                                RejectFn reject) {
    if (options.max_batch_size < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_batch_size must be positive; was ", options.max_batch_size));
    }
    if (options.max_queue_delay_micros < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "max_queue_delay_micros must not be negative; was ", options.max_queue_delay_micros));
    }
    if (options.preferred_batch_size < 0 ||
        options.preferred_batch_size > options.max_batch_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("preferred_batch_size must be in [0, max_batch_size = ",
                       options.max_batch_size, "]; was ", options.preferred_batch_size));
    }
    if (options.max_queue_size < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_queue_size must be positive; was ", options.max_queue_size));
    }
    if (options.num_batch_threads < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_batch_threads must be positive; was ", options.num_batch_threads));
    }
    if (!process || !reject) {
      return absl::InvalidArgumentError("both the process and the reject callback must be set");
    }
    std::unique_ptr<DynamicBatcher> batcher(
        new DynamicBatcher(options, std::move(process), std::move(reject)));
    {
      absl::MutexLock lock(&batcher->join_mu_);
      for (int i = 0; i < options.num_batch_threads; ++i) {
        batcher->threads_.emplace_back([b = batcher.get()] { b->BatchThreadLoop(); });
      }
    }
    return batcher;
  }

  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;
  ~DynamicBatcher() { Stop(); }

  // Takes ownership of *task only when it returns OK (then *task is null and *id, when given,
  // names the task for Remove()). UNAVAILABLE when the queue is full or the batcher is stopping;
  // INVALID_ARGUMENT when the task's size is outside [1, max_batch_size].
  absl::Status Schedule(std::unique_ptr<TaskType>* task, uint64_t* id = nullptr) {
    const int size = (*task)->size();
    if (size < 1 || size > options_.max_batch_size) {
      return absl::InvalidArgumentError(absl::StrCat("batch size ", size, " is outside [1, ",
                                                     options_.max_batch_size, "]"));
    }
    const absl::Time now = clock_->Now();
    absl::ReleasableMutexLock lock(&mu_);
    if (stopping_) {
      return absl::UnavailableError(
          absl::StrCat(options_.name, ": the server is shutting down; retry on another replica"));
    }
    if (static_cast<int>(queue_.size()) >= options_.max_queue_size) {
      return absl::UnavailableError(absl::StrCat(options_.name, ": queue is full (",
                                                 options_.max_queue_size,
                                                 " requests waiting); retry later"));
    }
    {
      const uint64_t task_id = next_id_++;
      queue_.push_back(Entry{task_id, now, std::move(*task)});
      queued_samples_ += size;
      if (id != nullptr) *id = task_id;
    }
    lock.Release();
    cv_.SignalAll();
    return absl::OkStatus();
  }

  // Takes a task that is still queued back out (a cancelled call): the caller owns it again and
  // neither callback will see it. Null when the task already left the queue.
  std::unique_ptr<TaskType> Remove(uint64_t id) {
    std::unique_ptr<TaskType> task;
    {
      absl::MutexLock lock(&mu_);
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->id != id) continue;
        task = std::move(it->task);
        queued_samples_ -= task->size();
        queue_.erase(it);
        break;
      }
    }
    if (task != nullptr) cv_.SignalAll();
    return task;
  }

  // Stops taking tasks; what is queued is still batched (without waiting for the queue delay)
  // and processed, then the batch threads exit. Blocks until they have. Idempotent.
  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    cv_.SignalAll();
    std::vector<std::thread> threads;
    {
      absl::MutexLock lock(&join_mu_);
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

  int64_t num_queued_tasks() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(queue_.size());
  }
  int64_t num_queued_samples() const {
    absl::MutexLock lock(&mu_);
    return queued_samples_;
  }
  const Options& options() const { return options_; }

 private:
  struct Entry {
    uint64_t id;
    absl::Time enqueue_time;
    std::unique_ptr<TaskType> task;
  };

  DynamicBatcher(const Options& options, ProcessBatchFn process, RejectFn reject)
      : options_(options),
        clock_(options.clock != nullptr ? options.clock : RealClock::Get()),
        process_(std::move(process)),
        reject_(std::move(reject)),
        target_samples_(options.preferred_batch_size > 0 ? options.preferred_batch_size
                                                         : options.max_batch_size) {}

  void BatchThreadLoop() {
    while (true) {
      Batch batch;
      std::vector<std::unique_ptr<TaskType>> expired;
      bool exit = false;
      {
        absl::MutexLock lock(&mu_);
        while (true) {
          const absl::Time now = clock_->Now();
          absl::Time earliest_deadline = absl::InfiniteFuture();
          for (auto it = queue_.begin(); it != queue_.end();) {
            const absl::Time deadline = it->task->deadline();
            if (deadline <= now) {
              queued_samples_ -= it->task->size();
              expired.push_back(std::move(it->task));
              it = queue_.erase(it);
            } else {
              earliest_deadline = std::min(earliest_deadline, deadline);
              ++it;
            }
          }
          if (!expired.empty()) break;
          if (queue_.empty()) {
            if (stopping_) {
              exit = true;
              break;
            }
            cv_.Wait(&mu_);
            continue;
          }
          const absl::Time ready_at =
              queue_.front().enqueue_time + absl::Microseconds(options_.max_queue_delay_micros);
          if (stopping_ || queued_samples_ >= target_samples_ || now >= ready_at) {
            TakeBatchLocked(&batch);
            break;
          }
          clock_->WaitWithDeadline(&cv_, &mu_, std::min(ready_at, earliest_deadline));
        }
      }
      // Another batch thread may find the rest of the queue ready now.
      if (!batch.empty() || !expired.empty()) cv_.SignalAll();
      for (std::unique_ptr<TaskType>& task : expired) {
        reject_(std::move(task),
                absl::DeadlineExceededError(absl::StrCat(
                    options_.name, ": the request's deadline passed while it was queued")));
      }
      if (!batch.empty()) process_(std::move(batch));
      if (exit) return;
    }
  }

  void TakeBatchLocked(Batch* batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int samples = 0;
    while (!queue_.empty()) {
      const int size = queue_.front().task->size();
      if (samples + size > options_.max_batch_size) break;
      samples += size;
      batch->push_back(std::move(queue_.front().task));
      queue_.pop_front();
    }
    queued_samples_ -= samples;
  }

  const Options options_;
  const Clock* const clock_;
  const ProcessBatchFn process_;
  const RejectFn reject_;
  const int target_samples_;

  mutable absl::Mutex mu_;
  // Signalled (outside mu_) on every change a waiting batch thread must look at.
  absl::CondVar cv_;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_samples_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  absl::Mutex join_mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace mmdit
