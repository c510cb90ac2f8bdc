// The client library (request building and answer decoding), and the client, mmdit-client and
// the load generator against the real server on loopback, serving the shared "small" fixture.
#include "client/inference_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/load_generator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/http_get.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

InferTensor Floats(const std::string& name, std::vector<int64_t> shape,
                   const std::vector<float>& values) {
  InferTensor t{name, "FP32", std::move(shape), ""};
  t.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

std::vector<float> AsFloats(const InferTensor& t) {
  std::vector<float> v(t.data.size() / sizeof(float));
  std::memcpy(v.data(), t.data.data(), v.size() * sizeof(float));
  return v;
}

TEST(InferRequestTest, RawCarriesBytesInInputOrder) {
  InferTensor mask{"attn_mask", "BOOL", {1, 2, 2}, std::string("\x01\x00\x01\x01", 4)};
  InferTensor pos{"start_pos", "INT64", {1}, std::string(8, '\0')};
  const std::vector<InferTensor> inputs = {Floats("x", {1, 2, 1}, {1.5f, -2}), mask, pos};
  auto request = BuildInferRequest("mmdit", inputs, TensorEncoding::kRaw, absl::Milliseconds(3));
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->model_name(), "mmdit");
  ASSERT_EQ(request->inputs_size(), 3);
  ASSERT_EQ(request->raw_input_contents_size(), 3);
  EXPECT_EQ(request->inputs(0).name(), "x");
  EXPECT_EQ(request->inputs(0).datatype(), "FP32");
  EXPECT_THAT(request->inputs(0).shape(), ElementsAre(1, 2, 1));
  EXPECT_FALSE(request->inputs(0).has_contents());
  EXPECT_EQ(request->raw_input_contents(0), inputs[0].data);
  EXPECT_EQ(request->raw_input_contents(1), mask.data);
  EXPECT_EQ(request->parameters().at("timeout").int64_param(), 3000);
}

TEST(InferRequestTest, TypedFillsContentFields) {
  std::string pos_bytes(16, '\0');
  const int64_t pos[2] = {7, -1};
  std::memcpy(pos_bytes.data(), pos, sizeof(pos));
  const std::vector<InferTensor> inputs = {
      Floats("x", {2}, {0.25f, 3}),
      InferTensor{"attn_mask", "BOOL", {2}, std::string("\x00\x01", 2)},
      InferTensor{"start_pos", "INT64", {2}, pos_bytes}};
  auto request = BuildInferRequest("m", inputs, TensorEncoding::kTyped);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->raw_input_contents_size(), 0);
  EXPECT_THAT(request->inputs(0).contents().fp32_contents(), ElementsAre(0.25f, 3.0f));
  EXPECT_THAT(request->inputs(1).contents().bool_contents(), ElementsAre(false, true));
  EXPECT_THAT(request->inputs(2).contents().int64_contents(), ElementsAre(7, -1));
  EXPECT_EQ(request->parameters().count("timeout"), 0u);
}

TEST(InferRequestTest, Rejections) {
  // BF16 has no typed field in the protocol.
  const std::vector<InferTensor> bf16 = {InferTensor{"x", "BF16", {2}, std::string(4, '\0')}};
  EXPECT_TRUE(BuildInferRequest("m", bf16, TensorEncoding::kRaw).ok());
  auto typed = BuildInferRequest("m", bf16, TensorEncoding::kTyped);
  EXPECT_EQ(typed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(typed.status().message()), HasSubstr("raw"));
  // Byte size not matching the shape.
  const std::vector<InferTensor> short_data = {InferTensor{"x", "FP32", {3}, std::string(8, 0)}};
  auto bad = BuildInferRequest("m", short_data, TensorEncoding::kRaw);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("needs 12 bytes; has 8"));
  const std::vector<InferTensor> unknown = {InferTensor{"x", "FP8", {1}, "x"}};
  EXPECT_FALSE(BuildInferRequest("m", unknown, TensorEncoding::kRaw).ok());
  const std::vector<InferTensor> negative = {InferTensor{"x", "FP32", {-1}, ""}};
  EXPECT_FALSE(BuildInferRequest("m", negative, TensorEncoding::kRaw).ok());
}

