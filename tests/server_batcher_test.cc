// The dynamic batcher with fake tasks and a fake clock: batch formation by size and by queue
// delay, FIFO order, queue limits, deadlines, removal and draining on Stop.
#include "server/dynamic_batcher.h"

#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/clock.h"

namespace mmdit {
namespace {

struct FakeTask {
  int id = 0;
  int samples = 1;
  absl::Time expires = absl::InfiniteFuture();
  int size() const { return samples; }
  absl::Time deadline() const { return expires; }
};

using Batcher = DynamicBatcher<FakeTask>;

// Collects what the batcher hands out; the process callback can be held closed to keep the
// batch threads busy.
class Recorder {
 public:
  Batcher::ProcessBatchFn Process() {
    return [this](Batcher::Batch batch) {
      {
        absl::MutexLock lock(&mu_);
        while (!open_) cv_.Wait(&mu_);
        std::vector<int> ids;
        for (auto& t : batch) ids.push_back(t->id);
        batches_.push_back(ids);
      }
      cv_.SignalAll();
    };
  }
  Batcher::RejectFn Reject() {
    return [this](std::unique_ptr<FakeTask> task, absl::Status status) {
      {
        absl::MutexLock lock(&mu_);
        rejected_.push_back({task->id, status.code()});
      }
      cv_.SignalAll();
    };
  }
  void SetOpen(bool open) {
    {
      absl::MutexLock lock(&mu_);
      open_ = open;
    }
    cv_.SignalAll();
  }
  // Waits (bounded, real time) until `n` batches were processed.
  bool WaitForBatches(size_t n) {
    return WaitFor([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return batches_.size() >= n; });
  }
  bool WaitForRejected(size_t n) {
    return WaitFor([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return rejected_.size() >= n; });
  }
  std::vector<std::vector<int>> batches() {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  std::vector<std::pair<int, absl::StatusCode>> rejected() {
    absl::MutexLock lock(&mu_);
    return rejected_;
  }

 private:
  template <typename Pred>
  bool WaitFor(Pred done) {
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    absl::MutexLock lock(&mu_);
    while (!done()) {
      if (absl::Now() >= give_up) return false;
      cv_.WaitWithDeadline(&mu_, give_up);
    }
    return true;
  }

  absl::Mutex mu_;
  absl::CondVar cv_;
  bool open_ ABSL_GUARDED_BY(mu_) = true;
  std::vector<std::vector<int>> batches_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<int, absl::StatusCode>> rejected_ ABSL_GUARDED_BY(mu_);
};

std::unique_ptr<FakeTask> Task(int id, int samples = 1,
                               absl::Time expires = absl::InfiniteFuture()) {
  auto t = std::make_unique<FakeTask>();
  t->id = id;
  t->samples = samples;
  t->expires = expires;
  return t;
}

absl::Status Schedule(Batcher& b, std::unique_ptr<FakeTask> t, uint64_t* id = nullptr) {
  return b.Schedule(&t, id);
}

TEST(DynamicBatcherTest, CreateValidatesOptions) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 0;
  absl::StatusOr<std::unique_ptr<Batcher>> b = Batcher::Create(o, r.Process(), r.Reject());
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("max_batch_size must be positive; was 0"),
            std::string::npos);
  o.max_batch_size = 4;
  o.max_queue_size = 0;
  EXPECT_FALSE(Batcher::Create(o, r.Process(), r.Reject()).ok());
  o.max_queue_size = 4;
  o.preferred_batch_size = 5;
  EXPECT_FALSE(Batcher::Create(o, r.Process(), r.Reject()).ok());
  o.preferred_batch_size = 0;
  o.max_queue_delay_micros = -1;
  EXPECT_FALSE(Batcher::Create(o, r.Process(), r.Reject()).ok());
}

TEST(DynamicBatcherTest, WaitsForQueueDelayThenSendsPartialBatch) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.max_queue_delay_micros = 1000;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  ASSERT_TRUE(Schedule(*b, Task(1)).ok());
  ASSERT_TRUE(Schedule(*b, Task(2, 2)).ok());
  absl::SleepFor(absl::Milliseconds(20));  // real time passes; fake time does not
  EXPECT_TRUE(r.batches().empty());
  clock.Advance(absl::Microseconds(999));
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_TRUE(r.batches().empty());
  clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(r.WaitForBatches(1));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{1, 2}));
}

TEST(DynamicBatcherTest, FullBatchGoesAtOnceInArrivalOrder) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 4;
  o.max_queue_delay_micros = 1'000'000'000;  // never, in this test
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  r.SetOpen(false);
  // 3 + 1 fill the first batch; 2 + 2 the second. No clock advance is needed.
  ASSERT_TRUE(Schedule(*b, Task(1, 3)).ok());
  ASSERT_TRUE(Schedule(*b, Task(2, 1)).ok());
  ASSERT_TRUE(Schedule(*b, Task(3, 2)).ok());
  ASSERT_TRUE(Schedule(*b, Task(4, 2)).ok());
  r.SetOpen(true);
  ASSERT_TRUE(r.WaitForBatches(2));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{1, 2}));
  EXPECT_EQ(r.batches()[1], (std::vector<int>{3, 4}));
}

