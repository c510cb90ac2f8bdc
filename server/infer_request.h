// One decoded ModelInfer request: its tensors checked against the model and viewed as
// ForwardSamples, plus the output buffers the forward writes into. FP32 inputs are views of the
// protobuf's bytes (raw_input_contents or fp32_contents), not copies; FP16 and BF16 are widened to
// float32 once. Every problem is an INVALID_ARGUMENT that names the tensor and what was expected.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kernels/forward_sample.h"
#include "kernels/model_config.h"
#include "proto/grpc_service.pb.h"

namespace mmdit {

// The float types a request may carry; the outputs come back in the same one.
enum class WireFloat { kFp32, kFp16, kBf16 };
const char* WireFloatName(WireFloat type);  // "FP32", "FP16", "BF16"

// What a request is checked against.
struct ModelSignature {
  std::string name;
  int64_t version = 1;
  MmditConfig config;
  int max_batch_size = 1;
};

class InferRequest {
 public:
  // Decodes `request`, which must outlive the result (FP32 data is viewed, not copied).
  static absl::StatusOr<std::unique_ptr<InferRequest>> Decode(
      const inference::ModelInferRequest& request, const ModelSignature& model);
  // The same, keeping `request` alive for as long as the result lives.
  static absl::StatusOr<std::unique_ptr<InferRequest>> Decode(
      std::shared_ptr<const inference::ModelInferRequest> request, const ModelSignature& model);

  InferRequest(const InferRequest&) = delete;
  InferRequest& operator=(const InferRequest&) = delete;

  int batch_size() const { return static_cast<int>(samples_.size()); }
  int seq_len() const { return seq_len_; }
  int context_len() const { return context_len_; }
  WireFloat float_type() const { return float_type_; }
  const std::string& id() const { return id_; }
  // The samples, their outputs pointing into this request's buffers.
  absl::Span<const ForwardSample> samples() const { return samples_; }
  // Triton's "timeout" parameter in microseconds; 0 when the request sets none.
  int64_t timeout_micros() const { return timeout_micros_; }

  // When the request gives up (its timeout or the call's deadline); set by the service.
  absl::Time deadline() const { return deadline_; }
  void set_deadline(absl::Time deadline) { deadline_ = deadline; }

  // Writes the requested outputs (x_out, context_out, in the request's float type) into
  // `response` as raw_output_contents; FP32 buffers move into the response without a copy.
  // Call once, after the forward ran.
  void MoveOutputsTo(inference::ModelInferResponse* response);

 private:
  InferRequest() = default;
  absl::Status DecodeFrom(const inference::ModelInferRequest& request,
                          const ModelSignature& model);

  // An output of the forward: float32 written in place of the final raw bytes where it can.
  struct OutputBuffer {
    std::string raw;           // FP32: the response bytes themselves, when 4-byte aligned
    std::vector<float> floats;  // otherwise, converted or copied at MoveOutputsTo
    float* data = nullptr;
    int64_t elements = 0;
  };
  void AllocateOutput(OutputBuffer* out, int64_t elements);
  void EncodeOutput(const char* name, OutputBuffer* out, std::vector<int64_t> shape,
                    inference::ModelInferResponse* response);

  std::shared_ptr<const inference::ModelInferRequest> owned_request_;
  std::string id_;
  int seq_len_ = 0;
  int context_len_ = 0;
  int dim_ = 0;
  WireFloat float_type_ = WireFloat::kFp32;
  int64_t timeout_micros_ = 0;
  absl::Time deadline_ = absl::InfiniteFuture();
  bool want_x_out_ = true;
  bool want_context_out_ = true;
  // The requested outputs in the order they were asked for.
  std::vector<std::string> output_order_;

  // Inputs that could not be viewed in place (converted from 16-bit, or misaligned).
  std::vector<float> x_copy_, y_copy_, context_copy_;
  std::vector<uint8_t> mask_copy_;
  std::vector<int64_t> start_pos_;
  OutputBuffer x_out_, context_out_;
  std::vector<ForwardSample> samples_;
};

}  // namespace mmdit
