// A real Prometheus (Debian's /usr/bin/prometheus) scrapes our /metrics over loopback every
// second, and its query API answers with the values the test recorded.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "client/inference_client.h"
#include "server/http_server.h"
#include "server/server.h"
#include "server/server_metrics.h"
#include "tests/http_get.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

constexpr char kPrometheus[] = "/usr/bin/prometheus";

// A Prometheus process with its own config and storage in a temporary folder; stopped (SIGTERM,
// then SIGKILL after a bound) and cleaned up on destruction.
class PrometheusProcess {
 public:
  ~PrometheusProcess() { Stop(); }

  // Starts Prometheus on 127.0.0.1:`web_port`, scraping 127.0.0.1:`target_port` every second.
  bool Start(int web_port, int target_port) {
    char dir_template[] = "/tmp/mmdit_prometheus_XXXXXX";
    if (mkdtemp(dir_template) == nullptr) return false;
    dir_ = dir_template;
    web_port_ = web_port;
    {
      std::ofstream config(dir_ + "/prometheus.yml");
      config << "global:\n"
                "  scrape_interval: 1s\n"
                "  evaluation_interval: 1s\n"
                "scrape_configs:\n"
                "  - job_name: mmdit\n"
                "    scrape_interval: 1s\n"
                "    scrape_timeout: 1s\n"
                "    static_configs:\n"
                "      - targets: ['127.0.0.1:"
             << target_port << "']\n";
    }
    const std::string config_flag = absl::StrCat("--config.file=", dir_, "/prometheus.yml");
    const std::string storage_flag = absl::StrCat("--storage.tsdb.path=", dir_, "/data");
    const std::string listen_flag = absl::StrCat("--web.listen-address=127.0.0.1:", web_port);
    const std::string log_path = dir_ + "/prometheus.log";
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::fopen(log_path.c_str(), "w");
      if (log != nullptr) {
        dup2(fileno(log), 1);
        dup2(fileno(log), 2);
      }
      execl(kPrometheus, kPrometheus, config_flag.c_str(), storage_flag.c_str(),
            listen_flag.c_str(), "--log.level=warn", static_cast<char*>(nullptr));
      _exit(127);
    }
    return pid_ > 0;
  }

  // Whether the process is still running (reaps it if not).
  bool Running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

  void Stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      const absl::Time deadline = absl::Now() + absl::Seconds(10);
      int status = 0;
      while (waitpid(pid_, &status, WNOHANG) == 0) {
        if (absl::Now() > deadline) {
          kill(pid_, SIGKILL);
          waitpid(pid_, &status, 0);
          break;
        }
        absl::SleepFor(absl::Milliseconds(50));
      }
      pid_ = -1;
    }
    if (!dir_.empty()) {
      const std::string command = absl::StrCat("rm -rf '", dir_, "'");
      (void)!std::system(command.c_str());
      dir_.clear();
    }
  }

  std::string Log() const {
    std::ifstream in(dir_ + "/prometheus.log");
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  // The value of an instant query with one result, or "" when there is none yet.
  std::string QueryValue(const std::string& promql) const {
    const testing::HttpAnswer answer = testing::HttpGet(
        web_port_, "/api/v1/query?query=" + testing::UrlEncode(promql), absl::Seconds(5));
    if (answer.code != 200) return "";
    const nlohmann::json json = nlohmann::json::parse(answer.body, nullptr, false);
    if (json.is_discarded() || json.value("status", "") != "success") return "";
    const auto& result = json["data"]["result"];
    if (!result.is_array() || result.size() != 1) return "";
    return result[0]["value"][1].get<std::string>();
  }

 private:
  pid_t pid_ = -1;
  std::string dir_;
  int web_port_ = 0;
};