TEST(InferResponseTest, DecodesRawAndTyped) {
  inference::ModelInferResponse raw;
  auto* o = raw.add_outputs();
  o->set_name("x_out");
  o->set_datatype("FP32");
  o->add_shape(2);
  const float values[2] = {1, -1};
  raw.add_raw_output_contents(std::string(reinterpret_cast<const char*>(values), 8));
  auto decoded = DecodeInferResponse(raw);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->size(), 1u);
  EXPECT_EQ(AsFloats((*decoded)[0]), (std::vector<float>{1, -1}));

  inference::ModelInferResponse typed;
  auto* t = typed.add_outputs();
  t->set_name("x_out");
  t->set_datatype("FP32");
  t->add_shape(2);
  t->mutable_contents()->add_fp32_contents(4);
  t->mutable_contents()->add_fp32_contents(5);
  decoded = DecodeInferResponse(typed);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(AsFloats((*decoded)[0]), (std::vector<float>{4, 5}));

  // A shape that disagrees with the data, and raw entries that do not match the outputs.
  t->add_shape(3);
  EXPECT_EQ(DecodeInferResponse(typed).status().code(), absl::StatusCode::kInvalidArgument);
  raw.add_raw_output_contents("extra");
  EXPECT_EQ(DecodeInferResponse(raw).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsInputsTest, PicksModelInputsInOrder) {
  SafetensorsWriter writer;
  const float v[4] = {1, 2, 3, 4};
  auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v), sizeof(v));
  writer.Add("context", DType::kF32, {1, 1, 4}, bytes);
  writer.Add("y", DType::kF32, {1, 4}, bytes);
  writer.Add("x", DType::kBF16, {1, 2, 4}, bytes);
  writer.Add("x_out", DType::kF32, {1, 1, 4}, bytes);
  auto file = SafetensorsFile::Parse(writer.Serialize(), "test");
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<std::string> skipped;
  auto inputs = InputsFromSafetensors(*file, &skipped);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  ASSERT_EQ(inputs->size(), 3u);
  EXPECT_EQ((*inputs)[0].name, "x");
  EXPECT_EQ((*inputs)[0].datatype, "BF16");
  EXPECT_EQ((*inputs)[1].name, "y");
  EXPECT_EQ((*inputs)[2].name, "context");
  EXPECT_THAT(skipped, ElementsAre("x_out"));

  SafetensorsWriter no_x;
  no_x.Add("y", DType::kF32, {1, 4}, bytes);
  auto partial = SafetensorsFile::Parse(no_x.Serialize(), "partial");
  ASSERT_TRUE(partial.ok());
  auto missing = InputsFromSafetensors(*partial, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("\"x\""));
}

// ---- against the real server ----

class ClientServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    fixture_ = new testing::Fixture(testing::LoadFixture("small"));
    const std::string repo = testing::MakeTempDir("client_test_repo");
    testing::WriteModelRepository(repo, "mmdit", fixture_->config, fixture_->weights_path(),
                                  /*max_batch_size=*/8);
    Server::Options options;
    options.model_repository = repo;
    options.address = "127.0.0.1";
    options.grpc_port = 0;
    options.http_port = 0;
    options.cpu_threads = 1;
    auto server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    ASSERT_TRUE(server_->Start().ok());
    address_ = absl::StrCat("127.0.0.1:", server_->grpc_port());
  }
  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(10));
    delete server_;
    server_ = nullptr;
    delete fixture_;
    fixture_ = nullptr;
  }

  static std::unique_ptr<InferenceClient> NewClient() {
    InferenceClient::Options options;
    options.address = address_;
    auto client = InferenceClient::Create(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  void ExpectFixtureOutputs(const std::vector<float>& x_out,
                            const std::vector<float>& context_out) {
    EXPECT_LE(testing::RelativeError(x_out, fixture_->x_out_f64), 1e-5);
    EXPECT_LE(testing::RelativeError(context_out, fixture_->context_out_f64), 1e-5);
  }

  static testing::Fixture* fixture_;
  static Server* server_;
  static std::string address_;
};

testing::Fixture* ClientServerTest::fixture_ = nullptr;
Server* ClientServerTest::server_ = nullptr;
std::string ClientServerTest::address_;

TEST_F(ClientServerTest, InferRawAndTypedMatchTheFixture) {
  auto client = NewClient();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->WaitForReady(absl::Seconds(30)).ok());
  auto file = SafetensorsFile::Read(fixture_->io_path());
  ASSERT_TRUE(file.ok()) << file.status();
  auto inputs = InputsFromSafetensors(*file, nullptr);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  ASSERT_EQ(inputs->size(), 5u);  // the fixture has a mask and start_pos
  for (TensorEncoding encoding : {TensorEncoding::kRaw, TensorEncoding::kTyped}) {
    auto outputs = client->Infer("mmdit", *inputs, encoding, absl::Seconds(60));
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    ASSERT_EQ(outputs->size(), 2u);
    const InferTensor* x_out = nullptr;
    const InferTensor* context_out = nullptr;
    for (const InferTensor& t : *outputs) {
      if (t.name == "x_out") x_out = &t;
      if (t.name == "context_out") context_out = &t;
    }
    ASSERT_NE(x_out, nullptr);
    ASSERT_NE(context_out, nullptr);
    EXPECT_EQ(x_out->datatype, "FP32");
    EXPECT_EQ(x_out->shape, (std::vector<int64_t>{fixture_->batch, fixture_->seq_len,
                                                  fixture_->config.dim}));
    ExpectFixtureOutputs(AsFloats(*x_out), AsFloats(*context_out));
  }
}

