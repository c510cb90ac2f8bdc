#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mmdit {
namespace {

// std::atomic<double>::fetch_add is C++20; a compare-exchange loop is the C++17 equivalent and
// stays lock-free on every target we build for.
void AtomicAdd(std::atomic<double>& target, double amount) {
  double current = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(current, current + amount, std::memory_order_relaxed)) {
  }
}

bool IsMetricName(const std::string& name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    const bool digit = c >= '0' && c <= '9';
    if (!alpha && !(digit && i > 0)) return false;
  }
  return true;
}

bool IsLabelName(const std::string& name) {
  if (name.empty() || name.rfind("__", 0) == 0) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool digit = c >= '0' && c <= '9';
    if (!alpha && !(digit && i > 0)) return false;
  }
  return true;
}

// `name{a="x",b="y"[,extra]}`; no braces when there is nothing to put in them.
void AppendSeriesName(std::string* out, const std::string& name,
                      const std::vector<std::string>& label_names,
                      const std::vector<std::string>& label_values, const std::string& extra) {
  out->append(name);
  if (label_names.empty() && extra.empty()) return;
  out->push_back('{');
  for (size_t i = 0; i < label_names.size(); ++i) {
    if (i > 0) out->push_back(',');
    absl::StrAppend(out, label_names[i], "=\"", EscapeLabelValue(label_values[i]), "\"");
  }
  if (!extra.empty()) {
    if (!label_names.empty()) out->push_back(',');
    out->append(extra);
  }
  out->push_back('}');
}

void AppendSample(std::string* out, const std::string& name,
                  const std::vector<std::string>& label_names,
                  const std::vector<std::string>& label_values, const std::string& extra,
                  double value) {
  AppendSeriesName(out, name, label_names, label_values, extra);
  absl::StrAppend(out, " ", FormatMetricValue(value), "\n");
}

}  // namespace

void Counter::Increment(double amount) {
  if (!(amount > 0.0)) return;  // also rejects NaN
  AtomicAdd(value_, amount);
}

void Gauge::Add(double amount) { AtomicAdd(value_, amount); }

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)),
      bucket_counts_(new std::atomic<uint64_t>[upper_bounds_.size() + 1]) {
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) bucket_counts_[i].store(0);
}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  // Bounds are "less than or equal": the first bound >= value.
  const size_t bucket =
      std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin();
  bucket_counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(sum_, value);
}

Histogram::Snapshot Histogram::Collect() const {
  Snapshot s;
  s.upper_bounds = upper_bounds_;
  s.cumulative_counts.resize(upper_bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    running += bucket_counts_[i].load(std::memory_order_relaxed);
    s.cumulative_counts[i] = running;
  }
  // The count is derived from the buckets so that a scrape racing an Observe still shows
  // _count equal to the +Inf bucket, as Prometheus expects.
  s.count = running;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> bounds;
  if (!(start > 0.0) || !(factor > 1.0) || count <= 0) return bounds;
  double bound = start;
  for (int i = 0; i < count; ++i) {
    bounds.push_back(bound);
    bound *= factor;
  }
  return bounds;
}

std::vector<double> LinearBuckets(double start, double width, int count) {
  std::vector<double> bounds;
  if (!(width > 0.0) || count <= 0) return bounds;
  for (int i = 0; i < count; ++i) bounds.push_back(start + width * i);
  return bounds;
}

template <typename T>
Family<T>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                  std::vector<double> upper_bounds)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      upper_bounds_(std::move(upper_bounds)) {}

template <>
std::unique_ptr<Counter> Family<Counter>::MakeChild() const {
  return std::make_unique<Counter>();
}
template <>
std::unique_ptr<Gauge> Family<Gauge>::MakeChild() const {
  return std::make_unique<Gauge>();
}
template <>
std::unique_ptr<Histogram> Family<Histogram>::MakeChild() const {
  return std::make_unique<Histogram>(upper_bounds_);
}

