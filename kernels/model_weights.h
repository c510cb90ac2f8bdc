// The parameters of an MMDiT stack in float32, PyTorch Linear layout (weight is [out, in]),
// loaded from a PyTorch state_dict saved as safetensors, or made deterministically.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/model_config.h"
#include "kernels/safetensors.h"

namespace mmdit {

// One stream (x or context) of one block. Sizes in comments; D = dim, F = dim_feedforward.
struct StreamWeights {
  std::vector<float> adaln_w;   // [6D, D]  adaLN_modulation.1.weight
  std::vector<float> adaln_b;   // [6D]
  std::vector<float> qkv_w;     // [3D, D]  to_qkv / c_to_qkv
  std::vector<float> qkv_b;     // [3D]
  std::vector<float> rms_q;     // [D]      rms_norm_q / c_rms_norm_q
  std::vector<float> rms_k;     // [D]
  std::vector<float> out_w;     // [D, D]   to_out.0 / c_to_out.0
  std::vector<float> out_b;     // [D]
  std::vector<float> out_rms;   // [D]      to_out.1 / c_to_out.1
  std::vector<float> mlp_up_w;  // [F, D]   mlp.0
  std::vector<float> mlp_up_b;  // [F]
  std::vector<float> mlp_down_w;  // [D, F] mlp.2
  std::vector<float> mlp_down_b;  // [D]
};

struct LayerWeights {
  StreamWeights x;        // the sequence stream
  StreamWeights context;  // the context stream
};

struct ModelWeights {
  MmditConfig config;
  std::vector<LayerWeights> layers;

  // Reads MODEL.md's keys (blocks.{i}.…) from `file`; float32, bf16 and fp16 tensors are
  // accepted (converted to float32). Checks D, F and N against `config` and names any missing,
  // extra or mis-shaped tensor.
  static absl::StatusOr<ModelWeights> FromSafetensors(const SafetensorsFile& file,
                                                      const MmditConfig& config);

  // Deterministic pseudo-random weights of PyTorch's default init scale (uniform in
  // ±1/sqrt(fan_in)); the same seed gives the same weights on every machine.
  static ModelWeights Deterministic(const MmditConfig& config, uint64_t seed);

  // Every tensor with its state_dict key and shape, in MODEL.md's naming, for writing out.
  struct NamedTensor {
    std::string name;
    std::vector<int64_t> shape;
    const std::vector<float>* data;
  };
  std::vector<NamedTensor> NamedTensors() const;
};

}  // namespace mmdit
