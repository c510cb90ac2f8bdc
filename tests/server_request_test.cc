// The request decoder on its own: FP32 data is viewed in the protobuf, not copied (raw and typed),
// FP32 outputs move into the response without a copy, 16-bit floats are widened exactly, and the
// samples carry the right offsets, masks and start positions.
#include "server/infer_request.h"

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/half_float.h"

namespace mmdit {
namespace {

using inference::ModelInferRequest;

ModelSignature Signature() {
  ModelSignature s;
  s.name = "m";
  s.config.dim = 8;
  s.config.num_heads = 2;
  s.config.dim_feedforward = 16;
  s.config.num_layers = 1;
  s.config.max_seq_len = 32;
  s.max_batch_size = 4;
  return s;
}

std::vector<float> Iota(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i);
  return v;
}

void AddRaw(ModelInferRequest& r, const char* name, const char* type, std::vector<int64_t> shape,
            const void* data, size_t bytes) {
  auto* t = r.add_inputs();
  t->set_name(name);
  t->set_datatype(type);
  for (int64_t d : shape) t->add_shape(d);
  r.add_raw_input_contents(std::string(static_cast<const char*>(data), bytes));
}

// B = 2, L = 3, C = 2, D = 8, with a mask and start positions.
ModelInferRequest RawRequest() {
  ModelInferRequest r;
  r.set_model_name("m");
  r.set_id("abc");
  const std::vector<float> x = Iota(2 * 3 * 8, 0.5f), y = Iota(2 * 8, 0.25f),
                           c = Iota(2 * 2 * 8, 0.125f);
  std::vector<uint8_t> mask(2 * 3 * 3, 1);
  mask[1 * 9 + 0 * 3 + 2] = 0;
  const std::vector<int64_t> start_pos = {5, 29};
  AddRaw(r, "x", "FP32", {2, 3, 8}, x.data(), x.size() * 4);
  AddRaw(r, "y", "FP32", {2, 1, 8}, y.data(), y.size() * 4);
  AddRaw(r, "context", "FP32", {2, 2, 8}, c.data(), c.size() * 4);
  AddRaw(r, "attn_mask", "BOOL", {2, 3, 3}, mask.data(), mask.size());
  AddRaw(r, "start_pos", "INT64", {2}, start_pos.data(), start_pos.size() * 8);
  return r;
}

TEST(InferRequestTest, RawFp32InputsAreViewedInPlace) {
  const ModelInferRequest r = RawRequest();
  absl::StatusOr<std::unique_ptr<InferRequest>> d = InferRequest::Decode(r, Signature());
  ASSERT_TRUE(d.ok()) << d.status();
  const InferRequest& req = **d;
  EXPECT_EQ(req.batch_size(), 2);
  EXPECT_EQ(req.seq_len(), 3);
  EXPECT_EQ(req.context_len(), 2);
  EXPECT_EQ(req.id(), "abc");
  EXPECT_EQ(req.float_type(), WireFloat::kFp32);
  const auto s = req.samples();
  EXPECT_EQ(reinterpret_cast<const char*>(s[0].x), r.raw_input_contents(0).data());
  EXPECT_EQ(s[1].x, s[0].x + 3 * 8);
  EXPECT_EQ(reinterpret_cast<const char*>(s[0].y), r.raw_input_contents(1).data());
  EXPECT_EQ(s[1].y, s[0].y + 8);
  EXPECT_EQ(reinterpret_cast<const char*>(s[0].context), r.raw_input_contents(2).data());
  EXPECT_EQ(s[1].context, s[0].context + 2 * 8);
  EXPECT_EQ(reinterpret_cast<const char*>(s[0].attn_mask), r.raw_input_contents(3).data());
  EXPECT_EQ(s[1].attn_mask, s[0].attn_mask + 9);
  EXPECT_EQ(s[1].attn_mask[2], 0);
  EXPECT_EQ(s[0].start_pos, 5);
  EXPECT_EQ(s[1].start_pos, 29);
  EXPECT_EQ(s[1].x_out, s[0].x_out + 3 * 8);
  EXPECT_EQ(s[1].context_out, s[0].context_out + 2 * 8);
}

TEST(InferRequestTest, TypedFp32InputsAreViewedInPlace) {
  ModelInferRequest r;
  r.set_model_name("m");
  auto add = [&](const char* name, std::vector<int64_t> shape, size_t n) {
    auto* t = r.add_inputs();
    t->set_name(name);
    t->set_datatype("FP32");
    for (int64_t d : shape) t->add_shape(d);
    for (float v : Iota(n, 0.1f)) t->mutable_contents()->add_fp32_contents(v);
    return t;
  };
  add("x", {1, 2, 8}, 16);
  add("y", {1, 8}, 8);  // [B, D] is accepted as well
  add("context", {1, 1, 8}, 8);
  absl::StatusOr<std::unique_ptr<InferRequest>> d = InferRequest::Decode(r, Signature());
  ASSERT_TRUE(d.ok()) << d.status();
  const auto s = (*d)->samples();
  EXPECT_EQ(s[0].x, r.inputs(0).contents().fp32_contents().data());
  EXPECT_EQ(s[0].y, r.inputs(1).contents().fp32_contents().data());
  EXPECT_EQ(s[0].context, r.inputs(2).contents().fp32_contents().data());
  EXPECT_EQ(s[0].attn_mask, nullptr);
  EXPECT_EQ(s[0].start_pos, 0);
}

TEST(InferRequestTest, Fp32OutputsMoveIntoTheResponse) {
  const ModelInferRequest r = RawRequest();
  std::unique_ptr<InferRequest> req = *InferRequest::Decode(r, Signature());
  const float* x_out = req->samples()[0].x_out;
  const float* context_out = req->samples()[0].context_out;
  for (const ForwardSample& s : req->samples()) {
    for (int i = 0; i < s.seq_len * 8; ++i) s.x_out[i] = 1.5f;
    for (int i = 0; i < s.context_len * 8; ++i) s.context_out[i] = -2.0f;
  }
  inference::ModelInferResponse resp;
  req->MoveOutputsTo(&resp);
  ASSERT_EQ(resp.outputs_size(), 2);
  EXPECT_EQ(resp.outputs(0).name(), "x_out");
  EXPECT_EQ(resp.outputs(1).name(), "context_out");
  EXPECT_EQ(resp.outputs(0).datatype(), "FP32");
  EXPECT_EQ(std::vector<int64_t>(resp.outputs(0).shape().begin(), resp.outputs(0).shape().end()),
            (std::vector<int64_t>{2, 3, 8}));
  EXPECT_EQ(std::vector<int64_t>(resp.outputs(1).shape().begin(), resp.outputs(1).shape().end()),
            (std::vector<int64_t>{2, 2, 8}));
  // The very buffers the forward wrote.
  EXPECT_EQ(resp.raw_output_contents(0).data(), reinterpret_cast<const char*>(x_out));
  EXPECT_EQ(resp.raw_output_contents(1).data(), reinterpret_cast<const char*>(context_out));
  float v;
  std::memcpy(&v, resp.raw_output_contents(1).data() + 4 * 31, 4);
  EXPECT_EQ(v, -2.0f);
}

TEST(InferRequestTest, SixteenBitInputsAreWidenedAndOutputsNarrowed) {
  for (const char* type : {"FP16", "BF16"}) {
    SCOPED_TRACE(type);
    const bool fp16 = std::string(type) == "FP16";
    auto half = [&](const std::vector<float>& v) {
      std::vector<uint16_t> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = fp16 ? FloatToFp16(v[i]) : FloatToBf16(v[i]);
      return h;
    };
    const std::vector<uint16_t> x = half(Iota(8, 0.3f)), y = half(Iota(8, -0.2f)),
                                c = half(Iota(16, 0.01f));
    ModelInferRequest r;
    AddRaw(r, "x", type, {1, 1, 8}, x.data(), x.size() * 2);
    AddRaw(r, "y", type, {1, 1, 8}, y.data(), y.size() * 2);
    AddRaw(r, "context", type, {1, 2, 8}, c.data(), c.size() * 2);
    r.add_outputs()->set_name("context_out");
    std::unique_ptr<InferRequest> req = *InferRequest::Decode(r, Signature());
    const ForwardSample& s = req->samples()[0];
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(s.x[i], fp16 ? Fp16ToFloat(x[i]) : Bf16ToFloat(x[i]));
      EXPECT_EQ(s.y[i], fp16 ? Fp16ToFloat(y[i]) : Bf16ToFloat(y[i]));
    }
    for (int i = 0; i < 16; ++i) s.context_out[i] = 0.75f;  // exact in both formats
    inference::ModelInferResponse resp;
    req->MoveOutputsTo(&resp);
    ASSERT_EQ(resp.outputs_size(), 1);
    EXPECT_EQ(resp.outputs(0).name(), "context_out");
    EXPECT_EQ(resp.outputs(0).datatype(), type);
    ASSERT_EQ(resp.raw_output_contents(0).size(), 16u * 2);
    uint16_t h;
    std::memcpy(&h, resp.raw_output_contents(0).data(), 2);
    EXPECT_EQ(fp16 ? Fp16ToFloat(h) : Bf16ToFloat(h), 0.75f);
  }
}

