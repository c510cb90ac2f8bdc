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
  // With `mu` held: waits until `cv` is signalled or Now() >= deadline, releasing `mu` meanwhile.
  // May return early (spurious wake-ups), so callers re-check what they wait for.
  virtual void WaitWithDeadline(absl::CondVar* cv, absl::Mutex* mu,
                                absl::Time deadline) const = 0;
};

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  void WaitWithDeadline(absl::CondVar* cv, absl::Mutex* mu, absl::Time deadline) const override {
    cv->WaitWithDeadline(mu, deadline);
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
  void WaitWithDeadline(absl::CondVar* cv, absl::Mutex* mu, absl::Time deadline) const override {
    if (Now() < deadline) cv->WaitWithTimeout(mu, absl::Milliseconds(1));
  }

 private:
  std::atomic<int64_t> now_nanos_;
};

}  // namespace mmdit
