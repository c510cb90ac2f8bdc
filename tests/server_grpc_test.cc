// The server in-process on 127.0.0.1 (port 0) through real gRPC: fixtures (raw and typed) against
// the float64 outputs, 16-bit float types, concurrent clients with mixed shapes against the
// reference forward, every bad-input case, queue full, timeouts, cancellation, worker failure,
// streaming, metadata, statistics, health and drain.
#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/rpc_method.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "kernels/cpu/reference_forward.h"
#include "kernels/half_float.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/health.grpc.pb.h"
#include "server/model_repository.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

constexpr int kDim = 64;
constexpr int kMaxSeqLen = 64;

// ---- inputs, requests and expected outputs ----

struct Inputs {
  int B = 1, L = 1, C = 1, D = kDim;
  std::vector<float> x, y, context;
  std::vector<uint8_t> mask;       // empty: none
  std::vector<int64_t> start_pos;  // empty: none
};

Inputs RandomInputs(int B, int L, int C, uint64_t seed, bool masked = false,
                    bool with_start_pos = false, int D = kDim) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Inputs in;
  in.B = B, in.L = L, in.C = C, in.D = D;
  in.x.resize(static_cast<size_t>(B) * L * D);
  in.y.resize(static_cast<size_t>(B) * D);
  in.context.resize(static_cast<size_t>(B) * C * D);
  for (float& v : in.x) v = u(rng);
  for (float& v : in.y) v = u(rng);
  for (float& v : in.context) v = u(rng);
  if (masked) {
    in.mask.resize(static_cast<size_t>(B) * L * L);
    for (int b = 0; b < B; ++b) {
      for (int i = 0; i < L; ++i) {
        for (int j = 0; j < L; ++j) {
          in.mask[(static_cast<size_t>(b) * L + i) * L + j] = (j <= i) || (rng() % 3 == 0);
        }
      }
    }
  }
  if (with_start_pos) {
    for (int b = 0; b < B; ++b) in.start_pos.push_back(static_cast<int64_t>(rng() % 9));
  }
  return in;
}

std::string Bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

std::string FloatBytes(const std::vector<float>& v, const std::string& datatype) {
  if (datatype == "FP32") return Bytes(v.data(), v.size() * 4);
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = datatype == "FP16" ? FloatToFp16(v[i]) : FloatToBf16(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

// A request for `in`: raw_input_contents (any float type) or typed contents (FP32).
ModelInferRequest MakeRequest(const Inputs& in, const std::string& model, bool raw = true,
                              const std::string& datatype = "FP32") {
  ModelInferRequest req;
  req.set_model_name(model);
  auto add = [&](const char* name, const char* type, std::vector<int64_t> shape) {
    auto* t = req.add_inputs();
    t->set_name(name);
    t->set_datatype(type);
    for (int64_t d : shape) t->add_shape(d);
    return t;
  };
  auto* x = add("x", datatype.c_str(), {in.B, in.L, in.D});
  auto* y = add("y", datatype.c_str(), {in.B, 1, in.D});
  auto* c = add("context", datatype.c_str(), {in.B, in.C, in.D});
  decltype(x) m = nullptr;
  decltype(x) s = nullptr;
  if (!in.mask.empty()) m = add("attn_mask", "BOOL", {in.B, in.L, in.L});
  if (!in.start_pos.empty()) s = add("start_pos", "INT64", {in.B});
  if (raw) {
    req.add_raw_input_contents(FloatBytes(in.x, datatype));
    req.add_raw_input_contents(FloatBytes(in.y, datatype));
    req.add_raw_input_contents(FloatBytes(in.context, datatype));
    if (m) req.add_raw_input_contents(Bytes(in.mask.data(), in.mask.size()));
    if (s) req.add_raw_input_contents(Bytes(in.start_pos.data(), in.start_pos.size() * 8));
  } else {
    for (float v : in.x) x->mutable_contents()->add_fp32_contents(v);
    for (float v : in.y) y->mutable_contents()->add_fp32_contents(v);
    for (float v : in.context) c->mutable_contents()->add_fp32_contents(v);
    if (m) for (uint8_t v : in.mask) m->mutable_contents()->add_bool_contents(v != 0);
    if (s) for (int64_t v : in.start_pos) s->mutable_contents()->add_int64_contents(v);
  }
  return req;
}

struct Outputs {
  std::vector<float> x_out, context_out;
};

// The reference forward on `in`, in float32.
Outputs Expected(const ModelWeights& weights, const Inputs& in) {
  Outputs out;
  out.x_out.resize(in.x.size());
  out.context_out.resize(in.context.size());
  std::vector<ForwardSample> samples(in.B);
  for (int b = 0; b < in.B; ++b) {
    ForwardSample& s = samples[b];
    s.seq_len = in.L;
    s.context_len = in.C;
    s.x = in.x.data() + static_cast<size_t>(b) * in.L * in.D;
    s.y = in.y.data() + static_cast<size_t>(b) * in.D;
    s.context = in.context.data() + static_cast<size_t>(b) * in.C * in.D;
    s.attn_mask = in.mask.empty() ? nullptr : in.mask.data() + static_cast<size_t>(b) * in.L * in.L;
    s.start_pos = in.start_pos.empty() ? 0 : in.start_pos[b];
    s.x_out = out.x_out.data() + static_cast<size_t>(b) * in.L * in.D;
    s.context_out = out.context_out.data() + static_cast<size_t>(b) * in.C * in.D;
  }
  EXPECT_TRUE(ReferenceForward(weights, samples).ok());
  return out;
}

std::vector<float> DecodeFloats(const std::string& bytes, const std::string& datatype) {
  std::vector<float> v;
  if (datatype == "FP32") {
    v.resize(bytes.size() / 4);
    std::memcpy(v.data(), bytes.data(), v.size() * 4);
    return v;
  }
  v.resize(bytes.size() / 2);
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    v[i] = datatype == "FP16" ? Fp16ToFloat(h) : Bf16ToFloat(h);
  }
  return v;
}

// The response's outputs by name; checks names, datatypes and shapes against `in`.
Outputs ParseResponse(const ModelInferResponse& r, const Inputs& in,
                      const std::string& datatype = "FP32") {
  Outputs out;
  EXPECT_EQ(r.outputs_size(), r.raw_output_contents_size());
  for (int i = 0; i < r.outputs_size() && i < r.raw_output_contents_size(); ++i) {
    const auto& t = r.outputs(i);
    EXPECT_EQ(t.datatype(), datatype);
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    if (t.name() == "x_out") {
      EXPECT_EQ(shape, (std::vector<int64_t>{in.B, in.L, in.D}));
      out.x_out = DecodeFloats(r.raw_output_contents(i), datatype);
    } else if (t.name() == "context_out") {
      EXPECT_EQ(shape, (std::vector<int64_t>{in.B, in.C, in.D}));
      out.context_out = DecodeFloats(r.raw_output_contents(i), datatype);
    } else {
      ADD_FAILURE() << "unexpected output " << t.name();
    }
  }
  return out;
}

// ---- models, workers and the server ----

MmditConfig SmallConfig() {
  MmditConfig c;
  c.dim = kDim;
  c.num_heads = 4;
  c.dim_feedforward = 256;
  c.num_layers = 2;
  c.max_seq_len = kMaxSeqLen;
  return c;
}

std::shared_ptr<const LoadedModel> SmallModel(const std::string& name, int max_batch_size,
                                              const std::string& extra_config = "") {
  const MmditConfig c = SmallConfig();
  const std::string text = absl::StrCat(
      "name: \"", name, "\"\nmax_batch_size: ", max_batch_size, "\nmmdit { dim: ", c.dim,
      " num_heads: ", c.num_heads, " dim_feedforward: ", c.dim_feedforward,
      " num_layers: ", c.num_layers, " max_seq_len: ", c.max_seq_len, " }\n", extra_config);
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text, "test config");
  EXPECT_TRUE(config.ok()) << config.status();
  auto model = std::make_shared<LoadedModel>();
  model->config = *config;
  model->version = 1;
  model->weights = ModelWeights::Deterministic(c, 7);
  return model;
}