TEST(DynamicBatcherTest, TaskThatDoesNotFitWaitsForTheNextBatch) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 4;
  o.max_queue_delay_micros = 100;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  r.SetOpen(false);
  ASSERT_TRUE(Schedule(*b, Task(1, 3)).ok());
  ASSERT_TRUE(Schedule(*b, Task(2, 3)).ok());  // 3 + 3 > 4: never split, never reordered
  ASSERT_TRUE(Schedule(*b, Task(3, 1)).ok());
  clock.Advance(absl::Microseconds(100));
  r.SetOpen(true);
  ASSERT_TRUE(r.WaitForBatches(2));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{1}));
  EXPECT_EQ(r.batches()[1], (std::vector<int>{2, 3}));
}

TEST(DynamicBatcherTest, PreferredBatchSizeSendsWithoutWaiting) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.preferred_batch_size = 2;
  o.max_queue_delay_micros = 1'000'000'000;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  ASSERT_TRUE(Schedule(*b, Task(1)).ok());
  ASSERT_TRUE(Schedule(*b, Task(2)).ok());
  ASSERT_TRUE(r.WaitForBatches(1));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{1, 2}));
}

TEST(DynamicBatcherTest, RefusesTasksOutsideTheBatchSize) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 4;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  std::unique_ptr<FakeTask> t = Task(1, 5);
  absl::Status s = b->Schedule(&t);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t, nullptr);  // ownership stays with the caller on error
}

TEST(DynamicBatcherTest, FullQueueIsUnavailableAtOnceAndKeepsTheTask) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.max_queue_delay_micros = 1'000'000'000;
  o.max_queue_size = 2;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  ASSERT_TRUE(Schedule(*b, Task(1)).ok());
  ASSERT_TRUE(Schedule(*b, Task(2)).ok());
  std::unique_ptr<FakeTask> t = Task(3);
  absl::Status s = b->Schedule(&t);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("queue is full"), std::string::npos) << s;
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->id, 3);
  EXPECT_EQ(b->num_queued_tasks(), 2);
  EXPECT_EQ(b->num_queued_samples(), 2);
}

TEST(DynamicBatcherTest, ExpiredTaskLeavesTheQueueWithDeadlineExceeded) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.max_queue_delay_micros = 10'000;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  ASSERT_TRUE(Schedule(*b, Task(1, 1, clock.Now() + absl::Microseconds(500))).ok());
  ASSERT_TRUE(Schedule(*b, Task(2)).ok());
  clock.Advance(absl::Microseconds(500));
  ASSERT_TRUE(r.WaitForRejected(1));
  EXPECT_EQ(r.rejected()[0], std::make_pair(1, absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(r.batches().empty());
  clock.Advance(absl::Microseconds(9'500));
  ASSERT_TRUE(r.WaitForBatches(1));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{2}));
}

TEST(DynamicBatcherTest, RemoveTakesAQueuedTaskBack) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.max_queue_delay_micros = 1000;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  uint64_t id1 = 0, id2 = 0;
  ASSERT_TRUE(Schedule(*b, Task(1), &id1).ok());
  ASSERT_TRUE(Schedule(*b, Task(2), &id2).ok());
  std::unique_ptr<FakeTask> back = b->Remove(id1);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->id, 1);
  EXPECT_EQ(b->Remove(id1), nullptr);  // gone already
  clock.Advance(absl::Microseconds(1000));
  ASSERT_TRUE(r.WaitForBatches(1));
  EXPECT_EQ(r.batches()[0], (std::vector<int>{2}));
  EXPECT_EQ(b->Remove(id2), nullptr);  // already batched
  EXPECT_TRUE(r.rejected().empty());
}

TEST(DynamicBatcherTest, StopDrainsWithoutWaitingForTheDelayAndRefusesNewTasks) {
  FakeClock clock;
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 2;
  o.max_queue_delay_micros = 1'000'000'000;
  o.clock = &clock;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  r.SetOpen(false);
  for (int i = 1; i <= 5; ++i) ASSERT_TRUE(Schedule(*b, Task(i)).ok());
  r.SetOpen(true);
  b->Stop();  // blocks until every queued task ran
  const auto batches = r.batches();
  std::vector<int> seen;
  for (const auto& batch : batches) {
    EXPECT_LE(batch.size(), 2u);
    seen.insert(seen.end(), batch.begin(), batch.end());
  }
  EXPECT_EQ(seen, (std::vector<int>{1, 2, 3, 4, 5}));
  EXPECT_EQ(Schedule(*b, Task(6)).code(), absl::StatusCode::kUnavailable);
}

TEST(DynamicBatcherTest, SeveralBatchThreadsRunBatchesConcurrently) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 1;
  o.num_batch_threads = 3;
  auto b = *Batcher::Create(o, r.Process(), r.Reject());
  constexpr int kTasks = 60;
  for (int i = 0; i < kTasks; ++i) ASSERT_TRUE(Schedule(*b, Task(i)).ok());
  ASSERT_TRUE(r.WaitForBatches(kTasks));
  b->Stop();
  EXPECT_EQ(r.batches().size(), static_cast<size_t>(kTasks));
}

}  // namespace
}  // namespace mmdit
