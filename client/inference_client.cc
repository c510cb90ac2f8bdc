#include "client/inference_client.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"

namespace mmdit {
namespace {

// The model's inputs in the order the server documents them; the first three are required.
constexpr const char* kInputNames[] = {"x", "y", "context", "attn_mask", "start_pos"};
constexpr int kRequiredInputs = 3;

absl::StatusOr<int64_t> ElementCount(const InferTensor& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", t.name, " has a negative dimension in ", ShapeString(t.shape)));
    }
    if (d != 0 && n > (int64_t{1} << 40) / d) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, " is too large: ",
                                                     ShapeString(t.shape)));
    }
    n *= d;
  }
  return n;
}

absl::Status CheckSize(const InferTensor& t) {
  const int size = DatatypeSize(t.datatype);
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", t.name, " has an unsupported datatype \"", t.datatype, "\""));
  }
  absl::StatusOr<int64_t> n = ElementCount(t);
  if (!n.ok()) return n.status();
  if (static_cast<int64_t>(t.data.size()) != *n * size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", t.name, " ", t.datatype, ShapeString(t.shape), " needs ", *n * size,
        " bytes; has ", t.data.size()));
  }
  return absl::OkStatus();
}

template <typename T, typename Field>
void AppendTyped(const std::string& data, Field* field) {
  const size_t n = data.size() / sizeof(T);
  field->Reserve(static_cast<int>(n));
  for (size_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, data.data() + i * sizeof(T), sizeof(T));
    field->Add(v);
  }
}

template <typename T, typename Field>
std::string BytesOf(const Field& field) {
  std::string out(field.size() * sizeof(T), '\0');
  for (int i = 0; i < field.size(); ++i) {
    const T v = static_cast<T>(field.Get(i));
    std::memcpy(out.data() + i * sizeof(T), &v, sizeof(T));
  }
  return out;
}

absl::Status SetTypedContents(const InferTensor& t, inference::InferTensorContents* c) {
  if (t.datatype == "FP32") {
    AppendTyped<float>(t.data, c->mutable_fp32_contents());
  } else if (t.datatype == "FP64") {
    AppendTyped<double>(t.data, c->mutable_fp64_contents());
  } else if (t.datatype == "INT64") {
    AppendTyped<int64_t>(t.data, c->mutable_int64_contents());
  } else if (t.datatype == "INT32") {
    AppendTyped<int32_t>(t.data, c->mutable_int_contents());
  } else if (t.datatype == "UINT8") {
    AppendTyped<uint8_t>(t.data, c->mutable_uint_contents());
  } else if (t.datatype == "BOOL") {
    for (char b : t.data) c->add_bool_contents(b != 0);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", t.name, " is ", t.datatype,
        ", which has no typed contents field in the protocol; send it raw"));
  }
  return absl::OkStatus();
}

// The bytes of typed contents of `datatype`.
absl::StatusOr<std::string> TypedBytes(const std::string& name, const std::string& datatype,
                                       const inference::InferTensorContents& c) {
  if (datatype == "FP32") return BytesOf<float>(c.fp32_contents());
  if (datatype == "FP64") return BytesOf<double>(c.fp64_contents());
  if (datatype == "INT64") return BytesOf<int64_t>(c.int64_contents());
  if (datatype == "INT32") return BytesOf<int32_t>(c.int_contents());
  if (datatype == "UINT8") return BytesOf<uint8_t>(c.uint_contents());
  if (datatype == "BOOL") return BytesOf<uint8_t>(c.bool_contents());
  return absl::InvalidArgumentError(
      absl::StrCat("output ", name, " is ", datatype, " without raw_output_contents"));
}

}  // namespace

absl::StatusOr<std::string> DatatypeOf(DType dtype) {
  switch (dtype) {
    case DType::kF32: return std::string("FP32");
    case DType::kF16: return std::string("FP16");
    case DType::kBF16: return std::string("BF16");
    case DType::kF64: return std::string("FP64");
    case DType::kI64: return std::string("INT64");
    case DType::kI32: return std::string("INT32");
    case DType::kBool: return std::string("BOOL");
    case DType::kU8: return std::string("UINT8");
  }
  return absl::InvalidArgumentError("unknown dtype");
}

