#include "server/infer_request.h"

#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/half_float.h"

namespace mmdit {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "raw tensor contents are little-endian and viewed in place");

using inference::InferTensorContents;
using inference::ModelInferRequest;
using InputTensor = inference::ModelInferRequest::InferInputTensor;

// Far above any real request (the message size limit bounds the data long before this); it only
// keeps the element-count arithmetic from overflowing on hostile shapes.
constexpr int64_t kMaxElements = int64_t{1} << 40;

template <typename... Parts>
absl::Status Invalid(const Parts&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(parts...));
}

std::string ShapeStr(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool HasTypedContents(const InferTensorContents& c) {
  return c.bool_contents_size() > 0 || c.int_contents_size() > 0 ||
         c.int64_contents_size() > 0 || c.uint_contents_size() > 0 ||
         c.uint64_contents_size() > 0 || c.fp32_contents_size() > 0 ||
         c.fp64_contents_size() > 0 || c.bytes_contents_size() > 0;
}

// The typed field that holds `datatype`'s elements, for messages.
const char* TypedFieldFor(const std::string& datatype) {
  if (datatype == "FP32") return "fp32_contents";
  if (datatype == "BOOL") return "bool_contents";
  if (datatype == "INT64") return "int64_contents";
  return nullptr;
}

absl::StatusOr<WireFloat> ParseFloatType(const std::string& datatype) {
  if (datatype == "FP32") return WireFloat::kFp32;
  if (datatype == "FP16") return WireFloat::kFp16;
  if (datatype == "BF16") return WireFloat::kBf16;
  return absl::InvalidArgumentError("not a float type");
}

// One named input of the request and where its data is.
struct Input {
  const InputTensor* tensor = nullptr;
  int index = -1;  // position in inputs (and in raw_input_contents)
};

class Decoder {
 public:
  explicit Decoder(const ModelInferRequest& request)
      : request_(request), raw_(request.raw_input_contents_size() > 0) {}

  // Checks the element count of `input` (its shape was checked) and returns its raw bytes, or
  // an empty view for typed contents after checking the typed field's count.
  absl::StatusOr<absl::string_view> Bytes(const Input& input, int64_t elements,
                                          int element_size) const {
    const InputTensor& t = *input.tensor;
    if (raw_) {
      const std::string& bytes = request_.raw_input_contents(input.index);
      const int64_t need = elements * element_size;
      if (static_cast<int64_t>(bytes.size()) != need) {
        return Invalid("input '", t.name(), "': raw_input_contents[", input.index, "] holds ",
                       bytes.size(), " bytes, but shape ", ShapeStr(t.shape()), " of ",
                       t.datatype(), " needs ", need, " (", element_size,
                       " bytes per element)");
      }
      return absl::string_view(bytes);
    }
    const char* field = TypedFieldFor(t.datatype());
    if (field == nullptr) {
      return Invalid("input '", t.name(), "': ", t.datatype(),
                     " data has no typed contents field; send it in raw_input_contents");
    }
    int64_t have = 0;
    if (t.datatype() == "FP32") have = t.contents().fp32_contents_size();
    if (t.datatype() == "BOOL") have = t.contents().bool_contents_size();
    if (t.datatype() == "INT64") have = t.contents().int64_contents_size();
    if (have != elements) {
      return Invalid("input '", t.name(), "': contents.", field, " holds ", have,
                     " values, but shape ", ShapeStr(t.shape()), " needs ", elements);
    }
    return absl::string_view();
  }

  // The tensor as float32: a view of the request where it can, else converted into *copy.
  absl::StatusOr<const float*> Floats(const Input& input, WireFloat type, int64_t elements,
                                      std::vector<float>* copy) const {
    const int element_size = type == WireFloat::kFp32 ? 4 : 2;
    absl::StatusOr<absl::string_view> bytes = Bytes(input, elements, element_size);
    if (!bytes.ok()) return bytes.status();
    if (!raw_) return input.tensor->contents().fp32_contents().data();
    const char* p = bytes->data();
    if (type == WireFloat::kFp32) {
      if (reinterpret_cast<uintptr_t>(p) % alignof(float) == 0) {
        return reinterpret_cast<const float*>(p);
      }
      copy->resize(elements);
      std::memcpy(copy->data(), p, elements * sizeof(float));
      return copy->data();
    }
    copy->resize(elements);
    for (int64_t i = 0; i < elements; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      (*copy)[i] = type == WireFloat::kFp16 ? Fp16ToFloat(h) : Bf16ToFloat(h);
    }
    return copy->data();
  }

  bool raw() const { return raw_; }

 private:
  const ModelInferRequest& request_;
  const bool raw_;
};

absl::Status CheckDims(const InputTensor& t) {
  int64_t elements = 1;
  for (int64_t d : t.shape()) {
    if (d < 0) {
      return Invalid("input '", t.name(), "': shape ", ShapeStr(t.shape()),
                     " has a negative dimension");
    }
    if (d > 0 && elements > kMaxElements / d) {
      return Invalid("input '", t.name(), "': shape ", ShapeStr(t.shape()), " is too large");
    }
    elements *= d;
  }
  return absl::OkStatus();
}

}  // namespace