// A worker that runs the reference forward once its gate is open, and counts its runs.
class GatedWorker final : public Worker {
 public:
  struct Gate {
    absl::Mutex mu;
    absl::CondVar cv;
    bool open ABSL_GUARDED_BY(mu) = true;
    int running ABSL_GUARDED_BY(mu) = 0;
    void Set(bool o) {
      {
        absl::MutexLock lock(&mu);
        open = o;
      }
      cv.SignalAll();
    }
    bool WaitRunning(int n) {
      const absl::Time give_up = absl::Now() + absl::Seconds(20);
      absl::MutexLock lock(&mu);
      while (running < n) {
        if (absl::Now() >= give_up) return false;
        cv.WaitWithDeadline(&mu, give_up);
      }
      return true;
    }
  };
  GatedWorker(const ModelWeights* w, Gate* gate, int index, int fail_after = -1,
              bool fallback_only = false)
      : weights_(w),
        gate_(gate),
        index_(index),
        fail_after_(fail_after),
        fallback_only_(fallback_only) {}
  bool fallback_only() const override { return fallback_only_; }
  int runs() const { return runs_.load(); }

  absl::Status Run(ForwardBatch batch) override {
    const int run = runs_++;
    if (fail_after_ >= 0 && run >= fail_after_) {
      return absl::InternalError("simulated device failure");
    }
    {
      absl::MutexLock lock(&gate_->mu);
      ++gate_->running;
      gate_->cv.SignalAll();
      while (!gate_->open) gate_->cv.Wait(&gate_->mu);
      --gate_->running;
    }
    return ReferenceForward(*weights_, batch);
  }
  std::string name() const override { return absl::StrCat("fake:", index_); }

 private:
  const ModelWeights* weights_;
  Gate* gate_;
  int index_;
  int fail_after_;
  bool fallback_only_;
  std::atomic<int> runs_{0};
};

class ServerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(5));
  }

  void StartServer(Server::Options options) {
    options.address = "127.0.0.1";
    options.grpc_port = 0;
    options.http_port = -1;
    options.cpu_threads = 1;
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    Connect();
  }
  void StartModels(std::vector<std::shared_ptr<const LoadedModel>> models,
                   ServedModel::WorkerFactory factory = {}) {
    Server::Options options;
    options.models = std::move(models);
    options.worker_factory = std::move(factory);
    StartServer(std::move(options));
  }
  void Connect() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->grpc_port()),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = inference::GRPCInferenceService::NewStub(channel_);
  }
  // A gated reference worker per model, sharing gate_.
  ServedModel::WorkerFactory GatedFactory(int fail_first_worker_after = -1, int count = 1) {
    return [this, fail_first_worker_after, count](const LoadedModel& m)
               -> absl::StatusOr<std::vector<std::unique_ptr<Worker>>> {
      std::vector<std::unique_ptr<Worker>> workers;
      for (int i = 0; i < count; ++i) {
        workers.push_back(std::make_unique<GatedWorker>(
            &m.weights, &gate_, i, i == 0 ? fail_first_worker_after : -1));
      }
      return workers;
    };
  }

  grpc::Status Infer(const ModelInferRequest& req, ModelInferResponse* resp,
                     absl::Duration deadline = absl::Seconds(60)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    return stub_->ModelInfer(&ctx, req, resp);
  }

  ServedModel* Model(const std::string& name) {
    for (ServedModel* m : server_->models()) {
      if (m->name() == name) return m;
    }
    return nullptr;
  }

  inference::ModelStatistics Stats(const std::string& model) {
    grpc::ClientContext ctx;
    inference::ModelStatisticsRequest req;
    req.set_name(model);
    inference::ModelStatisticsResponse resp;
    EXPECT_TRUE(stub_->ModelStatistics(&ctx, req, &resp).ok());
    return resp.model_stats_size() > 0 ? resp.model_stats(0) : inference::ModelStatistics();
  }

  // Waits (bounded) until `model` has `n` requests queued.
  bool WaitQueued(const std::string& model, int64_t n) {
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (absl::Now() < give_up) {
      if (Model(model)->num_queued() == n) return true;
      absl::SleepFor(absl::Milliseconds(2));
    }
    return false;
  }

  GatedWorker::Gate gate_;
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
};