TEST_F(ClientServerTest, ErrorsComeBackAsStatuses) {
  auto client = NewClient();
  ASSERT_NE(client, nullptr);
  const int D = fixture_->config.dim;
  const std::vector<InferTensor> inputs = {
      Floats("x", {1, 2, D}, std::vector<float>(2 * D, 0.1f)),
      Floats("y", {1, 1, D}, std::vector<float>(D, 0.1f)),
      Floats("context", {1, 1, D + 1}, std::vector<float>(D + 1, 0.1f))};  // wrong D
  auto bad = client->Infer("mmdit", inputs, TensorEncoding::kRaw, absl::Seconds(30));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  auto unknown = client->Infer("no_such_model", inputs, TensorEncoding::kRaw, absl::Seconds(30));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
}

TEST_F(ClientServerTest, UnreachableServerFailsWithinTheDeadline) {
  InferenceClient::Options options;
  options.address = absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort());
  auto client = InferenceClient::Create(options);
  ASSERT_TRUE(client.ok());
  const std::vector<InferTensor> inputs = {Floats("x", {1}, {0})};
  const absl::Time start = absl::Now();
  auto result = (*client)->Infer("mmdit", inputs, TensorEncoding::kRaw, absl::Milliseconds(500));
  EXPECT_FALSE(result.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

const std::string& ClientBinary() {
  static const std::string* path = new std::string(MMDIT_BINARY_DIR "/client/mmdit-client");
  return *path;
}

TEST_F(ClientServerTest, MmditClientWritesTheFixtureOutputs) {
  const std::string dir = testing::MakeTempDir("client_test_out");
  for (const char* typed : {"", " --typed"}) {
    const std::string out = dir + (typed[0] ? "/typed.safetensors" : "/raw.safetensors");
    const CommandResult r = RunCommand(absl::StrCat(
        ClientBinary(), " --server=", address_, " --model=mmdit --inputs=",
        fixture_->io_path(), " --outputs=", out, " --timeout_ms=60000", typed));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_THAT(r.output, HasSubstr("round trip: "));
    EXPECT_THAT(r.output, HasSubstr("ignoring tensors"));  // the fixture's reference outputs
    auto file = SafetensorsFile::Read(out);
    ASSERT_TRUE(file.ok()) << file.status();
    const std::vector<int64_t> x_shape = {fixture_->batch, fixture_->seq_len,
                                          fixture_->config.dim};
    const std::vector<int64_t> c_shape = {fixture_->batch, fixture_->context_len,
                                          fixture_->config.dim};
    auto x_out = file->GetFloat("x_out", x_shape);
    auto context_out = file->GetFloat("context_out", c_shape);
    ASSERT_TRUE(x_out.ok()) << x_out.status();
    ASSERT_TRUE(context_out.ok()) << context_out.status();
    ExpectFixtureOutputs(*x_out, *context_out);
  }
}

TEST_F(ClientServerTest, MmditClientFailsClearly) {
  const std::string dir = testing::MakeTempDir("client_test_bad");
  CommandResult r = RunCommand(ClientBinary() + " --inputs=" + dir + "/missing.safetensors");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("missing.safetensors"));

  r = RunCommand(ClientBinary() + " --server=" + address_ + " --model=no_such_model --inputs=" +
                 fixture_->io_path());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("NOT_FOUND"));

  r = RunCommand(absl::StrCat(ClientBinary(), " --server=127.0.0.1:",
                              testing::FreeLoopbackPort(), " --timeout_ms=500 --inputs=",
                              fixture_->io_path()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("mmdit-client: "));
}

