#include "server/model_repository.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace mmdit {
namespace {

namespace fs = std::filesystem;

constexpr int kDefaultMaxSeqLen = 4096;
constexpr uint64_t kBuiltinSeed = 20261125;

// Collects text-format parse errors with their line and column so the message can name them.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty()) first_ = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

MmditConfig ToMmditConfig(const MmditParameters& p) {
  MmditConfig c;
  c.dim = p.dim();
  c.num_heads = p.num_heads();
  c.dim_feedforward = p.dim_feedforward();
  c.num_layers = p.num_layers();
  c.max_seq_len = p.max_seq_len() == 0 ? kDefaultMaxSeqLen : p.max_seq_len();
  return c;
}

absl::Status ValidateModelConfig(const ModelConfig& config, const std::string& file) {
  auto error = [&file](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": ", parts...));
  };
  if (config.name().empty()) return error("name must be set");
  if (config.max_batch_size() <= 0) {
    return error("max_batch_size must be positive; was ", config.max_batch_size());
  }
  if (!config.has_mmdit()) return error("mmdit { dim num_heads dim_feedforward num_layers } must be set");
  if (config.mmdit().max_seq_len() < 0) {
    return error("mmdit.max_seq_len must be positive; was ", config.mmdit().max_seq_len());
  }
  if (absl::Status s = ToMmditConfig(config.mmdit()).Validate(); !s.ok()) {
    return error("mmdit.", s.message());
  }
  if (config.precision() != "fp32" && config.precision() != "bf16") {
    return error("precision must be \"fp32\" or \"bf16\"; was \"", config.precision(), "\"");
  }
  const auto& batching = config.dynamic_batching();
  if (batching.max_queue_size() < 0) {
    return error("dynamic_batching.max_queue_size must be >= 0; was ", batching.max_queue_size());
  }
  for (int size : batching.preferred_batch_size()) {
    if (size <= 0 || size > config.max_batch_size()) {
      return error("dynamic_batching.preferred_batch_size ", size, " must be in [1, max_batch_size ",
                   config.max_batch_size(), "]");
    }
  }
  for (const auto& group : config.instance_group()) {
    if (group.count() < 0) return error("instance_group.count must be >= 0; was ", group.count());
    for (int gpu : group.gpus()) {
      if (gpu < 0) return error("instance_group.gpus entries must be >= 0; was ", gpu);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& text, const std::string& file) {
  ModelConfig config;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": ", errors.first()));
  }
  if (config.precision().empty()) config.set_precision("fp32");
  if (config.has_mmdit() && config.mmdit().max_seq_len() == 0) {
    config.mutable_mmdit()->set_max_seq_len(kDefaultMaxSeqLen);
  }
  if (absl::Status s = ValidateModelConfig(config, file); !s.ok()) return s;
  return config;
}

absl::StatusOr<std::vector<std::string>> ListModels(const std::string& repository_dir) {
  std::error_code ec;
  if (!fs::is_directory(repository_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model repository ", repository_dir, " is not a directory"));
  }
  std::vector<std::string> models;
  for (const auto& entry : fs::directory_iterator(repository_dir, ec)) {
    if (entry.is_directory() && fs::exists(entry.path() / "config.pbtxt")) {
      models.push_back(entry.path().filename().string());
    }
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", repository_dir, ": ", ec.message()));
  std::sort(models.begin(), models.end());
  return models;
}

absl::StatusOr<LoadedModel> LoadModel(const std::string& repository_dir, const std::string& model,
                                      int64_t version) {
  const fs::path model_dir = fs::path(repository_dir) / model;
  const std::string config_path = (model_dir / "config.pbtxt").string();
  absl::StatusOr<std::string> text = ReadText(config_path);
  if (!text.ok()) return text.status();
  absl::StatusOr<ModelConfig> config = ParseModelConfig(*text, config_path);
  if (!config.ok()) return config.status();
  if (config->name() != model) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": name \"", config->name(),
                                                   "\" differs from its folder \"", model, "\""));
  }

  if (version == 0) {  // the highest numbered version folder
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(model_dir, ec)) {
      int64_t v = 0;
      if (entry.is_directory() && absl::SimpleAtoi(entry.path().filename().string(), &v) && v > 0) {
        version = std::max(version, v);
      }
    }
    if (version == 0) {
      return absl::NotFoundError(absl::StrCat(model_dir.string(),
                                              ": no version folder (e.g. 1/model.safetensors)"));
    }
  }
  const std::string weights_path =
      (model_dir / std::to_string(version) / "model.safetensors").string();
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Read(weights_path);
  if (!file.ok()) return file.status();
  absl::StatusOr<ModelWeights> weights =
      ModelWeights::FromSafetensors(*file, ToMmditConfig(config->mmdit()));
  if (!weights.ok()) {
    return absl::Status(weights.status().code(),
                        absl::StrCat(weights.status().message(), " [config: ", config_path, "]"));
  }
  LoadedModel loaded;
  loaded.config = *std::move(config);
  loaded.version = version;
  loaded.weights = *std::move(weights);
  return loaded;
}

LoadedModel BuiltinModel() {
  LoadedModel loaded;
  ModelConfig& c = loaded.config;
  c.set_name("mmdit");
  c.set_max_batch_size(256);
  c.set_precision("bf16");
  const MmditConfig target = TargetConfig();
  MmditParameters* p = c.mutable_mmdit();
  p->set_dim(target.dim);
  p->set_num_heads(target.num_heads);
  p->set_dim_feedforward(target.dim_feedforward);
  p->set_num_layers(target.num_layers);
  p->set_max_seq_len(target.max_seq_len);
  // No queue delay: under load a batch forms from what queued while the worker ran the last
  // one, and a lone request waits for nothing. With 2000 µs, one client at batch 1 on an H100
  // saw a 2.9 ms p50 for a 0.27 ms forward (docs/BENCHMARKS.md, serving).
  c.mutable_dynamic_batching()->set_max_queue_delay_microseconds(0);
  loaded.version = 1;
  loaded.weights = ModelWeights::Deterministic(target, kBuiltinSeed);
  return loaded;
}

}  // namespace mmdit