template <typename T>
absl::StatusOr<T*> Family<T>::Get(absl::Span<const std::string> label_values) {
  if (label_values.size() != label_names_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metric ", name_, " has ", label_names_.size(), " labels (",
        absl::StrJoin(label_names_, ", "), "); got ", label_values.size(), " values"));
  }
  std::vector<std::string> key(label_values.begin(), label_values.end());
  std::lock_guard<std::mutex> lock(mu_);
  auto it = children_.find(key);
  if (it == children_.end()) it = children_.emplace(std::move(key), MakeChild()).first;
  return it->second.get();
}

template <typename T>
T& Family<T>::WithLabels(absl::Span<const std::string> label_values) {
  std::vector<std::string> values(label_values.begin(), label_values.end());
  values.resize(label_names_.size());
  return **Get(values);
}

namespace {

// One child's samples: a single value for counters and gauges, buckets, sum and count for
// histograms.
void AppendChild(std::string* out, const std::string& name,
                 const std::vector<std::string>& label_names,
                 const std::vector<std::string>& key, const Counter& child) {
  AppendSample(out, name, label_names, key, "", child.Value());
}

void AppendChild(std::string* out, const std::string& name,
                 const std::vector<std::string>& label_names,
                 const std::vector<std::string>& key, const Gauge& child) {
  AppendSample(out, name, label_names, key, "", child.Value());
}

void AppendChild(std::string* out, const std::string& name,
                 const std::vector<std::string>& label_names,
                 const std::vector<std::string>& key, const Histogram& child) {
  const Histogram::Snapshot s = child.Collect();
  const std::string bucket_name = name + "_bucket";
  for (size_t i = 0; i < s.upper_bounds.size(); ++i) {
    AppendSample(out, bucket_name, label_names, key,
                 absl::StrCat("le=\"", FormatMetricValue(s.upper_bounds[i]), "\""),
                 static_cast<double>(s.cumulative_counts[i]));
  }
  AppendSample(out, bucket_name, label_names, key, "le=\"+Inf\"", static_cast<double>(s.count));
  AppendSample(out, name + "_sum", label_names, key, "", s.sum);
  AppendSample(out, name + "_count", label_names, key, "", static_cast<double>(s.count));
}

}  // namespace