TEST(PrometheusScrapeTest, QueryReturnsRecordedValues) {
  ASSERT_EQ(access(kPrometheus, X_OK), 0)
      << kPrometheus << " is missing; install Debian's prometheus package (deploy/install-deps.sh)";

  auto metrics = ServerMetrics::Create({});
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  ServerMetrics& m = **metrics;
  m.SetModelState("mmdit", ModelLoadState::kReady);
  for (int i = 0; i < 7; ++i) m.RecordRequest("mmdit", absl::OkStatus(), 0.01, 0.001);
  m.RecordRequest("mmdit", absl::InvalidArgumentError("bad x"), 0.001);
  m.RecordBatch("mmdit", "cpu:0", 5, 0.2);
  m.RecordBatch("mmdit", "cpu:0", 2, 0.1);

  HttpServer::Options options;
  options.address = "127.0.0.1";
  options.port = 0;
  options.metrics = [&m] { return m.Exposition(); };
  auto http = HttpServer::Create(options);
  ASSERT_TRUE(http.ok()) << http.status();
  ASSERT_TRUE((*http)->Start().ok());

  PrometheusProcess prometheus;
  const int web_port = testing::FreeLoopbackPort();
  ASSERT_GT(web_port, 0);
  ASSERT_TRUE(prometheus.Start(web_port, (*http)->port()));

  // Start-up, the first scrape and the query take a few seconds; 60 s bounds a slow machine.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  std::string success, samples, failures, up;
  while (absl::Now() < deadline && prometheus.Running()) {
    up = prometheus.QueryValue("up{job=\"mmdit\"}");
    success = prometheus.QueryValue("mmdit_request_success_total{model=\"mmdit\"}");
    samples = prometheus.QueryValue("mmdit_inference_count_total{model=\"mmdit\"}");
    failures = prometheus.QueryValue(
        "mmdit_request_failure_total{model=\"mmdit\",reason=\"invalid_argument\"}");
    if (success == "7" && samples == "7" && failures == "1" && up == "1") break;
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(up, "1") << prometheus.Log();
  EXPECT_EQ(success, "7") << prometheus.Log();
  EXPECT_EQ(samples, "7");
  EXPECT_EQ(failures, "1");
  // A histogram arrives as histogram series that PromQL can aggregate.
  EXPECT_EQ(prometheus.QueryValue(
                "sum(mmdit_batch_size_bucket{model=\"mmdit\",le=\"+Inf\"})"),
            "2");

  prometheus.Stop();
  (*http)->Shutdown();
}

TEST(PrometheusScrapeTest, ScrapesTheRealServer) {
  ASSERT_EQ(access(kPrometheus, X_OK), 0) << kPrometheus << " is missing";
  const testing::Fixture fixture = testing::LoadFixture("small");
  const std::string repo = testing::MakeTempDir("prometheus_scrape_repo");
  testing::WriteModelRepository(repo, "mmdit", fixture.config, fixture.weights_path(), 8);
  Server::Options options;
  options.model_repository = repo;
  options.address = "127.0.0.1";
  options.grpc_port = 0;
  options.http_port = 0;
  options.cpu_threads = 1;
  auto server = Server::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());

  InferenceClient::Options client_options;
  client_options.address = absl::StrCat("127.0.0.1:", (*server)->grpc_port());
  auto client = InferenceClient::Create(client_options);
  ASSERT_TRUE(client.ok());
  const int D = fixture.config.dim;
  auto floats = [](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    InferTensor t{name, "FP32", std::move(shape), std::string(n * sizeof(float), '\0')};
    return t;
  };
  const std::vector<InferTensor> inputs = {floats("x", {2, 3, D}), floats("y", {2, 1, D}),
                                           floats("context", {2, 2, D})};
  for (int i = 0; i < 3; ++i) {
    auto outputs = (*client)->Infer("mmdit", inputs, TensorEncoding::kRaw, absl::Seconds(60));
    ASSERT_TRUE(outputs.ok()) << outputs.status();
  }

  PrometheusProcess prometheus;
  const int web_port = testing::FreeLoopbackPort();
  ASSERT_GT(web_port, 0);
  ASSERT_TRUE(prometheus.Start(web_port, (*server)->http_port()));
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  std::string samples, ready;
  while (absl::Now() < deadline && prometheus.Running()) {
    samples = prometheus.QueryValue("mmdit_inference_count_total{model=\"mmdit\"}");
    ready = prometheus.QueryValue("mmdit_model_load_state{model=\"mmdit\",state=\"ready\"}");
    if (samples == "6" && ready == "1") break;
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(samples, "6") << prometheus.Log();
  EXPECT_EQ(ready, "1");
  prometheus.Stop();
  (*server)->Shutdown(absl::Seconds(10));
}

}  // namespace
}  // namespace mmdit
