// The real mmdit-server binary: started on 127.0.0.1 with port 0 and a temporary model
// repository, it answers a fixture through gRPC, and on SIGTERM refuses new work, finishes what
// is queued and exits 0. A bad repository fails at start-up with a message and a non-zero exit.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc_service.grpc.pb.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

std::string ServerBinary() { return std::string(MMDIT_BINARY_DIR) + "/server/mmdit-server"; }

// GET `path` from 127.0.0.1:`port`; the whole answer (status line, headers, body), or "".
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string req =
        "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (send(fd, req.data(), req.size(), 0) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, n);
    }
  }
  close(fd);
  return out;
}

inference::ModelInferRequest FixtureRequest(const testing::Fixture& f) {
  inference::ModelInferRequest req;
  req.set_model_name(f.name);
  auto add = [&](const char* name, const char* type, std::vector<int64_t> shape,
                 std::string bytes) {
    auto* t = req.add_inputs();
    t->set_name(name);
    t->set_datatype(type);
    for (int64_t d : shape) t->add_shape(d);
    req.add_raw_input_contents(std::move(bytes));
  };
  auto bytes = [](const auto& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(v[0]));
  };
  const int64_t B = f.batch, L = f.seq_len, C = f.context_len, D = f.config.dim;
  add("x", "FP32", {B, L, D}, bytes(f.x));
  add("y", "FP32", {B, 1, D}, bytes(f.y));
  add("context", "FP32", {B, C, D}, bytes(f.context));
  if (!f.attn_mask.empty()) add("attn_mask", "BOOL", {B, L, L}, bytes(f.attn_mask));
  add("start_pos", "INT64", {B}, bytes(f.start_pos));
  return req;
}

std::vector<float> RawFloats(const std::string& bytes) {
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

TEST(ServerBinaryTest, ServesAFixtureThenDrainsOnSigtermAndExitsZero) {
  const testing::Fixture f = testing::LoadFixture("small");
  const std::string dir = testing::MakeTempDir("server_binary");
  const std::string repo = dir + "/models";
  // A long queue delay keeps the requests queued when SIGTERM arrives, so the drain has work.
  testing::WriteModelRepository(repo, f.name, f.config, f.weights_path(), /*max_batch_size=*/8,
                                /*version=*/1,
                                "dynamic_batching { max_queue_delay_microseconds: 1500000 }\n"
                                "instance_group [{ kind: KIND_CPU count: 1 }]\n");
  const std::string port_file = dir + "/ports";
  testing::ChildProcess server(ServerBinary(),
                               {"--model_repository=" + repo, "--host=127.0.0.1",
                                "--grpc_port=0", "--http_port=0", "--port_file=" + port_file,
                                "--cpu_threads=1", "--exit_timeout_secs=30"},
                               dir + "/server.log");
  const int port = server.WaitForPort(port_file, "grpc_port");
  ASSERT_GT(port, 0) << server.log();
  const int http_port = server.WaitForPort(port_file, "http_port");
  ASSERT_GT(http_port, 0) << server.log();
  EXPECT_TRUE(absl::StartsWith(HttpGet(http_port, "/v2/health/ready"), "HTTP/1.1 200"));
  EXPECT_TRUE(absl::StartsWith(HttpGet(http_port, "/v2/health/live"), "HTTP/1.1 200"));
  EXPECT_TRUE(absl::StrContains(HttpGet(http_port, "/metrics"),
                                "mmdit_model_load_state{model=\"small\",state=\"ready\"} 1"));
  EXPECT_TRUE(absl::StrContains(server.log(),
                                absl::StrCat("grpc listening on 127.0.0.1:", port)))
      << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "http listening on 127.0.0.1:")) << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "loaded model 'small'")) << server.log();

  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                     grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);
  const inference::ModelInferRequest req = FixtureRequest(f);

  constexpr int kInFlight = 3;
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kInFlight; ++i) {
    clients.emplace_back([&] {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
      inference::ModelInferResponse resp;
      grpc::Status s = stub->ModelInfer(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      ASSERT_EQ(resp.raw_output_contents_size(), 2);
      EXPECT_LE(testing::RelativeError(RawFloats(resp.raw_output_contents(0)), f.x_out_f64), 1e-5);
      EXPECT_LE(testing::RelativeError(RawFloats(resp.raw_output_contents(1)), f.context_out_f64),
                1e-5);
      ++ok;
    });
  }
  absl::SleepFor(absl::Milliseconds(300));  // the requests reach the queue and wait there
  server.Signal(SIGTERM);

  // Once the server reports not ready, new requests are refused.
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (absl::Now() < give_up) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    inference::ServerReadyResponse ready;
    grpc::Status s = stub->ServerReady(&ctx, {}, &ready);
    if (!s.ok() || !ready.ready()) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    inference::ModelInferResponse resp;
    EXPECT_EQ(stub->ModelInfer(&ctx, req, &resp).error_code(), grpc::UNAVAILABLE);
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(ok.load(), kInFlight);
  EXPECT_EQ(server.Wait(absl::Seconds(40)), 0) << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "SIGTERM: draining")) << server.log();
}

TEST(ServerBinaryTest, BadRepositoryFailsAtStartUpWithAMessage) {
  const std::string dir = testing::MakeTempDir("server_binary_bad");
  const std::string repo = dir + "/models";
  const testing::Fixture f = testing::LoadFixture("small");
  MmditConfig wrong = f.config;
  wrong.dim_feedforward = f.config.dim_feedforward * 2;  // disagrees with the weights
  testing::WriteModelRepository(repo, "broken", wrong, f.weights_path());
  testing::ChildProcess server(
      ServerBinary(),
      {"--model_repository=" + repo, "--host=127.0.0.1", "--grpc_port=0", "--http_port=0"},
      dir + "/server.log");
  const int code = server.Wait(absl::Seconds(60));
  EXPECT_NE(code, 0);
  EXPECT_NE(code, -1) << "still running or killed by a signal: " << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "model.safetensors")) << server.log();
}

}  // namespace
}  // namespace mmdit
