// Any bytes as a serialized ModelInferRequest into the request decoder: it must answer with an
// error, or with samples whose every input and output element lies inside memory it owns.
#include <cmath>
#include <cstring>

#include "google/protobuf/stubs/logging.h"
#include "kernels/half_float.h"
#include "server/infer_request.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

mmdit::ModelSignature Signature() {
  mmdit::ModelSignature s;
  s.name = "m";
  s.config.dim = 4;
  s.config.num_heads = 2;
  s.config.dim_feedforward = 8;
  s.config.num_layers = 1;
  s.config.max_seq_len = 64;
  s.max_batch_size = 4;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Mutated strings are often not UTF-8; protobuf logs each such parse, which only slows fuzzing.
  static const bool quiet = (google::protobuf::SetLogHandler(nullptr), true);
  (void)quiet;
  inference::ModelInferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const mmdit::ModelSignature sig = Signature();
  auto decoded = mmdit::InferRequest::Decode(request, sig);
  if (!decoded.ok()) return 0;
  const int d = sig.config.dim;
  volatile float sink = 0;
  for (const mmdit::ForwardSample& s : (*decoded)->samples()) {
    for (int i = 0; i < s.seq_len * d; ++i) sink = sink + s.x[i];
    for (int i = 0; i < s.context_len * d; ++i) sink = sink + s.context[i];
    for (int i = 0; i < d; ++i) sink = sink + s.y[i];
    if (s.attn_mask != nullptr) {
      for (int i = 0; i < s.seq_len * s.seq_len; ++i) sink = sink + s.attn_mask[i];
    }
    std::memset(s.x_out, 0, sizeof(float) * s.seq_len * d);
    std::memset(s.context_out, 0, sizeof(float) * s.context_len * d);
  }
  inference::ModelInferResponse response;
  (*decoded)->MoveOutputsTo(&response);
  return 0;
}

namespace mmdit::fuzz {
namespace {

void AddInput(inference::ModelInferRequest& r, const char* name, const char* datatype,
              std::vector<int64_t> shape) {
  auto* in = r.add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  for (int64_t d : shape) in->add_shape(d);
}

std::string Raw(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

}  // namespace

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  {  // raw FP32 with mask and start_pos
    inference::ModelInferRequest r;
    r.set_model_name("m");
    AddInput(r, "x", "FP32", {2, 3, 4});
    AddInput(r, "y", "FP32", {2, 1, 4});
    AddInput(r, "context", "FP32", {2, 2, 4});
    AddInput(r, "attn_mask", "BOOL", {2, 3, 3});
    AddInput(r, "start_pos", "INT64", {2});
    r.add_raw_input_contents(Raw(std::vector<float>(24, 0.5f)));
    r.add_raw_input_contents(Raw(std::vector<float>(8, -1.0f)));
    r.add_raw_input_contents(Raw(std::vector<float>(16, 2.0f)));
    r.add_raw_input_contents(std::string(18, '\1'));
    const int64_t pos[2] = {0, 5};
    r.add_raw_input_contents(std::string(reinterpret_cast<const char*>(pos), 16));
    r.add_outputs()->set_name("x_out");
    seeds.push_back(r.SerializeAsString());
  }
  {  // typed FP32, y as [B, D]
    inference::ModelInferRequest r;
    r.set_model_name("m");
    AddInput(r, "x", "FP32", {1, 2, 4});
    AddInput(r, "y", "FP32", {1, 4});
    AddInput(r, "context", "FP32", {1, 1, 4});
    for (int i = 0; i < 8; ++i) r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(i);
    for (int i = 0; i < 4; ++i) r.mutable_inputs(1)->mutable_contents()->add_fp32_contents(i);
    for (int i = 0; i < 4; ++i) r.mutable_inputs(2)->mutable_contents()->add_fp32_contents(i);
    (*r.mutable_parameters())["timeout"].set_int64_param(1000);
    seeds.push_back(r.SerializeAsString());
  }
  {  // raw BF16
    inference::ModelInferRequest r;
    r.set_model_name("m");
    AddInput(r, "x", "BF16", {1, 1, 4});
    AddInput(r, "y", "BF16", {1, 1, 4});
    AddInput(r, "context", "BF16", {1, 3, 4});
    const uint16_t one = FloatToBf16(1.0f);
    auto bf16 = [&](int n) {
      std::string s;
      for (int i = 0; i < n; ++i) s.append(reinterpret_cast<const char*>(&one), 2);
      return s;
    };
    r.add_raw_input_contents(bf16(4));
    r.add_raw_input_contents(bf16(4));
    r.add_raw_input_contents(bf16(12));
    seeds.push_back(r.SerializeAsString());
  }
  return seeds;
}

}  // namespace mmdit::fuzz
