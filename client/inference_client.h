// A client of the Open Inference Protocol service: builds ModelInferRequest messages from named
// tensors (raw bytes or typed contents), sends them over gRPC with a deadline, and decodes the
// answer back into named tensors. mmdit-client and mmdit-loadgen are thin shells around it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "grpcpp/channel.h"
#include "proto/grpc_service.grpc.pb.h"
#include "kernels/safetensors.h"

namespace mmdit {

// One tensor as the protocol names it: OIP datatype ("FP32", "BF16", "FP16", "BOOL", "INT64", …),
// shape, and little-endian row-major bytes.
struct InferTensor {
  std::string name;
  std::string datatype;
  std::vector<int64_t> shape;
  std::string data;
};

// The OIP datatype of a safetensors dtype and back; InvalidArgument for those with no match.
absl::StatusOr<std::string> DatatypeOf(DType dtype);
absl::StatusOr<DType> DTypeOf(const std::string& datatype);
// Bytes per element of an OIP datatype; 0 for unknown ones.
int DatatypeSize(const std::string& datatype);

enum class TensorEncoding {
  kRaw,    // raw_input_contents, one entry per input (every datatype)
  kTyped,  // contents.fp32_contents, bool_contents, int64_contents, … (no FP16/BF16)
};

// The model's inputs from a safetensors file: x, y, context and, when present, attn_mask and
// start_pos, in that order. Other tensors are skipped and named in `*skipped` when given.
absl::StatusOr<std::vector<InferTensor>> InputsFromSafetensors(const SafetensorsFile& file,
                                                               std::vector<std::string>* skipped);
// Writes tensors into a safetensors file in memory (serialize or write it with the writer).
absl::Status AddToSafetensors(absl::Span<const InferTensor> tensors, SafetensorsWriter* writer);

// Builds a request; checks that each tensor's byte size matches its datatype and shape.
// `queue_timeout` > 0 sets Triton's "timeout" parameter (microseconds in the server's queue).
absl::StatusOr<inference::ModelInferRequest> BuildInferRequest(
    const std::string& model, absl::Span<const InferTensor> inputs, TensorEncoding encoding,
    absl::Duration queue_timeout = absl::ZeroDuration());

// The outputs of an answer, from raw_output_contents or from typed contents; checks sizes.
absl::StatusOr<std::vector<InferTensor>> DecodeInferResponse(
    const inference::ModelInferResponse& response);

// grpc::Status to absl::Status, same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

class InferenceClient {
 public:
  struct Options {
    // host:port of the server's gRPC endpoint.
    std::string address = "127.0.0.1:8001";
    // 256 MiB, as the server's default: a batch of 512 at the target shape fits.
    int max_message_bytes = 256 << 20;
    // Give each client its own connection instead of sharing one with other clients of the same
    // address in this process (load generation wants separate connections).
    bool own_connection = false;
  };

  static absl::StatusOr<std::unique_ptr<InferenceClient>> Create(const Options& options);

  // One ModelInfer call; `timeout` becomes the gRPC deadline (infinite: none).
  absl::StatusOr<inference::ModelInferResponse> ModelInfer(
      const inference::ModelInferRequest& request, absl::Duration timeout);

  // Builds, sends and decodes.
  absl::StatusOr<std::vector<InferTensor>> Infer(const std::string& model,
                                                 absl::Span<const InferTensor> inputs,
                                                 TensorEncoding encoding, absl::Duration timeout);

  // Polls ServerReady until it answers true or `timeout` passes (DeadlineExceeded).
  absl::Status WaitForReady(absl::Duration timeout);

  // Connects this client's channel, retrying as gRPC backs off, until it is ready or `timeout`
  // passes (Unavailable, naming the address). A call on a channel whose connection attempt just
  // failed fails at once instead of waiting for the next attempt.
  absl::Status WaitForConnected(absl::Duration timeout);

  absl::StatusOr<inference::ModelMetadataResponse> ModelMetadata(const std::string& model,
                                                                 absl::Duration timeout);

 private:
  InferenceClient(std::string address, std::shared_ptr<grpc::Channel> channel)
      : address_(std::move(address)),
        channel_(std::move(channel)),
        stub_(inference::GRPCInferenceService::NewStub(channel_)) {}
  const std::string address_;
  const std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
};

}  // namespace mmdit