absl::StatusOr<DType> DTypeOf(const std::string& datatype) {
  if (datatype == "FP32") return DType::kF32;
  if (datatype == "FP16") return DType::kF16;
  if (datatype == "BF16") return DType::kBF16;
  if (datatype == "FP64") return DType::kF64;
  if (datatype == "INT64") return DType::kI64;
  if (datatype == "INT32") return DType::kI32;
  if (datatype == "BOOL") return DType::kBool;
  if (datatype == "UINT8") return DType::kU8;
  return absl::InvalidArgumentError(
      absl::StrCat("datatype \"", datatype, "\" has no safetensors dtype"));
}

int DatatypeSize(const std::string& datatype) {
  if (datatype == "FP32" || datatype == "INT32") return 4;
  if (datatype == "FP16" || datatype == "BF16") return 2;
  if (datatype == "FP64" || datatype == "INT64") return 8;
  if (datatype == "BOOL" || datatype == "UINT8") return 1;
  return 0;
}

absl::StatusOr<std::vector<InferTensor>> InputsFromSafetensors(
    const SafetensorsFile& file, std::vector<std::string>* skipped) {
  std::vector<InferTensor> inputs;
  for (int i = 0; i < static_cast<int>(std::size(kInputNames)); ++i) {
    const std::string name = kInputNames[i];
    auto it = file.tensors().find(name);
    if (it == file.tensors().end()) {
      if (i < kRequiredInputs) {
        return absl::InvalidArgumentError(
            absl::StrCat(file.name(), " has no tensor \"", name, "\" (x, y and context are "
                         "required; attn_mask and start_pos are optional)"));
      }
      continue;
    }
    absl::StatusOr<std::string> datatype = DatatypeOf(it->second.dtype);
    if (!datatype.ok()) return datatype.status();
    InferTensor t;
    t.name = name;
    t.datatype = *datatype;
    t.shape = it->second.shape;
    t.data.assign(reinterpret_cast<const char*>(it->second.bytes.data()), it->second.bytes.size());
    inputs.push_back(std::move(t));
  }
  if (skipped != nullptr) {
    for (const auto& [name, view] : file.tensors()) {
      bool known = false;
      for (const char* input : kInputNames) known = known || name == input;
      if (!known) skipped->push_back(name);
    }
  }
  return inputs;
}

