// The time source of the batcher and the request path. Production uses RealClock; tests inject a
// FakeClock and advance it, so that queue-delay and timeout behaviour is tested without sleeping.
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace mmdit {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // With `mu` held: returns once `cond` holds or Now() >= deadline, whichever comes first.
  // Returns whether `cond` holds. `mu` is released while waiting, as in absl::Mutex::Await.
  virtual bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                                 absl::Time deadline) const = 0;
};

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                         absl::Time deadline) const override {
    return mu->AwaitWithDeadline(cond, deadline);
  }
  // The process-wide instance.
  static RealClock* Get() {
    static RealClock* clock = new RealClock();
    return clock;
  }
};

// A clock that moves only when told to. Waiters re-check their deadline every millisecond of real
// time, so a test that advances the clock sees the effect within a few milliseconds.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::UnixEpoch() + absl::Hours(24))
      : now_nanos_(absl::ToUnixNanos(start)) {}

  absl::Time Now() const override {
    return absl::FromUnixNanos(now_nanos_.load(std::memory_order_acquire));
  }
  void Advance(absl::Duration d) {
    now_nanos_.fetch_add(absl::ToInt64Nanoseconds(d), std::memory_order_acq_rel);
  }
  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& cond,
                         absl::Time deadline) const override {
    while (!cond.Eval()) {
      if (Now() >= deadline) return false;
      mu->AwaitWithTimeout(cond, absl::Milliseconds(1));
    }
    return true;
  }

 private:
  std::atomic<int64_t> now_nanos_;
};

}  // namespace mmdit
