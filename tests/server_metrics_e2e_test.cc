// Metric values of the real server on loopback equal what the test sent: requests of known batch
// sizes, a bad request and an unknown model, read back from GET /metrics; the live exposition
// passes promtool; the health endpoints answer.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/inference_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/http_get.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

// The value of the sample whose series (name and labels exactly as exposed) is `series`, or NaN.
double SampleValue(const std::string& exposition, const std::string& series) {
  const std::string needle = "\n" + series + " ";
  const size_t at = ("\n" + exposition).find(needle);
  if (at == std::string::npos) return std::nan("");
  const size_t start = at + needle.size() - 1;  // offset into `exposition`
  const size_t end = exposition.find('\n', start);
  double value;
  if (!absl::SimpleAtod(exposition.substr(start, end - start), &value)) return std::nan("");
  return value;
}

InferTensor Floats(const std::string& name, std::vector<int64_t> shape, float fill) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> values(n, fill);
  InferTensor t{name, "FP32", std::move(shape), ""};
  t.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

std::vector<InferTensor> Inputs(int batch, int seq_len, int context_len, int dim) {
  return {Floats("x", {batch, seq_len, dim}, 0.1f), Floats("y", {batch, 1, dim}, -0.2f),
          Floats("context", {batch, context_len, dim}, 0.3f)};
}

class ServerMetricsE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const testing::Fixture fixture = testing::LoadFixture("small");
    dim_ = fixture.config.dim;
    const std::string repo = testing::MakeTempDir("metrics_e2e_repo");
    testing::WriteModelRepository(repo, "mmdit", fixture.config, fixture.weights_path(),
                                  /*max_batch_size=*/8);
    Server::Options options;
    options.model_repository = repo;
    options.address = "127.0.0.1";
    options.grpc_port = 0;
    options.http_port = 0;
    options.cpu_threads = 1;
    auto server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    InferenceClient::Options client_options;
    client_options.address = absl::StrCat("127.0.0.1:", server_->grpc_port());
    auto client = InferenceClient::Create(client_options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    ASSERT_TRUE(client_->WaitForReady(absl::Seconds(30)).ok());
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(10));
  }

  std::string Scrape() {
    const testing::HttpAnswer answer = testing::HttpGet(server_->http_port(), "/metrics");
    EXPECT_EQ(answer.code, 200);
    return answer.body;
  }

  int dim_ = 0;
  std::unique_ptr<Server> server_;
  std::unique_ptr<InferenceClient> client_;
};

