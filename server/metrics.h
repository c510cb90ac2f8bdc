// A small Prometheus metrics registry: counters, gauges and histograms with label sets, rendered
// in the text exposition format 0.0.4. The hot path (Increment, Set, Observe on a child the
// caller already holds) is lock-free; looking a child up by label values takes one short
// mutex section, so callers on the request path keep the returned pointer.
//
// The locks here are std::mutex rather than absl::Mutex: Debian's Abseil is not built with
// ThreadSanitizer, so TSan cannot see absl::Mutex's ordering and reports false races in the TSan
// build, while std::mutex goes through pthread calls that TSan intercepts.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace mmdit {

// A monotonically increasing value. Increments by negative or NaN amounts are ignored, since a
// counter that goes down breaks Prometheus' rate().
class Counter {
 public:
  void Increment(double amount = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double amount);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Observations counted into buckets by upper bound (le); the exposition makes them cumulative
// and adds +Inf. A NaN observation is ignored.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);

  void Observe(double value);

  struct Snapshot {
    std::vector<double> upper_bounds;         // without +Inf
    std::vector<uint64_t> cumulative_counts;  // one per bound, then one for +Inf
    double sum = 0.0;
    uint64_t count = 0;  // equals cumulative_counts.back()
  };
  Snapshot Collect() const;

 private:
  const std::vector<double> upper_bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> bucket_counts_;  // size upper_bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

// Bucket bounds: `count` bounds start, start*factor, … (start > 0, factor > 1).
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// Bucket bounds: start, start+width, … (width > 0).
std::vector<double> LinearBuckets(double start, double width, int count);

enum class MetricType { kCounter, kGauge, kHistogram };

// A named metric with fixed label names; one child per distinct tuple of label values.
// Children live as long as the family, so returned pointers stay valid.
template <typename T>
class Family {
 public:
  // The child for `label_values`, given in the order of label_names(); created on first use.
  // InvalidArgument when the number of values does not match.
  absl::StatusOr<T*> Get(absl::Span<const std::string> label_values);
  // The same for families without labels, or where a wrong count is a programming error that
  // must not take the process down: missing values become "", extra ones are dropped.
  T& WithLabels(absl::Span<const std::string> label_values);

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

 private:
  friend class MetricsRegistry;
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> upper_bounds);
  std::unique_ptr<T> MakeChild() const;
  // Renders every child's samples, sorted by label values so that the output is stable.
  void Render(std::string* out) const;

  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
  const std::vector<double> upper_bounds_;  // histograms only
  mutable std::mutex mu_;
  absl::flat_hash_map<std::vector<std::string>, std::unique_ptr<T>> children_
      ABSL_GUARDED_BY(mu_);
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// Owns metric families and renders them. Names follow Prometheus' rules (metric
// [a-zA-Z_:][a-zA-Z0-9_:]*, label [a-zA-Z_][a-zA-Z0-9_]*, no "__" prefix, histograms may not use
// the label "le"); a bad name, a duplicate name or unsorted buckets fail with InvalidArgument.
// Families appear in the exposition in the order they were added.
class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  absl::StatusOr<CounterFamily*> AddCounter(const std::string& name, const std::string& help,
                                            std::vector<std::string> label_names = {});
  absl::StatusOr<GaugeFamily*> AddGauge(const std::string& name, const std::string& help,
                                        std::vector<std::string> label_names = {});
  // `upper_bounds` strictly increasing and finite; +Inf is implicit.
  absl::StatusOr<HistogramFamily*> AddHistogram(const std::string& name, const std::string& help,
                                                std::vector<std::string> label_names,
                                                std::vector<double> upper_bounds);

  // Text exposition format 0.0.4: "# HELP", "# TYPE" and the samples of every family.
  std::string Exposition() const;

 private:
  absl::Status CheckNewFamily(const std::string& name, const std::vector<std::string>& labels,
                              bool histogram) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Entry {
    MetricType type;
    std::unique_ptr<CounterFamily> counter;
    std::unique_ptr<GaugeFamily> gauge;
    std::unique_ptr<HistogramFamily> histogram;
  };
  mutable std::mutex mu_;
  std::vector<Entry> families_ ABSL_GUARDED_BY(mu_);
};

// Helpers of the text format, exposed for tests.
std::string FormatMetricValue(double value);         // "3", "0.25", "+Inf", "NaN"
std::string EscapeLabelValue(absl::string_view value);  // \\, \" and \n escaped
std::string EscapeHelp(absl::string_view help);         // \\ and \n escaped

}  // namespace mmdit