const char* WireFloatName(WireFloat type) {
  switch (type) {
    case WireFloat::kFp32:
      return "FP32";
    case WireFloat::kFp16:
      return "FP16";
    case WireFloat::kBf16:
      return "BF16";
  }
  return "FP32";
}

absl::StatusOr<std::unique_ptr<InferRequest>> InferRequest::Decode(
    const ModelInferRequest& request, const ModelSignature& model) {
  std::unique_ptr<InferRequest> decoded(new InferRequest());
  if (absl::Status s = decoded->DecodeFrom(request, model); !s.ok()) return s;
  return decoded;
}

absl::StatusOr<std::unique_ptr<InferRequest>> InferRequest::Decode(
    std::shared_ptr<const ModelInferRequest> request, const ModelSignature& model) {
  std::unique_ptr<InferRequest> decoded(new InferRequest());
  if (absl::Status s = decoded->DecodeFrom(*request, model); !s.ok()) return s;
  decoded->owned_request_ = std::move(request);
  return decoded;
}

absl::Status InferRequest::DecodeFrom(const ModelInferRequest& req, const ModelSignature& model) {
  const MmditConfig& config = model.config;
  const int D = config.dim;
  dim_ = D;
  id_ = req.id();

  // Triton's per-request timeout, in microseconds. Other parameters (priority, sequence ids, …)
  // mean nothing to this model and are ignored, as Triton does for models that do not use them.
  if (auto it = req.parameters().find("timeout"); it != req.parameters().end()) {
    const inference::InferParameter& p = it->second;
    if (p.parameter_choice_case() == inference::InferParameter::kInt64Param) {
      timeout_micros_ = p.int64_param();
    } else if (p.parameter_choice_case() == inference::InferParameter::kUint64Param &&
               p.uint64_param() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      timeout_micros_ = static_cast<int64_t>(p.uint64_param());
    } else {
      return Invalid("parameter 'timeout' must be an int64 number of microseconds");
    }
    if (timeout_micros_ < 0) {
      return Invalid("parameter 'timeout' must not be negative; was ", timeout_micros_);
    }
  }

  Decoder decoder(req);
  if (decoder.raw() && req.raw_input_contents_size() != req.inputs_size()) {
    return Invalid("raw_input_contents has ", req.raw_input_contents_size(), " entries for ",
                   req.inputs_size(), " inputs; send one per input, in the order of inputs");
  }

  Input x, y, context, mask, start_pos;
  for (int i = 0; i < req.inputs_size(); ++i) {
    const InputTensor& t = req.inputs(i);
    Input* slot = nullptr;
    if (t.name() == "x") slot = &x;
    if (t.name() == "y") slot = &y;
    if (t.name() == "context") slot = &context;
    if (t.name() == "attn_mask") slot = &mask;
    if (t.name() == "start_pos") slot = &start_pos;
    if (slot == nullptr) {
      return Invalid("unknown input tensor '", t.name(),
                     "'; the model's inputs are x, y, context, attn_mask (optional) and "
                     "start_pos (optional)");
    }
    if (slot->tensor != nullptr) return Invalid("input tensor '", t.name(), "' appears twice");
    if (decoder.raw() && HasTypedContents(t.contents())) {
      return Invalid("input '", t.name(),
                     "' carries typed contents and the request also carries "
                     "raw_input_contents; send one or the other");
    }
    if (absl::Status s = CheckDims(t); !s.ok()) return s;
    slot->tensor = &t;
    slot->index = i;
  }
  if (x.tensor == nullptr) return Invalid("missing input tensor 'x' [B, L, ", D, "]");
  if (y.tensor == nullptr) return Invalid("missing input tensor 'y' [B, 1, ", D, "]");
  if (context.tensor == nullptr) {
    return Invalid("missing input tensor 'context' [B, C, ", D, "]");
  }

  // Datatypes.
  absl::StatusOr<WireFloat> float_type = ParseFloatType(x.tensor->datatype());
  if (!float_type.ok()) {
    return Invalid("input 'x': datatype '", x.tensor->datatype(),
                   "' is not supported; expected FP32, FP16 or BF16");
  }
  float_type_ = *float_type;
  for (const Input* in : {&y, &context}) {
    if (in->tensor->datatype() != x.tensor->datatype()) {
      return Invalid("input '", in->tensor->name(), "': datatype '", in->tensor->datatype(),
                     "' does not match x's ", x.tensor->datatype(),
                     "; x, y and context must share one float type");
    }
  }
  if (mask.tensor != nullptr && mask.tensor->datatype() != "BOOL") {
    return Invalid("input 'attn_mask': datatype '", mask.tensor->datatype(),
                   "' is not supported; expected BOOL");
  }
  if (start_pos.tensor != nullptr && start_pos.tensor->datatype() != "INT64") {
    return Invalid("input 'start_pos': datatype '", start_pos.tensor->datatype(),
                   "' is not supported; expected INT64");
  }

  // Shapes. x decides B and L.
  const auto& xs = x.tensor->shape();
  if (xs.size() != 3) {
    return Invalid("input 'x': expected shape [B, L, D] with D = ", D, ", got ", ShapeStr(xs));
  }
  const int64_t B = xs[0];
  const int64_t L = xs[1];
  if (xs[2] != D) {
    return Invalid("input 'x': D (dim 2) must be ", D, ", got ", xs[2], " in shape ",
                   ShapeStr(xs));
  }
  if (B < 1) return Invalid("input 'x': batch size B (dim 0) must be at least 1, got ", B);
  if (B > model.max_batch_size) {
    return Invalid("input 'x': batch size B = ", B, " exceeds the model's max_batch_size ",
                   model.max_batch_size);
  }
  if (L < 1) return Invalid("input 'x': L (dim 1) must be at least 1, got ", L);
  if (L > config.max_seq_len) {
    return Invalid("input 'x': L = ", L, " exceeds the model's max_seq_len ",
                   config.max_seq_len);
  }
  auto batch_mismatch = [&](const InputTensor& t) {
    return Invalid("input '", t.name(), "': batch size ", t.shape(0),
                   " (dim 0) does not match x's batch size ", B);
  };

  const auto& ys = y.tensor->shape();
  if (!ys.empty() && ys[0] != B) return batch_mismatch(*y.tensor);
  const bool y_ok = (ys.size() == 3 && ys[1] == 1 && ys[2] == D) || (ys.size() == 2 && ys[1] == D);
  if (!y_ok) {
    return Invalid("input 'y': expected shape [B, 1, D] = [", B, ", 1, ", D, "] or [B, D] = [",
                   B, ", ", D, "], got ", ShapeStr(ys));
  }

  const auto& cs = context.tensor->shape();
  if (cs.size() != 3) {
    return Invalid("input 'context': expected shape [B, C, D] = [", B, ", C, ", D, "], got ",
                   ShapeStr(cs));
  }
  if (cs[0] != B) return batch_mismatch(*context.tensor);
  if (cs[2] != D) {
    return Invalid("input 'context': D (dim 2) must be ", D, ", got ", cs[2], " in shape ",
                   ShapeStr(cs));
  }
  const int64_t C = cs[1];
  if (C < 1) return Invalid("input 'context': C (dim 1) must be at least 1, got ", C);
  if (C > std::numeric_limits<int>::max() / D) {
    return Invalid("input 'context': C = ", C, " is too large");
  }

  if (mask.tensor != nullptr) {
    const auto& ms = mask.tensor->shape();
    if (!ms.empty() && ms[0] != B) return batch_mismatch(*mask.tensor);
    if (ms.size() != 3 || ms[1] != L || ms[2] != L) {
      return Invalid("input 'attn_mask': expected shape [B, L, L] = [", B, ", ", L, ", ", L,
                     "], got ", ShapeStr(ms));
    }
  }
  if (start_pos.tensor != nullptr) {
    const auto& ss = start_pos.tensor->shape();
    if (!ss.empty() && ss[0] != B) return batch_mismatch(*start_pos.tensor);
    if (ss.size() != 1) {
      return Invalid("input 'start_pos': expected shape [B] = [", B, "], got ", ShapeStr(ss));
    }
  }

  // Data.
  absl::StatusOr<const float*> x_data = decoder.Floats(x, float_type_, B * L * D, &x_copy_);
  if (!x_data.ok()) return x_data.status();
  absl::StatusOr<const float*> y_data = decoder.Floats(y, float_type_, B * D, &y_copy_);
  if (!y_data.ok()) return y_data.status();
  absl::StatusOr<const float*> c_data =
      decoder.Floats(context, float_type_, B * C * D, &context_copy_);
  if (!c_data.ok()) return c_data.status();

  const uint8_t* mask_data = nullptr;
  if (mask.tensor != nullptr) {
    absl::StatusOr<absl::string_view> bytes = decoder.Bytes(mask, B * L * L, 1);
    if (!bytes.ok()) return bytes.status();
    if (decoder.raw()) {
      mask_data = reinterpret_cast<const uint8_t*>(bytes->data());
    } else {
      const auto& values = mask.tensor->contents().bool_contents();
      mask_copy_.assign(values.begin(), values.end());
      mask_data = mask_copy_.data();
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < L; ++i) {
        const uint8_t* row = mask_data + (b * L + i) * L;
        bool any = false;
        for (int64_t j = 0; j < L && !any; ++j) any = row[j] != 0;
        if (!any) {
          return Invalid("input 'attn_mask': row ", i, " of sample ", b,
                         " has no visible key (all False); every query must see at least one "
                         "key");
        }
      }
    }
  }

  start_pos_.assign(B, 0);
  if (start_pos.tensor != nullptr) {
    absl::StatusOr<absl::string_view> bytes = decoder.Bytes(start_pos, B, 8);
    if (!bytes.ok()) return bytes.status();
    if (decoder.raw()) {
      std::memcpy(start_pos_.data(), bytes->data(), B * sizeof(int64_t));
    } else {
      const auto& values = start_pos.tensor->contents().int64_contents();
      start_pos_.assign(values.begin(), values.end());
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = start_pos_[b];
      if (p < 0) return Invalid("input 'start_pos': start_pos[", b, "] = ", p, " must be >= 0");
      if (p > config.max_seq_len - L) {
        return Invalid("input 'start_pos': start_pos[", b, "] + L = ", p, " + ", L, " = ",
                       p + L, " exceeds the model's max_seq_len ", config.max_seq_len);
      }
    }
  }

  // Requested outputs.
  if (req.outputs_size() > 0) {
    want_x_out_ = want_context_out_ = false;
    for (const auto& out : req.outputs()) {
      bool* want = nullptr;
      if (out.name() == "x_out") want = &want_x_out_;
      if (out.name() == "context_out") want = &want_context_out_;
      if (want == nullptr) {
        return Invalid("unknown requested output '", out.name(),
                       "'; the model's outputs are x_out and context_out");
      }
      if (*want) return Invalid("requested output '", out.name(), "' appears twice");
      *want = true;
      output_order_.push_back(out.name());
    }
  } else {
    output_order_ = {"x_out", "context_out"};
  }

  seq_len_ = static_cast<int>(L);
  context_len_ = static_cast<int>(C);
  AllocateOutput(&x_out_, B * L * D);
  AllocateOutput(&context_out_, B * C * D);
  samples_.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    ForwardSample& s = samples_[b];
    s.seq_len = seq_len_;
    s.context_len = context_len_;
    s.x = *x_data + b * L * D;
    s.y = *y_data + b * D;
    s.context = *c_data + b * C * D;
    s.attn_mask = mask_data != nullptr ? mask_data + b * L * L : nullptr;
    s.start_pos = start_pos_[b];
    s.x_out = x_out_.data + b * L * D;
    s.context_out = context_out_.data + b * C * D;
    // The kernels' own rules, checked again so that no sample a worker rejects gets queued.
    if (absl::Status st = ValidateSample(config, s, static_cast<int>(b)); !st.ok()) return st;
  }
  return absl::OkStatus();
}

