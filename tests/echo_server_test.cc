// mmdit-echo-server as a child process on 127.0.0.1 with port 0: it becomes ready, answers
// ModelInfer (raw and typed contents) with x_out and context_out carrying exactly the request's
// x and context bytes and shapes, describes the tensors, and exits 0 on SIGTERM.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/inference_client.h"
#include "gtest/gtest.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

std::string EchoBinary() { return std::string(MMDIT_BINARY_DIR) + "/client/mmdit-echo-server"; }

InferTensor RandomTensor(const std::string& name, std::vector<int64_t> shape, uint32_t seed) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = dist(rng);
  InferTensor t{name, "FP32", std::move(shape), ""};
  t.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

const InferTensor* Find(const std::vector<InferTensor>& tensors, const std::string& name) {
  for (const InferTensor& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

TEST(EchoServerTest, EchoesTheRequestBytesAndStopsOnSigterm) {
  const std::string dir = testing::MakeTempDir("echo_server_test");
  const std::string port_file = dir + "/ports";
  testing::ChildProcess server(
      EchoBinary(), {"--host=127.0.0.1", "--grpc_port=0", "--port_file=" + port_file},
      dir + "/echo.log");
  const int port = server.WaitForPort(port_file, "grpc_port", absl::Seconds(30));
  ASSERT_GT(port, 0) << "no port file; log:\n" << server.log();

  InferenceClient::Options options;
  options.address = absl::StrCat("127.0.0.1:", port);
  auto client = InferenceClient::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->WaitForReady(absl::Seconds(30)).ok()) << server.log();

  // The target shape of PERF.md's overhead goal (B=2 to check the shape travels as sent).
  const std::vector<InferTensor> inputs = {RandomTensor("x", {2, 186, 128}, 1),
                                           RandomTensor("y", {2, 1, 128}, 2),
                                           RandomTensor("context", {2, 64, 128}, 3)};
  for (TensorEncoding encoding : {TensorEncoding::kRaw, TensorEncoding::kTyped}) {
    SCOPED_TRACE(encoding == TensorEncoding::kRaw ? "raw" : "typed");
    auto outputs = (*client)->Infer("mmdit", inputs, encoding, absl::Seconds(30));
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    ASSERT_EQ(outputs->size(), 2u);
    EXPECT_EQ((*outputs)[0].name, "x_out");
    EXPECT_EQ((*outputs)[1].name, "context_out");
    for (const auto& [out_name, in_name] :
         std::vector<std::pair<std::string, std::string>>{{"x_out", "x"},
                                                          {"context_out", "context"}}) {
      const InferTensor* out = Find(*outputs, out_name);
      const InferTensor* in = Find(inputs, in_name);
      ASSERT_NE(out, nullptr) << out_name;
      EXPECT_EQ(out->datatype, "FP32");
      EXPECT_EQ(out->shape, in->shape) << out_name;
      ASSERT_EQ(out->data.size(), in->data.size()) << out_name;
      EXPECT_EQ(std::memcmp(out->data.data(), in->data.data(), in->data.size()), 0) << out_name;
    }
  }

  // A request without context is refused, and the server stays up.
  auto missing = (*client)->Infer("mmdit", {inputs[0], inputs[1]}, TensorEncoding::kRaw,
                                  absl::Seconds(30));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);

  auto metadata = (*client)->ModelMetadata("mmdit", absl::Seconds(30));
  ASSERT_TRUE(metadata.ok()) << metadata.status();
  ASSERT_EQ(metadata->outputs_size(), 2);
  EXPECT_EQ(metadata->outputs(0).name(), "x_out");
  EXPECT_EQ(metadata->outputs(1).name(), "context_out");

  // A client that hung up; the server exits within its one-second grace either way.
  client->reset();
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(absl::Seconds(30)), 0) << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "stopped")) << server.log();
}

TEST(EchoServerTest, RejectsABadPort) {
  const std::string dir = testing::MakeTempDir("echo_server_bad_port");
  testing::ChildProcess server(EchoBinary(), {"--grpc_port=70000"}, dir + "/echo.log");
  EXPECT_EQ(server.Wait(absl::Seconds(30)), 2) << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "--grpc_port")) << server.log();
}

}  // namespace
}  // namespace mmdit