absl::Status AddToSafetensors(absl::Span<const InferTensor> tensors, SafetensorsWriter* writer) {
  for (const InferTensor& t : tensors) {
    absl::StatusOr<DType> dtype = DTypeOf(t.datatype);
    if (!dtype.ok()) return dtype.status();
    if (absl::Status s = CheckSize(t); !s.ok()) return s;
    writer->Add(t.name, *dtype, t.shape,
                absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(t.data.data()),
                                    t.data.size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<inference::ModelInferRequest> BuildInferRequest(
    const std::string& model, absl::Span<const InferTensor> inputs, TensorEncoding encoding,
    absl::Duration queue_timeout) {
  inference::ModelInferRequest request;
  request.set_model_name(model);
  if (queue_timeout > absl::ZeroDuration()) {
    (*request.mutable_parameters())["timeout"].set_int64_param(
        absl::ToInt64Microseconds(queue_timeout));
  }
  for (const InferTensor& t : inputs) {
    if (absl::Status s = CheckSize(t); !s.ok()) return s;
    auto* input = request.add_inputs();
    input->set_name(t.name);
    input->set_datatype(t.datatype);
    for (int64_t d : t.shape) input->add_shape(d);
    if (encoding == TensorEncoding::kRaw) {
      request.add_raw_input_contents(t.data);
    } else if (absl::Status s = SetTypedContents(t, input->mutable_contents()); !s.ok()) {
      return s;
    }
  }
  return request;
}

absl::StatusOr<std::vector<InferTensor>> DecodeInferResponse(
    const inference::ModelInferResponse& response) {
  const int n = response.outputs_size();
  const bool raw = response.raw_output_contents_size() > 0;
  if (raw && response.raw_output_contents_size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "answer has ", n, " outputs but ", response.raw_output_contents_size(),
        " raw_output_contents entries"));
  }
  std::vector<InferTensor> outputs;
  for (int i = 0; i < n; ++i) {
    const auto& o = response.outputs(i);
    InferTensor t;
    t.name = o.name();
    t.datatype = o.datatype();
    t.shape.assign(o.shape().begin(), o.shape().end());
    if (raw) {
      t.data = response.raw_output_contents(i);
    } else {
      absl::StatusOr<std::string> bytes = TypedBytes(t.name, t.datatype, o.contents());
      if (!bytes.ok()) return bytes.status();
      t.data = *std::move(bytes);
    }
    if (absl::Status s = CheckSize(t); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("answer: ", s.message()));
    }
    outputs.push_back(std::move(t));
  }
  return outputs;
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // grpc::StatusCode and absl::StatusCode share their numbering (both follow google.rpc.Code).
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::StatusOr<std::unique_ptr<InferenceClient>> InferenceClient::Create(const Options& options) {
  if (options.address.empty()) {
    return absl::InvalidArgumentError("address must be host:port; was empty");
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be positive; was ", options.max_message_bytes));
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.own_connection) {
    // Channels with equal arguments share a connection; a private pool keeps them apart.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  }
  auto channel = grpc::CreateCustomChannel(options.address, grpc::InsecureChannelCredentials(),
                                           args);
  return std::unique_ptr<InferenceClient>(new InferenceClient(options.address, channel));
}

absl::StatusOr<inference::ModelInferResponse> InferenceClient::ModelInfer(
    const inference::ModelInferRequest& request, absl::Duration timeout) {
  grpc::ClientContext context;
  if (timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  inference::ModelInferResponse response;
  const grpc::Status status = stub_->ModelInfer(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<std::vector<InferTensor>> InferenceClient::Infer(
    const std::string& model, absl::Span<const InferTensor> inputs, TensorEncoding encoding,
    absl::Duration timeout) {
  absl::StatusOr<inference::ModelInferRequest> request =
      BuildInferRequest(model, inputs, encoding);
  if (!request.ok()) return request.status();
  absl::StatusOr<inference::ModelInferResponse> response = ModelInfer(*request, timeout);
  if (!response.ok()) return response.status();
  return DecodeInferResponse(*response);
}

absl::Status InferenceClient::WaitForReady(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status last = absl::DeadlineExceededError("server not ready");
  while (absl::Now() < deadline) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(2))));
    context.set_wait_for_ready(true);
    inference::ServerReadyRequest request;
    inference::ServerReadyResponse response;
    const grpc::Status status = stub_->ServerReady(&context, request, &response);
    if (status.ok() && response.ready()) return absl::OkStatus();
    last = status.ok() ? absl::UnavailableError("server answers not ready")
                       : FromGrpcStatus(status);
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("server not ready within ", absl::FormatDuration(timeout), ": ",
                   last.message()));
}

absl::Status InferenceClient::WaitForConnected(absl::Duration timeout) {
  if (channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout))) {
    return absl::OkStatus();
  }
  return absl::UnavailableError(absl::StrCat("could not connect to ", address_, " within ",
                                             absl::FormatDuration(timeout)));
}

absl::StatusOr<inference::ModelMetadataResponse> InferenceClient::ModelMetadata(
    const std::string& model, absl::Duration timeout) {
  grpc::ClientContext context;
  if (timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  inference::ModelMetadataRequest request;
  request.set_name(model);
  inference::ModelMetadataResponse response;
  const grpc::Status status = stub_->ModelMetadata(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

}  // namespace mmdit
