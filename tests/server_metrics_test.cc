// The metrics registry and the server's metric families: values, text format, and the
// exposition accepted by Prometheus' own checker (promtool check metrics).
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/metrics.h"
#include "server/server_metrics.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kPromtool[] = "/usr/bin/promtool";

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

// Runs `promtool <args>` with `text` on stdin; its stdout and stderr come back together.
CommandResult RunPromtool(const std::string& args, const std::string& text) {
  CommandResult result;
  char in_path[] = "/tmp/mmdit_metrics_XXXXXX";
  const int fd = mkstemp(in_path);
  if (fd < 0) return result;
  (void)!write(fd, text.data(), text.size());
  close(fd);
  const std::string command = absl::StrCat(kPromtool, " ", args, " < ", in_path, " 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe != nullptr) {
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
    const int status = pclose(pipe);
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  unlink(in_path);
  return result;
}

CommandResult PromtoolCheckMetrics(const std::string& text) {
  return RunPromtool("check metrics", text);
}

std::string ReadSourceFile(const std::string& relative) {
  std::ifstream in(std::string(MMDIT_SOURCE_DIR) + "/" + relative);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(FormatTest, Values) {
  EXPECT_EQ(FormatMetricValue(0), "0");
  EXPECT_EQ(FormatMetricValue(3), "3");
  EXPECT_EQ(FormatMetricValue(-7), "-7");
  EXPECT_EQ(FormatMetricValue(0.005), "0.005");
  EXPECT_EQ(FormatMetricValue(0.1), "0.1");
  EXPECT_EQ(FormatMetricValue(1e20), "1e+20");
  EXPECT_EQ(FormatMetricValue(1.0 / 0.0), "+Inf");
  EXPECT_EQ(FormatMetricValue(-1.0 / 0.0), "-Inf");
  EXPECT_EQ(FormatMetricValue(0.0 / 0.0), "NaN");
  EXPECT_EQ(std::stod(FormatMetricValue(1.0 / 3.0)), 1.0 / 3.0);
}

TEST(FormatTest, Escaping) {
  EXPECT_EQ(EscapeLabelValue("plain"), "plain");
  EXPECT_EQ(EscapeLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  EXPECT_EQ(EscapeHelp("help \"quoted\" \\ and\nnewline"), "help \"quoted\" \\\\ and\\nnewline");
}

TEST(RegistryTest, CounterGaugeValuesAndFormat) {
  MetricsRegistry registry;
  auto counter = registry.AddCounter("test_events_total", "Events seen.", {"kind"});
  ASSERT_TRUE(counter.ok()) << counter.status();
  auto gauge = registry.AddGauge("test_temperature_celsius", "A temperature.");
  ASSERT_TRUE(gauge.ok()) << gauge.status();

  (*counter)->WithLabels({"b"}).Increment();
  (*counter)->WithLabels({"a"}).Increment(2.5);
  (*counter)->WithLabels({"a"}).Increment(-4);  // ignored: counters never go down
  (*counter)->WithLabels({"quote\"d"}).Increment();
  (*gauge)->WithLabels({}).Set(21.5);
  (*gauge)->WithLabels({}).Add(-1.5);
  EXPECT_EQ((*counter)->WithLabels({"a"}).Value(), 2.5);

  EXPECT_EQ(registry.Exposition(),
            "# HELP test_events_total Events seen.\n"
            "# TYPE test_events_total counter\n"
            "test_events_total{kind=\"a\"} 2.5\n"
            "test_events_total{kind=\"b\"} 1\n"
            "test_events_total{kind=\"quote\\\"d\"} 1\n"
            "# HELP test_temperature_celsius A temperature.\n"
            "# TYPE test_temperature_celsius gauge\n"
            "test_temperature_celsius 20\n");
}

TEST(RegistryTest, HistogramIsCumulativeWithInf) {
  MetricsRegistry registry;
  auto h = registry.AddHistogram("test_latency_seconds", "Latency.", {"model"}, {0.1, 1, 10});
  ASSERT_TRUE(h.ok()) << h.status();
  Histogram& child = (*h)->WithLabels({"m"});
  for (double v : {0.05, 0.1, 0.5, 5.0, 50.0, 50.0}) child.Observe(v);
  child.Observe(0.0 / 0.0);  // ignored

  EXPECT_EQ(registry.Exposition(),
            "# HELP test_latency_seconds Latency.\n"
            "# TYPE test_latency_seconds histogram\n"
            "test_latency_seconds_bucket{model=\"m\",le=\"0.1\"} 2\n"
            "test_latency_seconds_bucket{model=\"m\",le=\"1\"} 3\n"
            "test_latency_seconds_bucket{model=\"m\",le=\"10\"} 4\n"
            "test_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 6\n"
            "test_latency_seconds_sum{model=\"m\"} 105.65\n"
            "test_latency_seconds_count{model=\"m\"} 6\n");
}

TEST(RegistryTest, RejectsBadDefinitions) {
  MetricsRegistry registry;
  EXPECT_EQ(registry.AddCounter("1bad", "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddCounter("bad-name", "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddCounter("ok_total", "x", {"__reserved"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddCounter("ok_total", "x", {"a", "a"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddHistogram("h_seconds", "x", {"le"}, {1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddHistogram("h_seconds", "x", {}, {1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddHistogram("h_seconds", "x", {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(registry.AddCounter("ok_total", "x").ok());
  EXPECT_EQ(registry.AddGauge("ok_total", "x").status().code(),
            absl::StatusCode::kInvalidArgument);

  auto family = registry.AddCounter("two_labels_total", "x", {"a", "b"});
  ASSERT_TRUE(family.ok());
  EXPECT_EQ((*family)->Get({"only one"}).status().code(), absl::StatusCode::kInvalidArgument);
  // The lenient lookup pads instead of failing.
  (*family)->WithLabels({"x"}).Increment();
  EXPECT_THAT(registry.Exposition(), HasSubstr("two_labels_total{a=\"x\",b=\"\"} 1\n"));
}

TEST(RegistryTest, BucketHelpers) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_EQ(LinearBuckets(0, 5, 3), (std::vector<double>{0, 5, 10}));
  EXPECT_TRUE(ExponentialBuckets(0, 2, 4).empty());
}

TEST(RegistryTest, ConcurrentUpdatesAreNotLost) {
  MetricsRegistry registry;
  CounterFamily* counter = *registry.AddCounter("test_ops_total", "Ops.", {"thread"});
  HistogramFamily* h = *registry.AddHistogram("test_op_seconds", "Op time.", {}, {0.5});
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        counter->WithLabels({"shared"}).Increment();
        counter->WithLabels({absl::StrCat(t)}).Increment(0.5);
        h->WithLabels({}).Observe(i % 2 == 0 ? 0.25 : 1.0);
        if (i % 1000 == 0) registry.Exposition();  // scrapes race the updates
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(counter->WithLabels({"shared"}).Value(), kThreads * kPerThread);
  EXPECT_EQ(counter->WithLabels({"0"}).Value(), kPerThread * 0.5);
  const Histogram::Snapshot s = h->WithLabels({}).Collect();
  EXPECT_EQ(s.count, static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(s.cumulative_counts[0], static_cast<uint64_t>(kThreads * kPerThread / 2));
  EXPECT_DOUBLE_EQ(s.sum, kThreads * kPerThread / 2 * 1.25);
}

TEST(ServerMetricsTest, RecordsEveryFamily) {
  auto metrics = ServerMetrics::Create({});
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  ServerMetrics& m = **metrics;
  m.SetModelState("mmdit", ModelLoadState::kLoading);
  m.SetModelState("mmdit", ModelLoadState::kReady);
  m.SetWorkerInService("mmdit", "cpu:0", true);
  m.SetWorkerInService("mmdit", "gpu:0", false);
  for (int i = 0; i < 3; ++i) m.RecordRequest("mmdit", absl::OkStatus(), 0.02, 0.001);
  m.RecordRequest("mmdit", absl::InvalidArgumentError("x: wrong shape"), 0.0001);
  m.RecordRequest("mmdit", absl::DeadlineExceededError("late"), 1.0, 0.9);
  m.RecordRequest("mmdit", absl::DataLossError("odd"), 0.5);
  m.RecordRequest("no-such-model", absl::NotFoundError("unknown model"), 0.0001);
  m.RecordBatch("mmdit", "cpu:0", 2, 0.25);
  m.RecordBatch("mmdit", "cpu:0", 5, 0.5);
  m.RecordBatchRerun("mmdit", "gpu:0");
  m.SetPending("mmdit", 4);

  const std::string text = m.Exposition();
  EXPECT_THAT(text, HasSubstr("mmdit_request_success_total{model=\"mmdit\"} 3\n"));
  EXPECT_THAT(text, HasSubstr(
      "mmdit_request_failure_total{model=\"mmdit\",reason=\"invalid_argument\"} 1\n"));
  EXPECT_THAT(text, HasSubstr(
      "mmdit_request_failure_total{model=\"mmdit\",reason=\"deadline_exceeded\"} 1\n"));
  EXPECT_THAT(text, HasSubstr(
      "mmdit_request_failure_total{model=\"mmdit\",reason=\"internal\"} 1\n"));
  EXPECT_THAT(text, HasSubstr(
      "mmdit_request_failure_total{model=\"mmdit\",reason=\"unavailable\"} 0\n"));
  // Made-up model names fold into one series.
  EXPECT_THAT(text, HasSubstr(
      "mmdit_request_failure_total{model=\"_unknown\",reason=\"not_found\"} 1\n"));
  EXPECT_THAT(text, Not(HasSubstr("no-such-model")));
  EXPECT_THAT(text, HasSubstr("mmdit_inference_count_total{model=\"mmdit\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_inference_exec_count_total{model=\"mmdit\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_request_duration_seconds_count{model=\"mmdit\"} 6\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_queue_duration_seconds_count{model=\"mmdit\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_compute_duration_seconds_sum{model=\"mmdit\"} 0.75\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_batch_size_bucket{model=\"mmdit\",le=\"2\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_batch_size_bucket{model=\"mmdit\",le=\"8\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_batch_size_sum{model=\"mmdit\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_pending_requests{model=\"mmdit\"} 4\n"));
  EXPECT_THAT(text, HasSubstr(
      "mmdit_worker_busy_seconds_total{model=\"mmdit\",worker=\"cpu:0\"} 0.75\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_batch_rerun_total{model=\"mmdit\",worker=\"gpu:0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_worker_in_service{model=\"mmdit\",worker=\"gpu:0\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_worker_in_service{model=\"mmdit\",worker=\"cpu:0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_model_load_state{model=\"mmdit\",state=\"ready\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mmdit_model_load_state{model=\"mmdit\",state=\"loading\"} 0\n"));
}

TEST(ServerMetricsTest, RejectsBadBuckets) {
  ServerMetrics::Options options;
  options.duration_buckets_seconds = {1, 0.5};
  EXPECT_EQ(ServerMetrics::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PromtoolTest, ServerExpositionPassesCheckMetrics) {
  ASSERT_EQ(access(kPromtool, X_OK), 0)
      << kPromtool << " is missing; install Debian's prometheus package (deploy/install-deps.sh)";
  auto metrics = ServerMetrics::Create({});
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  ServerMetrics& m = **metrics;
  m.SetModelState("mmdit", ModelLoadState::kReady);
  m.SetModelState("model \"with\" odd\\name\n", ModelLoadState::kFailed);
  m.SetWorkerInService("mmdit", "cpu:0", true);
  m.RecordRequest("mmdit", absl::OkStatus(), 0.02, 0.001);
  m.RecordRequest("mmdit", absl::UnavailableError("queue full"), 0.0001, 0);
  m.RecordBatch("mmdit", "cpu:0", 8, 0.4);
  m.RecordBatchRerun("mmdit", "gpu:1");
  m.SetPending("mmdit", 1);

  const CommandResult result = PromtoolCheckMetrics(m.Exposition());
  EXPECT_EQ(result.exit_code, 0) << result.output << "\n--- exposition ---\n" << m.Exposition();
  EXPECT_EQ(result.output, "");
}

TEST(PromtoolTest, CatchesABrokenExposition) {
  ASSERT_EQ(access(kPromtool, X_OK), 0) << kPromtool << " is missing";
  // Guards the check above: promtool must actually reject bad input fed this way.
  const CommandResult result =
      PromtoolCheckMetrics("# TYPE broken_total counter\nbroken_total{a=\"x} 1\n");
  EXPECT_NE(result.exit_code, 0) << result.output;
}

// docs/METRICS.md and the README's table list exactly the families the server exports, with
// their types.
TEST(DocsTest, MetricsDocMatchesTheCode) {
  auto metrics = ServerMetrics::Create({});
  ASSERT_TRUE(metrics.ok());
  std::set<std::string> exported;
  std::istringstream text((*metrics)->Exposition());
  for (std::string line; std::getline(text, line);) {
    if (line.rfind("# TYPE ", 0) == 0) exported.insert(line.substr(7));
  }
  for (const char* file : {"docs/METRICS.md", "README.md"}) {
    const std::string doc = ReadSourceFile(file);
    ASSERT_FALSE(doc.empty()) << file << " not found";
    std::set<std::string> documented;
    std::istringstream lines(doc);
    for (std::string line; std::getline(lines, line);) {
      // Table rows: | `name` | type | labels | meaning |
      if (line.rfind("| `mmdit_", 0) != 0) continue;
      const size_t name_end = line.find('`', 3);
      const size_t type_start = line.find("| ", name_end) + 2;
      const size_t type_end = line.find(' ', type_start);
      documented.insert(line.substr(3, name_end - 3) + " " +
                        line.substr(type_start, type_end - type_start));
    }
    EXPECT_EQ(documented, exported) << file;
  }
}

// The Prometheus config of deploy/ is valid, and every query of the Grafana dashboard parses
// (checked as recording rules) and names only metrics the server exports.
TEST(DeployTest, PrometheusConfigAndDashboardQueries) {
  ASSERT_EQ(access(kPromtool, X_OK), 0) << kPromtool << " is missing";
  const std::string config = ReadSourceFile("deploy/prometheus.yml");
  ASSERT_FALSE(config.empty());
  CommandResult r = RunPromtool(
      absl::StrCat("check config ", MMDIT_SOURCE_DIR, "/deploy/prometheus.yml"), "");
  EXPECT_EQ(r.exit_code, 0) << r.output;

  const nlohmann::json dashboard =
      nlohmann::json::parse(ReadSourceFile("deploy/grafana/dashboards/mmdit.json"), nullptr,
                            false);
  ASSERT_FALSE(dashboard.is_discarded()) << "deploy/grafana/dashboards/mmdit.json is not JSON";
  auto metrics = ServerMetrics::Create({});
  ASSERT_TRUE(metrics.ok());
  // One model and worker, so that every family has a series in the exposition.
  (*metrics)->SetModelState("m", ModelLoadState::kReady);
  (*metrics)->SetWorkerInService("m", "cpu:0", true);
  const std::string exposition = (*metrics)->Exposition();
  std::string rules = "groups:\n- name: dashboard\n  rules:\n";
  int count = 0;
  for (const auto& panel : dashboard["panels"]) {
    for (const auto& target : panel["targets"]) {
      std::string expr = target["expr"].get<std::string>();
      for (const auto& [from, to] : {std::pair<std::string, std::string>{"$__rate_interval", "1m"},
                                     {"$model", ".*"}}) {
        for (size_t at; (at = expr.find(from)) != std::string::npos;) {
          expr.replace(at, from.size(), to);
        }
      }
      // Every mmdit_ name in the query is one the server exports.
      for (size_t at = 0; (at = expr.find("mmdit_", at)) != std::string::npos;) {
        size_t end = at;
        while (end < expr.size() && (std::isalnum(expr[end]) || expr[end] == '_')) ++end;
        const std::string name = expr.substr(at, end - at);
        EXPECT_THAT(exposition, HasSubstr("\n" + name)) << panel["title"] << ": " << name;
        at = end;
      }
      absl::StrAppend(&rules, "  - record: dashboard_", ++count, "\n    expr: ",
                      nlohmann::json(expr).dump(), "\n");
    }
  }
  EXPECT_GT(count, 5);
  char path[] = "/tmp/mmdit_rules_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  (void)!write(fd, rules.data(), rules.size());
  close(fd);
  r = RunPromtool(absl::StrCat("check rules ", path), "");
  unlink(path);
  EXPECT_EQ(r.exit_code, 0) << r.output << "\n" << rules;
}

}  // namespace
}  // namespace mmdit