TEST_F(ServerMetricsE2eTest, ValuesEqualWhatWasSent) {
  // Before any request: the model's series exist at 0 and it is ready on its CPU worker.
  std::string text = Scrape();
  EXPECT_EQ(SampleValue(text, "mmdit_request_success_total{model=\"mmdit\"}"), 0) << text;
  EXPECT_EQ(SampleValue(text, "mmdit_inference_count_total{model=\"mmdit\"}"), 0);
  EXPECT_EQ(SampleValue(text, "mmdit_model_load_state{model=\"mmdit\",state=\"ready\"}"), 1);
  EXPECT_EQ(SampleValue(text, "mmdit_worker_in_service{model=\"mmdit\",worker=\"cpu:0\"}"), 1);

  // N sequential requests of B samples each.
  constexpr int kRequests = 5;
  constexpr int kBatch = 3;
  for (int i = 0; i < kRequests; ++i) {
    auto outputs = client_->Infer("mmdit", Inputs(kBatch, 4 + i, 2, dim_), TensorEncoding::kRaw,
                                  absl::Seconds(60));
    ASSERT_TRUE(outputs.ok()) << outputs.status();
  }
  // Concurrent single-sample requests, which the batcher may pack together.
  constexpr int kConcurrent = 8;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < kConcurrent; ++i) {
    threads.emplace_back([&, i] {
      if (client_->Infer("mmdit", Inputs(1, 3 + i, 1 + i % 3, dim_), TensorEncoding::kTyped,
                         absl::Seconds(60))
              .ok()) {
        ++ok;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(ok.load(), kConcurrent);
  // A bad request (D of context wrong) and an unknown model.
  std::vector<InferTensor> bad = Inputs(1, 2, 1, dim_);
  bad[2] = Floats("context", {1, 1, dim_ + 1}, 0);
  EXPECT_EQ(client_->Infer("mmdit", bad, TensorEncoding::kRaw, absl::Seconds(30)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->Infer("nope", bad, TensorEncoding::kRaw, absl::Seconds(30)).status().code(),
            absl::StatusCode::kNotFound);

  text = Scrape();
  const int successes = kRequests + kConcurrent;
  const int samples = kRequests * kBatch + kConcurrent;
  EXPECT_EQ(SampleValue(text, "mmdit_request_success_total{model=\"mmdit\"}"), successes) << text;
  EXPECT_EQ(SampleValue(text, "mmdit_inference_count_total{model=\"mmdit\"}"), samples);
  EXPECT_EQ(SampleValue(text, "mmdit_request_failure_total{model=\"mmdit\",reason=\"invalid_argument\"}"), 1);
  EXPECT_EQ(SampleValue(text, "mmdit_request_failure_total{model=\"mmdit\",reason=\"unavailable\"}"), 0);
  EXPECT_EQ(SampleValue(text, "mmdit_request_failure_total{model=\"_unknown\",reason=\"not_found\"}"), 1);
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("model=\"nope\"")));

  const double executions = SampleValue(text, "mmdit_inference_exec_count_total{model=\"mmdit\"}");
  EXPECT_GE(executions, kRequests + 1);  // the sequential ones ran alone
  EXPECT_LE(executions, successes);
  EXPECT_EQ(SampleValue(text, "mmdit_batch_size_count{model=\"mmdit\"}"), executions);
  EXPECT_EQ(SampleValue(text, "mmdit_batch_size_sum{model=\"mmdit\"}"), samples);
  EXPECT_EQ(SampleValue(text, "mmdit_batch_size_bucket{model=\"mmdit\",le=\"+Inf\"}"), executions);
  EXPECT_EQ(SampleValue(text, "mmdit_compute_duration_seconds_count{model=\"mmdit\"}"),
            executions);
  // Every request to the model that reached it, the bad one included, has a duration.
  EXPECT_EQ(SampleValue(text, "mmdit_request_duration_seconds_count{model=\"mmdit\"}"),
            successes + 1);
  EXPECT_EQ(SampleValue(text, "mmdit_queue_duration_seconds_count{model=\"mmdit\"}"), successes);
  EXPECT_GT(SampleValue(text, "mmdit_worker_busy_seconds_total{model=\"mmdit\",worker=\"cpu:0\"}"),
            0);
  EXPECT_EQ(SampleValue(text, "mmdit_pending_requests{model=\"mmdit\"}"), 0);
  EXPECT_EQ(SampleValue(text, "mmdit_batch_rerun_total{model=\"mmdit\",worker=\"cpu:0\"}"), 0);
}

TEST_F(ServerMetricsE2eTest, LiveExpositionPassesPromtool) {
  ASSERT_TRUE(client_->Infer("mmdit", Inputs(2, 3, 2, dim_), TensorEncoding::kRaw,
                             absl::Seconds(60)).ok());
  const std::string text = Scrape();
  char path[] = "/tmp/mmdit_live_metrics_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  ASSERT_EQ(access("/usr/bin/promtool", X_OK), 0) << "/usr/bin/promtool is missing";
  FILE* pipe = popen(absl::StrCat("/usr/bin/promtool check metrics < ", path, " 2>&1").c_str(),
                     "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  const int status = pclose(pipe);
  unlink(path);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output;
  EXPECT_EQ(output, "");
}

TEST_F(ServerMetricsE2eTest, HealthEndpoints) {
  EXPECT_EQ(testing::HttpGet(server_->http_port(), "/v2/health/live").code, 200);
  EXPECT_EQ(testing::HttpGet(server_->http_port(), "/v2/health/ready").code, 200);
  EXPECT_EQ(testing::HttpGet(server_->http_port(), "/v2/nothing").code, 404);
}

}  // namespace
}  // namespace mmdit
