// The model repository, in Triton's layout:
//   DIR/<model>/config.pbtxt                    ModelConfig in protobuf text format
//   DIR/<model>/<version>/model.safetensors     the PyTorch state_dict (MODEL.md's keys)
// Loading checks the config and the weights; every error names the file and field or tensor.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/model_weights.h"
#include "proto/model_config.pb.h"

namespace mmdit {

struct LoadedModel {
  ModelConfig config;         // as read, with defaults filled in (max_seq_len, precision, …)
  int64_t version = 0;
  ModelWeights weights;
};

// The kernels' view of a ModelConfig's mmdit section (defaults filled in).
MmditConfig ToMmditConfig(const MmditParameters& params);

// Checks a parsed config; `file` is named in every message.
absl::Status ValidateModelConfig(const ModelConfig& config, const std::string& file);

// Parses config.pbtxt text and validates it.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& text, const std::string& file);

// Names of the models in `repository_dir` (sub-folders holding a config.pbtxt), sorted.
absl::StatusOr<std::vector<std::string>> ListModels(const std::string& repository_dir);

// Loads `model` at `version` (0 = the highest numbered version folder).
absl::StatusOr<LoadedModel> LoadModel(const std::string& repository_dir, const std::string& model,
                                      int64_t version = 0);

// The built-in model served when no repository is given: MODEL.md's target config with
// deterministic weights, named "mmdit".
LoadedModel BuiltinModel();

}  // namespace mmdit