void InferRequest::AllocateOutput(OutputBuffer* out, int64_t elements) {
  out->elements = elements;
  if (float_type_ == WireFloat::kFp32) {
    out->raw.resize(elements * sizeof(float));
    if (reinterpret_cast<uintptr_t>(out->raw.data()) % alignof(float) == 0) {
      out->data = reinterpret_cast<float*>(out->raw.data());
      return;
    }
    out->raw.clear();
  }
  out->floats.resize(elements);
  out->data = out->floats.data();
}

void InferRequest::EncodeOutput(const char* name, OutputBuffer* out, std::vector<int64_t> shape,
                                inference::ModelInferResponse* response) {
  auto* tensor = response->add_outputs();
  tensor->set_name(name);
  tensor->set_datatype(WireFloatName(float_type_));
  for (int64_t d : shape) tensor->add_shape(d);
  if (float_type_ == WireFloat::kFp32 && !out->raw.empty() &&
      out->data == reinterpret_cast<float*>(out->raw.data())) {
    response->add_raw_output_contents(std::move(out->raw));
    return;
  }
  std::string* bytes = response->add_raw_output_contents();
  if (float_type_ == WireFloat::kFp32) {
    bytes->resize(out->elements * sizeof(float));
    std::memcpy(bytes->data(), out->data, out->elements * sizeof(float));
    return;
  }
  bytes->resize(out->elements * 2);
  for (int64_t i = 0; i < out->elements; ++i) {
    const uint16_t h = float_type_ == WireFloat::kFp16 ? FloatToFp16(out->data[i])
                                                       : FloatToBf16(out->data[i]);
    std::memcpy(bytes->data() + 2 * i, &h, 2);
  }
}

void InferRequest::MoveOutputsTo(inference::ModelInferResponse* response) {
  const int64_t B = batch_size();
  for (const std::string& name : output_order_) {
    if (name == "x_out") {
      EncodeOutput("x_out", &x_out_, {B, seq_len_, dim_}, response);
    } else {
      EncodeOutput("context_out", &context_out_, {B, context_len_, dim_}, response);
    }
  }
}

}  // namespace mmdit