TEST(InferRequestTest, TimeoutParameterInMicroseconds) {
  ModelInferRequest r = RawRequest();
  (*r.mutable_parameters())["timeout"].set_int64_param(2500);
  (*r.mutable_parameters())["priority"].set_int64_param(3);  // meaningless here: ignored
  std::unique_ptr<InferRequest> req = *InferRequest::Decode(r, Signature());
  EXPECT_EQ(req->timeout_micros(), 2500);
  (*r.mutable_parameters())["timeout"].set_uint64_param(7);
  EXPECT_EQ((*InferRequest::Decode(r, Signature()))->timeout_micros(), 7);
  (*r.mutable_parameters())["timeout"].set_int64_param(-1);
  absl::StatusOr<std::unique_ptr<InferRequest>> bad = InferRequest::Decode(r, Signature());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'timeout' must not be negative"), std::string::npos);
}

TEST(InferRequestTest, HugeShapesAreRejectedBeforeAnyAllocation) {
  ModelInferRequest r = RawRequest();
  r.mutable_inputs(2)->set_shape(1, int64_t{1} << 40);
  absl::StatusOr<std::unique_ptr<InferRequest>> d = InferRequest::Decode(r, Signature());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(d.status().message().find("input 'context'"), std::string::npos) << d.status();
  r = RawRequest();
  r.mutable_inputs(0)->set_shape(1, 33);  // L beyond max_seq_len
  d = InferRequest::Decode(r, Signature());
  EXPECT_NE(d.status().message().find("L = 33 exceeds the model's max_seq_len 32"),
            std::string::npos)
      << d.status();
}

}  // namespace
}  // namespace mmdit