// ---- fixtures ----

TEST_F(ServerTest, FixturesThroughGrpcRawAndTypedMatchFloat64Outputs) {
  const std::string repo = testing::MakeTempDir("server_fixtures");
  std::vector<testing::Fixture> fixtures;
  for (const std::string& name : testing::FixtureNames()) {
    fixtures.push_back(testing::LoadFixture(name));
    const testing::Fixture& f = fixtures.back();
    testing::WriteModelRepository(repo, f.name, f.config, f.weights_path(), /*max_batch_size=*/8,
                                  /*version=*/3,
                                  "instance_group [{ kind: KIND_CPU count: 1 }]\n");
  }
  Server::Options options;
  options.model_repository = repo;
  StartServer(options);
  for (const testing::Fixture& f : fixtures) {
    Inputs in;
    in.B = f.batch, in.L = f.seq_len, in.C = f.context_len, in.D = f.config.dim;
    in.x = f.x, in.y = f.y, in.context = f.context, in.mask = f.attn_mask;
    in.start_pos = f.start_pos;
    for (bool raw : {true, false}) {
      SCOPED_TRACE(absl::StrCat(f.name, raw ? " raw" : " typed"));
      ModelInferRequest req = MakeRequest(in, f.name, raw);
      req.set_id("req-7");
      ModelInferResponse resp;
      grpc::Status s = Infer(req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(resp.model_name(), f.name);
      EXPECT_EQ(resp.model_version(), "3");
      EXPECT_EQ(resp.id(), "req-7");
      Outputs out = ParseResponse(resp, in);
      EXPECT_LE(testing::RelativeError(out.x_out, f.x_out_f64), 1e-5);
      EXPECT_LE(testing::RelativeError(out.context_out, f.context_out_f64), 1e-5);
    }
  }
}

TEST_F(ServerTest, SixteenBitFloatsComeBackInTheirOwnType) {
  auto model = SmallModel("m", 4);
  StartModels({model});
  const Inputs in = RandomInputs(2, 6, 3, 11, /*masked=*/true, /*with_start_pos=*/true);
  for (const std::string type : {"FP16", "BF16"}) {
    SCOPED_TRACE(type);
    // The server computes on the widened 16-bit inputs; so does the reference here.
    Inputs rounded = in;
    for (auto* v : {&rounded.x, &rounded.y, &rounded.context}) {
      *v = DecodeFloats(FloatBytes(*v, type), type);
    }
    const Outputs want = Expected(model->weights, rounded);
    ModelInferResponse resp;
    grpc::Status s = Infer(MakeRequest(in, "m", true, type), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    Outputs got = ParseResponse(resp, in, type);
    EXPECT_LE(testing::RelativeError(got.x_out, want.x_out), 1e-2);
    EXPECT_LE(testing::RelativeError(got.context_out, want.context_out), 1e-2);
  }
}

TEST_F(ServerTest, RequestedOutputsOnlyAndYAsRankTwo) {
  auto model = SmallModel("m", 4);
  StartModels({model});
  const Inputs in = RandomInputs(1, 4, 2, 5);
  ModelInferRequest req = MakeRequest(in, "m");
  req.mutable_inputs(1)->clear_shape();
  req.mutable_inputs(1)->add_shape(1);
  req.mutable_inputs(1)->add_shape(kDim);
  req.add_outputs()->set_name("context_out");
  ModelInferResponse resp;
  ASSERT_TRUE(Infer(req, &resp).ok());
  ASSERT_EQ(resp.outputs_size(), 1);
  EXPECT_EQ(resp.outputs(0).name(), "context_out");
  const Outputs want = Expected(model->weights, in);
  EXPECT_LE(testing::RelativeError(ParseResponse(resp, in).context_out, want.context_out), 1e-5);
}

// ---- concurrency and batching ----

TEST_F(ServerTest, ConcurrentClientsWithMixedShapesGetTheirOwnRowsAndBatchesForm) {
  auto model = SmallModel("m", 16,
                          "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
                          "instance_group [{ kind: KIND_CPU count: 1 }]\n");
  StartModels({model});
  constexpr int kClients = 32;
  constexpr int kRequestsPerClient = 2;
  std::atomic<int> failures{0};
  std::atomic<int> samples{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int r = 0; r < kRequestsPerClient; ++r) {
        const int B = 1 + (c + r) % 3;
        const int L = 2 + (c * 5 + r) % 11;
        const int C = 1 + (c * 3 + r) % 5;
        const Inputs in = RandomInputs(B, L, C, 1000 + c * 10 + r, c % 2 == 0, c % 3 == 0);
        const Outputs want = Expected(model->weights, in);
        ModelInferResponse resp;
        grpc::Status s = Infer(MakeRequest(in, "m", /*raw=*/c % 4 != 1), &resp);
        if (!s.ok()) {
          ADD_FAILURE() << "client " << c << ": " << s.error_message();
          ++failures;
          continue;
        }
        samples += B;
        Outputs got = ParseResponse(resp, in);
        EXPECT_LE(testing::RelativeError(got.x_out, want.x_out), 1e-5) << "client " << c;
        EXPECT_LE(testing::RelativeError(got.context_out, want.context_out), 1e-5);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(failures.load(), 0);
  const inference::ModelStatistics stats = Stats("m");
  EXPECT_EQ(stats.inference_count(), static_cast<uint64_t>(samples.load()));
  EXPECT_EQ(stats.inference_stats().success().count(),
            static_cast<uint64_t>(kClients * kRequestsPerClient));
  // Batches formed: fewer executions than requests (and so than samples).
  EXPECT_LT(stats.execution_count(), static_cast<uint64_t>(kClients * kRequestsPerClient));
  EXPECT_LT(stats.execution_count(), stats.inference_count());
  EXPECT_GT(stats.batch_stats_size(), 0);
}

// ---- bad input ----

struct BadCase {
  const char* label;
  std::function<void(ModelInferRequest&)> mutate;
  grpc::StatusCode code;
  const char* substring;
};

TEST_F(ServerTest, EveryBadInputIsAnsweredPreciselyAndTheServerKeepsServing) {
  auto model = SmallModel("m", 4);
  StartModels({model});
  const Inputs in = RandomInputs(2, 5, 3, 21, /*masked=*/true, /*with_start_pos=*/true);
  const ModelInferRequest good = MakeRequest(in, "m");
  // Inputs are x, y, context, attn_mask, start_pos in that order.
  auto set_shape = [](ModelInferRequest& r, int input, std::vector<int64_t> shape) {
    r.mutable_inputs(input)->clear_shape();
    for (int64_t d : shape) r.mutable_inputs(input)->add_shape(d);
  };
  const std::vector<BadCase> cases = {
      {"missing", [](auto& r) { r.mutable_inputs()->DeleteSubrange(2, 1);
                                r.mutable_raw_input_contents()->DeleteSubrange(2, 1); },
       grpc::INVALID_ARGUMENT, "missing input tensor 'context'"},
      {"unknown", [](auto& r) { r.mutable_inputs(3)->set_name("foo"); },
       grpc::INVALID_ARGUMENT, "unknown input tensor 'foo'"},
      {"duplicate", [](auto& r) { r.mutable_inputs(1)->set_name("x"); },
       grpc::INVALID_ARGUMENT, "input tensor 'x' appears twice"},
      {"datatype x", [](auto& r) { r.mutable_inputs(0)->set_datatype("INT32"); },
       grpc::INVALID_ARGUMENT, "input 'x': datatype 'INT32' is not supported; expected FP32"},
      {"datatype mix", [](auto& r) { r.mutable_inputs(1)->set_datatype("FP16"); },
       grpc::INVALID_ARGUMENT, "input 'y': datatype 'FP16' does not match x's FP32"},
      {"datatype mask", [](auto& r) { r.mutable_inputs(3)->set_datatype("FP32"); },
       grpc::INVALID_ARGUMENT,
       "input 'attn_mask': datatype 'FP32' is not supported; expected BOOL"},
      {"datatype start_pos", [](auto& r) { r.mutable_inputs(4)->set_datatype("INT32"); },
       grpc::INVALID_ARGUMENT,
       "input 'start_pos': datatype 'INT32' is not supported; expected INT64"},
      {"rank x", [&](auto& r) { set_shape(r, 0, {10, kDim}); },
       grpc::INVALID_ARGUMENT, "input 'x': expected shape [B, L, D] with D = 64, got [10, 64]"},
      {"dim x", [&](auto& r) { set_shape(r, 0, {2, 10, 32}); },
       grpc::INVALID_ARGUMENT, "input 'x': D (dim 2) must be 64, got 32"},
      {"negative dim", [&](auto& r) { set_shape(r, 2, {2, -3, kDim}); },
       grpc::INVALID_ARGUMENT, "input 'context': shape [2, -3, 64] has a negative dimension"},
      {"batch mismatch", [&](auto& r) { set_shape(r, 2, {1, 6, kDim}); },
       grpc::INVALID_ARGUMENT,
       "input 'context': batch size 1 (dim 0) does not match x's batch size 2"},
      {"dim context", [&](auto& r) { set_shape(r, 2, {2, 6, 32}); },
       grpc::INVALID_ARGUMENT, "input 'context': D (dim 2) must be 64, got 32"},
      {"shape y", [&](auto& r) { set_shape(r, 1, {2, 2, kDim}); },
       grpc::INVALID_ARGUMENT, "input 'y': expected shape [B, 1, D] = [2, 1, 64] or [B, D]"},
      {"shape mask", [&](auto& r) { set_shape(r, 3, {2, 5, 4}); },
       grpc::INVALID_ARGUMENT,
       "input 'attn_mask': expected shape [B, L, L] = [2, 5, 5], got [2, 5, 4]"},
      {"shape start_pos", [&](auto& r) { set_shape(r, 4, {2, 1}); },
       grpc::INVALID_ARGUMENT, "input 'start_pos': expected shape [B] = [2], got [2, 1]"},
      {"raw size", [](auto& r) { r.mutable_raw_input_contents(0)->resize(100); },
       grpc::INVALID_ARGUMENT,
       "input 'x': raw_input_contents[0] holds 100 bytes, but shape [2, 5, 64] of FP32 needs"
       " 2560"},
      {"raw count", [](auto& r) { r.mutable_raw_input_contents()->RemoveLast(); },
       grpc::INVALID_ARGUMENT, "raw_input_contents has 4 entries for 5 inputs"},
      {"typed and raw",
       [](auto& r) { r.mutable_inputs(1)->mutable_contents()->add_fp32_contents(1); },
       grpc::INVALID_ARGUMENT,
       "input 'y' carries typed contents and the request also carries raw_input_contents"},
      {"batch too large", [&](auto& r) { r = MakeRequest(RandomInputs(5, 2, 1, 3), "m"); },
       grpc::INVALID_ARGUMENT, "input 'x': batch size B = 5 exceeds the model's max_batch_size 4"},
      {"L zero", [&](auto& r) { set_shape(r, 0, {2, 0, kDim}); },
       grpc::INVALID_ARGUMENT, "input 'x': L (dim 1) must be at least 1, got 0"},
      {"C zero", [&](auto& r) { set_shape(r, 2, {2, 0, kDim}); },
       grpc::INVALID_ARGUMENT, "input 'context': C (dim 1) must be at least 1, got 0"},
      {"mask row", [](auto& r) { std::string& m = *r.mutable_raw_input_contents(3);
                                 std::memset(&m[(1 * 5 + 2) * 5], 0, 5); },
       grpc::INVALID_ARGUMENT, "input 'attn_mask': row 2 of sample 1 has no visible key"},
      {"start_pos + L", [](auto& r) { int64_t p = kMaxSeqLen - 4;
                                      std::memcpy(&(*r.mutable_raw_input_contents(4))[8], &p, 8); },
       grpc::INVALID_ARGUMENT,
       "input 'start_pos': start_pos[1] + L = 60 + 5 = 65 exceeds the model's max_seq_len 64"},
      {"start_pos negative",
       [](auto& r) {
         int64_t p = -1;
         std::memcpy(&(*r.mutable_raw_input_contents(4))[0], &p, 8);
       },
       grpc::INVALID_ARGUMENT, "input 'start_pos': start_pos[0] = -1 must be >= 0"},
      {"unknown output", [](auto& r) { r.add_outputs()->set_name("foo"); },
       grpc::INVALID_ARGUMENT, "unknown requested output 'foo'"},
      {"duplicate output", [](auto& r) { r.add_outputs()->set_name("x_out");
                                         r.add_outputs()->set_name("x_out"); },
       grpc::INVALID_ARGUMENT, "requested output 'x_out' appears twice"},
      {"typed fp16",
       [&](auto& r) {
         r = MakeRequest(in, "m", /*raw=*/false);
         for (int i = 0; i < 3; ++i) r.mutable_inputs(i)->set_datatype("FP16");
       },
       grpc::INVALID_ARGUMENT,
       "input 'x': FP16 data has no typed contents field; send it in raw_input_contents"},
      {"typed count",
       [&](auto& r) {
         r = MakeRequest(in, "m", /*raw=*/false);
         r.mutable_inputs(2)->mutable_contents()->mutable_fp32_contents()->RemoveLast();
       },
       grpc::INVALID_ARGUMENT,
       "input 'context': contents.fp32_contents holds 383 values, but shape [2, 3, 64] needs 384"},
      {"timeout type", [](auto& r) { (*r.mutable_parameters())["timeout"].set_string_param("1s"); },
       grpc::INVALID_ARGUMENT, "parameter 'timeout' must be an int64 number of microseconds"},
      {"unknown model", [](auto& r) { r.set_model_name("nope"); },
       grpc::NOT_FOUND, "unknown model 'nope'; this server serves 'm'"},
      {"unknown version", [](auto& r) { r.set_model_version("7"); },
       grpc::NOT_FOUND, "model 'm' has no version '7'; it serves version 1"},
  };
  int model_failures = 0;
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.label);
    ModelInferRequest req = good;
    c.mutate(req);
    ModelInferResponse resp;
    grpc::Status s = Infer(req, &resp);
    EXPECT_EQ(s.error_code(), c.code) << s.error_message();
    EXPECT_NE(s.error_message().find(c.substring), std::string::npos) << s.error_message();
    if (c.code != grpc::NOT_FOUND) ++model_failures;  // NOT_FOUND never reached model 'm'
    // Still serving: the good request right after.
    ModelInferResponse ok_resp;
    ASSERT_TRUE(Infer(good, &ok_resp).ok());
  }
  const inference::ModelStatistics stats = Stats("m");
  EXPECT_EQ(stats.inference_stats().fail().count(), static_cast<uint64_t>(model_failures));
  EXPECT_EQ(stats.inference_stats().success().count(), cases.size());
}

// ---- queue, timeouts, cancellation ----

TEST_F(ServerTest, FullQueueAnswersUnavailableAtOnce) {
  auto model = SmallModel("m", 1, "dynamic_batching { max_queue_size: 2 }\n");
  StartModels({model}, GatedFactory());
  gate_.Set(false);
  const Inputs in = RandomInputs(1, 3, 2, 31);
  const ModelInferRequest req = MakeRequest(in, "m");
  std::vector<std::thread> waiting;
  std::atomic<int> ok{0};
  auto send = [&] {
    ModelInferResponse resp;
    if (Infer(req, &resp).ok()) ++ok;
  };
  waiting.emplace_back(send);
  ASSERT_TRUE(gate_.WaitRunning(1));  // the first one is on the worker
  waiting.emplace_back(send);
  waiting.emplace_back(send);
  ASSERT_TRUE(WaitQueued("m", 2));
  ModelInferResponse resp;
  const absl::Time start = absl::Now();
  grpc::Status s = Infer(req, &resp);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(s.error_code(), grpc::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("queue is full (2 requests waiting)"), std::string::npos)
      << s.error_message();
  gate_.Set(true);
  for (std::thread& t : waiting) t.join();
  EXPECT_EQ(ok.load(), 3);
}

TEST_F(ServerTest, TimeoutParameterAndGrpcDeadlineGiveDeadlineExceeded) {
  auto model = SmallModel("m", 1);
  StartModels({model}, GatedFactory());
  gate_.Set(false);
  const ModelInferRequest req = MakeRequest(RandomInputs(1, 3, 2, 41), "m");
  std::thread first([&] {
    ModelInferResponse resp;
    EXPECT_TRUE(Infer(req, &resp).ok());
  });
  ASSERT_TRUE(gate_.WaitRunning(1));

  ModelInferRequest timed = req;
  (*timed.mutable_parameters())["timeout"].set_int64_param(50'000);  // 50 ms
  ModelInferResponse resp;
  grpc::Status s = Infer(timed, &resp);
  EXPECT_EQ(s.error_code(), grpc::DEADLINE_EXCEEDED);
  EXPECT_NE(s.error_message().find("deadline passed while it was queued"), std::string::npos)
      << s.error_message();
  EXPECT_TRUE(WaitQueued("m", 0));

  s = Infer(req, &resp, absl::Milliseconds(100));
  EXPECT_EQ(s.error_code(), grpc::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitQueued("m", 0));  // the server took it off the queue too

  gate_.Set(true);
  first.join();
  const inference::ModelStatistics stats = Stats("m");
  EXPECT_EQ(stats.inference_stats().fail().count(), 2u);
  EXPECT_EQ(stats.execution_count(), 1u);  // the timed-out requests never ran
}

TEST_F(ServerTest, CancelledCallLeavesTheQueue) {
  auto model = SmallModel("m", 1);
  StartModels({model}, GatedFactory());
  gate_.Set(false);
  const ModelInferRequest req = MakeRequest(RandomInputs(1, 3, 2, 51), "m");
  std::thread first([&] {
    ModelInferResponse resp;
    EXPECT_TRUE(Infer(req, &resp).ok());
  });
  ASSERT_TRUE(gate_.WaitRunning(1));
  grpc::ClientContext ctx;
  grpc::Status cancelled_status;
  std::thread second([&] {
    ModelInferResponse resp;
    cancelled_status = stub_->ModelInfer(&ctx, req, &resp);
  });
  ASSERT_TRUE(WaitQueued("m", 1));
  ctx.TryCancel();
  second.join();
  EXPECT_EQ(cancelled_status.error_code(), grpc::CANCELLED);
  EXPECT_TRUE(WaitQueued("m", 0));
  gate_.Set(true);
  first.join();
  EXPECT_EQ(Stats("m").execution_count(), 1u);
}

// ---- workers ----

TEST_F(ServerTest, FailingWorkerIsTakenOutAndItsBatchRunsElsewhere) {
  auto model = SmallModel("m", 4);
  // Worker 0 passes warm-up, then fails every batch.
  StartModels({model}, GatedFactory(/*fail_first_worker_after=*/1, /*count=*/2));
  for (int i = 0; i < 4; ++i) {
    const Inputs in = RandomInputs(1 + i % 2, 3 + i, 2, 61 + i);
    ModelInferResponse resp;
    grpc::Status s = Infer(MakeRequest(in, "m"), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_LE(testing::RelativeError(ParseResponse(resp, in).x_out,
                                     Expected(model->weights, in).x_out),
              1e-5);
  }
  EXPECT_EQ(Model("m")->workers_in_service(), 1);
  EXPECT_GE(Model("m")->batch_reruns(), 1);
  grpc::ClientContext ctx;
  inference::ServerReadyResponse ready;
  ASSERT_TRUE(stub_->ServerReady(&ctx, {}, &ready).ok());
  EXPECT_TRUE(ready.ready());
}

TEST_F(ServerTest, FallbackWorkerRunsBatchesOnlyOnceNoPrimaryIsLeft) {
  auto model = SmallModel("m", 4);
  GatedWorker* primary = nullptr;
  GatedWorker* fallback = nullptr;
  // The primary passes warm-up and two batches, then fails.
  StartModels({model}, [&](const LoadedModel& m)
                  -> absl::StatusOr<std::vector<std::unique_ptr<Worker>>> {
    std::vector<std::unique_ptr<Worker>> workers;
    auto p = std::make_unique<GatedWorker>(&m.weights, &gate_, 0, /*fail_after=*/3);
    auto f = std::make_unique<GatedWorker>(&m.weights, &gate_, 1, -1, /*fallback_only=*/true);
    primary = p.get();
    fallback = f.get();
    workers.push_back(std::move(p));
    workers.push_back(std::move(f));
    return workers;
  });
  const Inputs in = RandomInputs(2, 4, 3, 95);
  const Outputs want = Expected(model->weights, in);
  for (int i = 0; i < 4; ++i) {
    ModelInferResponse resp;
    grpc::Status s = Infer(MakeRequest(in, "m"), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_LE(testing::RelativeError(ParseResponse(resp, in).x_out, want.x_out), 1e-5);
    // Warm-up ran once on each; the fallback takes batches only after the primary failed.
    EXPECT_EQ(fallback->runs(), i < 2 ? 1 : i);
  }
  EXPECT_EQ(primary->runs(), 4);  // warm-up, two batches, one failure
  EXPECT_EQ(Model("m")->workers_in_service(), 1);
  EXPECT_EQ(Model("m")->batch_reruns(), 1);
  EXPECT_TRUE(server_->ready());
}

TEST_F(ServerTest, NoWorkerPassingWarmUpMeansLiveButNotReady) {
  auto model = SmallModel("m", 4);
  Server::Options options;
  options.models = {model};
  options.worker_factory = GatedFactory(/*fail_first_worker_after=*/0, /*count=*/1);
  options.address = "127.0.0.1";
  options.grpc_port = 0;
  options.http_port = -1;
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options);
  ASSERT_TRUE(server.ok());
  server_ = *std::move(server);
  absl::Status started = server_->Start();
  EXPECT_EQ(started.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(started.message().find("no worker passed warm-up"), std::string::npos);
  Connect();
  grpc::ClientContext c1, c2, c3;
  inference::ServerLiveResponse live;
  inference::ServerReadyResponse ready;
  ASSERT_TRUE(stub_->ServerLive(&c1, {}, &live).ok());
  ASSERT_TRUE(stub_->ServerReady(&c2, {}, &ready).ok());
  EXPECT_TRUE(live.live());
  EXPECT_FALSE(ready.ready());
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::health::v1::HealthCheckResponse h;
  ASSERT_TRUE(health->Check(&c3, {}, &h).ok());
  EXPECT_EQ(h.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  ModelInferResponse resp;
  grpc::Status s = Infer(MakeRequest(RandomInputs(1, 2, 1, 1), "m"), &resp);
  EXPECT_EQ(s.error_code(), grpc::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("model 'm' is not ready"), std::string::npos);
}

// ---- protocol surface ----

TEST_F(ServerTest, StreamInferAnswersEveryRequestIncludingErrors) {
  auto model = SmallModel("m", 4, "dynamic_batching { max_queue_delay_microseconds: 2000 }\n");
  StartModels({model});
  grpc::ClientContext ctx;
  auto stream = stub_->ModelStreamInfer(&ctx);
  std::vector<Inputs> inputs;
  for (int i = 0; i < 3; ++i) {
    inputs.push_back(RandomInputs(1 + i, 2 + i, 1 + i, 70 + i));
    ModelInferRequest req = MakeRequest(inputs.back(), "m");
    req.set_id(absl::StrCat("s", i));
    ASSERT_TRUE(stream->Write(req));
  }
  ModelInferRequest bad = MakeRequest(inputs[0], "m");
  bad.set_id("bad");
  bad.mutable_inputs(0)->set_datatype("INT8");
  ASSERT_TRUE(stream->Write(bad));
  ASSERT_TRUE(stream->WritesDone());
  inference::ModelStreamInferResponse r;
  int answered = 0;
  bool saw_error = false;
  while (stream->Read(&r)) {
    ++answered;
    const std::string& id = r.infer_response().id();
    if (id == "bad") {
      saw_error = true;
      EXPECT_NE(r.error_message().find("datatype 'INT8' is not supported"), std::string::npos)
          << r.error_message();
      continue;
    }
    ASSERT_TRUE(r.error_message().empty()) << r.error_message();
    const int i = id[1] - '0';
    ASSERT_GE(i, 0);
    ASSERT_LT(i, 3);
    const Outputs got = ParseResponse(r.infer_response(), inputs[i]);
    const Outputs want = Expected(model->weights, inputs[i]);
    EXPECT_LE(testing::RelativeError(got.x_out, want.x_out), 1e-5);
    EXPECT_LE(testing::RelativeError(got.context_out, want.context_out), 1e-5);
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answered, 4);
  EXPECT_TRUE(saw_error);
}

TEST_F(ServerTest, MetadataReadinessAndHealth) {
  StartModels({SmallModel("m", 4)});
  {
    grpc::ClientContext ctx;
    inference::ServerMetadataResponse md;
    ASSERT_TRUE(stub_->ServerMetadata(&ctx, {}, &md).ok());
    EXPECT_EQ(md.name(), "mmdit-serve");
    EXPECT_FALSE(md.version().empty());
  }
  {
    grpc::ClientContext ctx;
    inference::ModelMetadataRequest req;
    req.set_name("m");
    inference::ModelMetadataResponse md;
    ASSERT_TRUE(stub_->ModelMetadata(&ctx, req, &md).ok());
    EXPECT_EQ(md.name(), "m");
    ASSERT_EQ(md.versions_size(), 1);
    EXPECT_EQ(md.versions(0), "1");
    std::vector<std::string> inputs, outputs;
    for (const auto& t : md.inputs()) inputs.push_back(t.name());
    for (const auto& t : md.outputs()) outputs.push_back(t.name());
    EXPECT_EQ(inputs, (std::vector<std::string>{"x", "y", "context", "attn_mask", "start_pos"}));
    EXPECT_EQ(outputs, (std::vector<std::string>{"x_out", "context_out"}));
    EXPECT_EQ(md.inputs(0).shape(2), kDim);
  }
  {
    grpc::ClientContext ctx;
    inference::ModelMetadataRequest req;
    req.set_name("nope");
    inference::ModelMetadataResponse md;
    EXPECT_EQ(stub_->ModelMetadata(&ctx, req, &md).error_code(), grpc::NOT_FOUND);
  }
  {
    grpc::ClientContext c1, c2, c3;
    inference::ServerLiveResponse live;
    inference::ServerReadyResponse ready;
    inference::ModelReadyRequest mreq;
    mreq.set_name("m");
    inference::ModelReadyResponse mready;
    ASSERT_TRUE(stub_->ServerLive(&c1, {}, &live).ok());
    ASSERT_TRUE(stub_->ServerReady(&c2, {}, &ready).ok());
    ASSERT_TRUE(stub_->ModelReady(&c3, mreq, &mready).ok());
    EXPECT_TRUE(live.live());
    EXPECT_TRUE(ready.ready());
    EXPECT_TRUE(mready.ready());
  }
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const std::string service : {"", "inference.GRPCInferenceService"}) {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse h;
    ASSERT_TRUE(health->Check(&ctx, req, &h).ok()) << service;
    EXPECT_EQ(h.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  {
    grpc::ClientContext ctx;
    inference::RepositoryIndexResponse index;
    ASSERT_TRUE(stub_->RepositoryIndex(&ctx, {}, &index).ok());
    ASSERT_EQ(index.models_size(), 1);
    EXPECT_EQ(index.models(0).state(), "READY");
  }
}

// One round trip of grpc.reflection.v1alpha.ServerReflection with a hand-encoded request; the
// answer's bytes are returned as they came (names and descriptors appear in them verbatim).
std::string ReflectionCall(grpc::Channel* channel, const std::string& request_bytes) {
  static const char kMethod[] = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> rw(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel, grpc::internal::RpcMethod(kMethod, grpc::internal::RpcMethod::BIDI_STREAMING),
          &ctx));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  EXPECT_TRUE(rw->Write(request));
  rw->WritesDone();
  grpc::ByteBuffer response;
  std::string out;
  if (rw->Read(&response)) {
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(response.Dump(&slices).ok());
    for (const grpc::Slice& s : slices) {
      out.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  EXPECT_TRUE(rw->Finish().ok());
  return out;
}

TEST_F(ServerTest, ReflectionListsAndDescribesTheServices) {
  StartModels({SmallModel("m", 4)});
  // ServerReflectionRequest.list_services (field 7) = "".
  const std::string list = ReflectionCall(channel_.get(), std::string("\x3a\x00", 2));
  EXPECT_NE(list.find("inference.GRPCInferenceService"), std::string::npos);
  EXPECT_NE(list.find("grpc.health.v1.Health"), std::string::npos);
  // ServerReflectionRequest.file_containing_symbol (field 4): the descriptors come back.
  for (const std::string symbol : {"inference.GRPCInferenceService", "grpc.health.v1.Health"}) {
    const std::string req = std::string("\x22") + static_cast<char>(symbol.size()) + symbol;
    const std::string file = ReflectionCall(channel_.get(), req);
    const char* message = symbol[0] == 'i' ? "ModelInferRequest" : "HealthCheckRequest";
    EXPECT_NE(file.find(message), std::string::npos) << symbol;
  }
}

TEST_F(ServerTest, StatisticsCountWhatWasSent) {
  auto model = SmallModel("m", 8);
  StartModels({model});
  int samples = 0;
  for (int i = 0; i < 3; ++i) {
    ModelInferResponse resp;
    ASSERT_TRUE(Infer(MakeRequest(RandomInputs(i + 1, 3, 2, 80 + i), "m"), &resp).ok());
    samples += i + 1;
  }
  const inference::ModelStatistics stats = Stats("m");
  EXPECT_EQ(stats.name(), "m");
  EXPECT_EQ(stats.version(), "1");
  EXPECT_EQ(stats.inference_count(), static_cast<uint64_t>(samples));
  EXPECT_EQ(stats.execution_count(), 3u);  // sequential requests: one batch each
  EXPECT_EQ(stats.inference_stats().success().count(), 3u);
  EXPECT_EQ(stats.inference_stats().queue().count(), 3u);
  EXPECT_EQ(stats.inference_stats().compute_infer().count(), 3u);
  EXPECT_GT(stats.last_inference(), 0u);
  grpc::ClientContext ctx;
  inference::ModelStatisticsRequest req;
  req.set_name("nope");
  inference::ModelStatisticsResponse resp;
  EXPECT_EQ(stub_->ModelStatistics(&ctx, req, &resp).error_code(), grpc::NOT_FOUND);

  // One bad request, then the Prometheus exposition holds exactly what was sent.
  ModelInferRequest bad = MakeRequest(RandomInputs(1, 3, 2, 89), "m");
  bad.mutable_inputs(0)->set_datatype("INT8");
  ModelInferResponse bad_resp;
  EXPECT_EQ(Infer(bad, &bad_resp).error_code(), grpc::INVALID_ARGUMENT);
  const std::string text = server_->metrics()->Exposition();
  for (const std::string line : {
           std::string("mmdit_request_success_total{model=\"m\"} 3"),
           std::string("mmdit_request_failure_total{model=\"m\",reason=\"invalid_argument\"} 1"),
           absl::StrCat("mmdit_inference_count_total{model=\"m\"} ", samples),
           std::string("mmdit_inference_exec_count_total{model=\"m\"} 3"),
           std::string("mmdit_batch_size_count{model=\"m\"} 3"),
           std::string("mmdit_queue_duration_seconds_count{model=\"m\"} 3"),
           std::string("mmdit_request_duration_seconds_count{model=\"m\"} 4"),
           std::string("mmdit_pending_requests{model=\"m\"} 0"),
           std::string("mmdit_model_load_state{model=\"m\",state=\"ready\"} 1"),
       }) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << line << "\n" << text;
  }
}

// ---- shutdown ----

TEST_F(ServerTest, ShutdownFinishesQueuedAndRunningWorkAndRefusesNewWork) {
  auto model = SmallModel("m", 1);
  StartModels({model}, GatedFactory());
  gate_.Set(false);
  const Inputs in = RandomInputs(1, 3, 2, 91);
  const ModelInferRequest req = MakeRequest(in, "m");
  std::atomic<int> ok{0};
  std::vector<std::thread> in_flight;
  for (int i = 0; i < 3; ++i) {
    in_flight.emplace_back([&] {
      ModelInferResponse resp;
      grpc::Status s = Infer(req, &resp);
      EXPECT_TRUE(s.ok()) << s.error_message();
      if (s.ok()) ++ok;
    });
  }
  ASSERT_TRUE(gate_.WaitRunning(1));
  ASSERT_TRUE(WaitQueued("m", 2));
  std::thread stopper([&] { server_->Shutdown(absl::Seconds(30)); });
  // New work is refused while the drain runs.
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (server_->ready() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_FALSE(server_->ready());
  ModelInferResponse refused_resp;
  grpc::Status refused = Infer(req, &refused_resp, absl::Seconds(5));
  EXPECT_EQ(refused.error_code(), grpc::UNAVAILABLE) << refused.error_message();
  gate_.Set(true);
  for (std::thread& t : in_flight) t.join();
  stopper.join();
  EXPECT_EQ(ok.load(), 3);
}

}  // namespace
}  // namespace mmdit
