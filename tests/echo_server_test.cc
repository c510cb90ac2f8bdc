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
#include "tests/test_util.h"

namespace mmdit {
namespace {

std::string EchoBinary() { return std::string(MMDIT_BINARY_DIR) + "/client/mmdit-echo-server"; }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The echo server as a child process, stdout and stderr in a log file; killed if still running.
class EchoProcess {
 public:
  EchoProcess(std::vector<std::string> args, const std::string& log_path) : log_(log_path) {
    args.insert(args.begin(), EchoBinary());
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~EchoProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // The exit code once the process ended within `timeout`; -1 otherwise (or on a signal).
  int Wait(absl::Duration timeout) {
    const absl::Time give_up = absl::Now() + timeout;
    while (absl::Now() < give_up) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return -1;
  }
  bool running() {
    if (exited_) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) exited_ = true;
    return !exited_;
  }
  void Signal(int sig) { kill(pid_, sig); }
  std::string log() const { return ReadFile(log_); }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::string log_;
};

// Waits (bounded) for the port file's grpc_port line; 0 if it never came.
int WaitForPort(EchoProcess& server, const std::string& port_file) {
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (absl::Now() < give_up && server.running()) {
    for (absl::string_view line : absl::StrSplit(ReadFile(port_file), '\n')) {
      int port = 0;
      if (absl::ConsumePrefix(&line, "grpc_port=") && absl::SimpleAtoi(line, &port)) return port;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return 0;
}

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
  EchoProcess server({"--host=127.0.0.1", "--grpc_port=0", "--port_file=" + port_file},
                     dir + "/echo.log");
  const int port = WaitForPort(server, port_file);
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
  EchoProcess server({"--grpc_port=70000"}, dir + "/echo.log");
  EXPECT_EQ(server.Wait(absl::Seconds(30)), 2) << server.log();
  EXPECT_TRUE(absl::StrContains(server.log(), "--grpc_port")) << server.log();
}

}  // namespace
}  // namespace mmdit