TEST_F(ClientServerTest, LoadGeneratorCompletesItsRequests) {
  LoadGenerator::Options options;
  options.address = address_;
  options.model = "mmdit";
  options.concurrency = 4;
  options.max_requests = 24;
  options.max_duration = absl::Seconds(120);
  options.batch_size = 2;
  options.seq_len = 9;
  options.context_len = 3;
  options.dim = fixture_->config.dim;
  auto generator = LoadGenerator::Create(options);
  ASSERT_TRUE(generator.ok()) << generator.status();
  auto report = (*generator)->Run();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->succeeded, 24) << FormatReport(options, *report);
  EXPECT_EQ(report->failed, 0) << report->first_error;
  EXPECT_GT(report->samples_per_second, 0);
  EXPECT_LE(report->latency_p50, report->latency_p90);
  EXPECT_LE(report->latency_p90, report->latency_p99);
  EXPECT_LE(report->latency_p99, report->latency_max);
  EXPECT_THAT(FormatReport(options, *report), HasSubstr("p99"));

  // The duration bound stops a run whose count is out of reach.
  options.max_requests = 1000000;
  options.max_duration = absl::Milliseconds(300);
  options.concurrency = 2;
  auto bounded = LoadGenerator::Create(options);
  ASSERT_TRUE(bounded.ok());
  const absl::Time start = absl::Now();
  auto short_report = (*bounded)->Run();
  ASSERT_TRUE(short_report.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  EXPECT_LT(short_report->succeeded, 1000000);
}

TEST_F(ClientServerTest, MmditLoadgenPrintsThroughputAndPercentiles) {
  const CommandResult r = RunCommand(absl::StrCat(
      MMDIT_BINARY_DIR "/client/mmdit-loadgen --server=", address_,
      " --model=mmdit --concurrency=2 --requests=6 --duration_s=60 --batch=2 --seq_len=5",
      " --context_len=2 --dim=", fixture_->config.dim, " --wait_ready_s=30"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("requests: 6 ok, 0 failed"));
  EXPECT_THAT(r.output, HasSubstr("samples/s"));
  EXPECT_THAT(r.output, HasSubstr("p50"));
  EXPECT_THAT(r.output, HasSubstr("p90"));
  EXPECT_THAT(r.output, HasSubstr("p99"));

  // A wrong D fails every request, and the exit code says so.
  const CommandResult bad = RunCommand(absl::StrCat(
      MMDIT_BINARY_DIR "/client/mmdit-loadgen --server=", address_,
      " --concurrency=1 --requests=2 --seq_len=3 --context_len=1 --dim=", fixture_->config.dim + 1));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.output, HasSubstr("INVALID_ARGUMENT"));
}

TEST(LoadGeneratorOptionsTest, AreValidated) {
  LoadGenerator::Options options;
  options.concurrency = 0;
  EXPECT_EQ(LoadGenerator::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_duration = absl::ZeroDuration();
  EXPECT_EQ(LoadGenerator::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.batch_size = -1;
  EXPECT_EQ(LoadGenerator::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.connect_timeout = absl::ZeroDuration();
  const absl::Status zero_connect = LoadGenerator::Create(options).status();
  EXPECT_EQ(zero_connect.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(zero_connect.message(), HasSubstr("connect_timeout"));
}

// A port that refuses connections for as long as this lives: bound on loopback, never listening.
class RefusingPort {
 public:
  RefusingPort() : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    socklen_t len = sizeof(sa);
    if (fd_ >= 0 && bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0 &&
        getsockname(fd_, reinterpret_cast<sockaddr*>(&sa), &len) == 0) {
      port_ = ntohs(sa.sin_port);
    }
  }
  ~RefusingPort() {
    if (fd_ >= 0) close(fd_);
  }
  int port() const { return port_; }

 private:
  const int fd_;
  int port_ = 0;
};

TEST(LoadGeneratorConnectTest, FailsWithTheAddressWhenNoConnectionComesUp) {
  RefusingPort refusing;
  ASSERT_GT(refusing.port(), 0);
  LoadGenerator::Options options;
  options.address = absl::StrCat("127.0.0.1:", refusing.port());
  options.concurrency = 2;
  options.max_requests = 4;
  options.seq_len = 3;
  options.context_len = 1;
  options.dim = 8;
  options.connect_timeout = absl::Milliseconds(500);
  auto generator = LoadGenerator::Create(options);
  ASSERT_TRUE(generator.ok()) << generator.status();
  const absl::Time start = absl::Now();
  auto report = (*generator)->Run();
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(report.status().message(), HasSubstr(options.address));
  EXPECT_GE(took, absl::Milliseconds(400));  // it waited for the connection, as told
  EXPECT_LT(took, absl::Seconds(20));
}

}  // namespace
}  // namespace mmdit