template <typename T>
void Family<T>::Render(std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<const std::vector<std::string>*> keys;
  for (const auto& [key, child] : children_) keys.push_back(&key);
  std::sort(keys.begin(), keys.end(), [](auto* a, auto* b) { return *a < *b; });
  for (const auto* key : keys) AppendChild(out, name_, label_names_, *key, *children_.at(*key));
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

absl::Status MetricsRegistry::CheckNewFamily(const std::string& name,
                                             const std::vector<std::string>& labels,
                                             bool histogram) const {
  if (!IsMetricName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric name \"", name, "\" is not [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  for (const Entry& e : families_) {
    const std::string& existing = e.counter     ? e.counter->name()
                                  : e.gauge     ? e.gauge->name()
                                                : e.histogram->name();
    if (existing == name) {
      return absl::InvalidArgumentError(absl::StrCat("metric ", name, " is already registered"));
    }
  }
  for (size_t i = 0; i < labels.size(); ++i) {
    if (!IsLabelName(labels[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metric ", name, ": label name \"", labels[i],
          "\" is not [a-zA-Z_][a-zA-Z0-9_]* or starts with \"__\""));
    }
    if (histogram && labels[i] == "le") {
      return absl::InvalidArgumentError(
          absl::StrCat("histogram ", name, " may not use the label name \"le\""));
    }
    for (size_t j = 0; j < i; ++j) {
      if (labels[j] == labels[i]) {
        return absl::InvalidArgumentError(
            absl::StrCat("metric ", name, ": label name \"", labels[i], "\" repeated"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CounterFamily*> MetricsRegistry::AddCounter(const std::string& name,
                                                           const std::string& help,
                                                           std::vector<std::string> label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckNewFamily(name, label_names, false); !s.ok()) return s;
  Entry e{MetricType::kCounter, nullptr, nullptr, nullptr};
  const bool no_labels = label_names.empty();
  e.counter.reset(new CounterFamily(name, help, std::move(label_names), {}));
  // A family without labels has exactly one series; export it at 0 from the start.
  if (no_labels) e.counter->WithLabels({});
  families_.push_back(std::move(e));
  return families_.back().counter.get();
}

absl::StatusOr<GaugeFamily*> MetricsRegistry::AddGauge(const std::string& name,
                                                       const std::string& help,
                                                       std::vector<std::string> label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckNewFamily(name, label_names, false); !s.ok()) return s;
  Entry e{MetricType::kGauge, nullptr, nullptr, nullptr};
  const bool no_labels = label_names.empty();
  e.gauge.reset(new GaugeFamily(name, help, std::move(label_names), {}));
  if (no_labels) e.gauge->WithLabels({});
  families_.push_back(std::move(e));
  return families_.back().gauge.get();
}

absl::StatusOr<HistogramFamily*> MetricsRegistry::AddHistogram(
    const std::string& name, const std::string& help, std::vector<std::string> label_names,
    std::vector<double> upper_bounds) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckNewFamily(name, label_names, true); !s.ok()) return s;
  if (upper_bounds.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("histogram ", name, " has no buckets"));
  }
  for (size_t i = 0; i < upper_bounds.size(); ++i) {
    if (!std::isfinite(upper_bounds[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "histogram ", name, ": bucket bound ", i, " is not finite (+Inf is implicit)"));
    }
    if (i > 0 && !(upper_bounds[i] > upper_bounds[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "histogram ", name, ": bucket bounds must be strictly increasing; bound ", i, " (",
          upper_bounds[i], ") <= bound ", i - 1, " (", upper_bounds[i - 1], ")"));
    }
  }
  Entry e{MetricType::kHistogram, nullptr, nullptr, nullptr};
  const bool no_labels = label_names.empty();
  e.histogram.reset(
      new HistogramFamily(name, help, std::move(label_names), std::move(upper_bounds)));
  if (no_labels) e.histogram->WithLabels({});
  families_.push_back(std::move(e));
  return families_.back().histogram.get();
}

std::string MetricsRegistry::Exposition() const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const Entry& e : families_) {
    switch (e.type) {
      case MetricType::kCounter:
        absl::StrAppend(&out, "# HELP ", e.counter->name(), " ", EscapeHelp(e.counter->help()),
                        "\n# TYPE ", e.counter->name(), " counter\n");
        e.counter->Render(&out);
        break;
      case MetricType::kGauge:
        absl::StrAppend(&out, "# HELP ", e.gauge->name(), " ", EscapeHelp(e.gauge->help()),
                        "\n# TYPE ", e.gauge->name(), " gauge\n");
        e.gauge->Render(&out);
        break;
      case MetricType::kHistogram:
        absl::StrAppend(&out, "# HELP ", e.histogram->name(), " ",
                        EscapeHelp(e.histogram->help()), "\n# TYPE ", e.histogram->name(),
                        " histogram\n");
        e.histogram->Render(&out);
        break;
    }
  }
  return out;
}

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  // Integral values (counts) print exactly, without an exponent, up to 2^53.
  if (value == std::floor(value) && std::fabs(value) < 9007199254740992.0) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  // The shortest of %.15g / %.17g that reads back to the same double, so that 0.005 prints as
  // "0.005" and not "0.0050000000000000001".
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.15g", value);
  if (std::strtod(buf, nullptr) != value) std::snprintf(buf, sizeof(buf), "%.17g", value);
  return buf;
}

std::string EscapeLabelValue(absl::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      default: out.push_back(c);
    }
  }
  return out;
}

std::string EscapeHelp(absl::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default: out.push_back(c);
    }
  }
  return out;
}

}  // namespace mmdit
