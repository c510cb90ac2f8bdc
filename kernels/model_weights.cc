#include "kernels/model_weights.h"

#include <cmath>
#include <functional>
#include <set>

#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

struct TensorSlot {
  std::string key;
  std::vector<int64_t> shape;
  std::vector<float>* data;
};

// Every tensor of layer `i` with its state_dict key and expected shape: the single place that
// knows MODEL.md's naming, used for loading, saving and deterministic init alike.
std::vector<TensorSlot> LayerSlots(const MmditConfig& c, int i, LayerWeights& w) {
  const int64_t d = c.dim, f = c.dim_feedforward;
  const std::string b = absl::StrCat("blocks.", i, ".");
  const std::string a = b + "cross_attn.";
  auto stream = [&](StreamWeights& s, const std::string& layers, const std::string& c_) {
    return std::vector<TensorSlot>{
        {b + layers + "adaLN_modulation.1.weight", {6 * d, d}, &s.adaln_w},
        {b + layers + "adaLN_modulation.1.bias", {6 * d}, &s.adaln_b},
        {a + c_ + "to_qkv.weight", {3 * d, d}, &s.qkv_w},
        {a + c_ + "to_qkv.bias", {3 * d}, &s.qkv_b},
        {a + c_ + "rms_norm_q.weight", {d}, &s.rms_q},
        {a + c_ + "rms_norm_k.weight", {d}, &s.rms_k},
        {a + c_ + "to_out.0.weight", {d, d}, &s.out_w},
        {a + c_ + "to_out.0.bias", {d}, &s.out_b},
        {a + c_ + "to_out.1.weight", {d}, &s.out_rms},
        {b + layers + "mlp.0.weight", {f, d}, &s.mlp_up_w},
        {b + layers + "mlp.0.bias", {f}, &s.mlp_up_b},
        {b + layers + "mlp.2.weight", {d, f}, &s.mlp_down_w},
        {b + layers + "mlp.2.bias", {d}, &s.mlp_down_b},
    };
  };
  std::vector<TensorSlot> slots = stream(w.x, "", "");
  for (auto& s : stream(w.context, "context_layers.", "c_")) slots.push_back(std::move(s));
  return slots;
}

// splitmix64: a tiny generator whose output is the same on every platform.
uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

absl::StatusOr<ModelWeights> ModelWeights::FromSafetensors(const SafetensorsFile& file,
                                                           const MmditConfig& config) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  ModelWeights weights;
  weights.config = config;
  weights.layers.resize(config.num_layers);
  std::set<std::string> expected;
  for (int i = 0; i < config.num_layers; ++i) {
    for (TensorSlot& slot : LayerSlots(config, i, weights.layers[i])) {
      expected.insert(slot.key);
      absl::StatusOr<std::vector<float>> v = file.GetFloat(slot.key, slot.shape);
      if (!v.ok()) {
        std::string hint;
        if (v.status().code() == absl::StatusCode::kNotFound) {
          hint = absl::StrCat(" (config has num_layers ", config.num_layers, ")");
        } else {
          hint = absl::StrCat(" (config has dim ", config.dim, ", dim_feedforward ",
                              config.dim_feedforward, ")");
        }
        return absl::Status(v.status().code(), absl::StrCat(v.status().message(), hint));
      }
      *slot.data = *std::move(v);
    }
  }
  for (const auto& [key, view] : file.tensors()) {
    if (expected.count(key) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          file.name(), ": unexpected tensor '", key, "' (config has num_layers ",
          config.num_layers, "; expected only MODEL.md's blocks.{i}.* keys)"));
    }
  }
  return weights;
}

ModelWeights ModelWeights::Deterministic(const MmditConfig& config, uint64_t seed) {
  ModelWeights weights;
  weights.config = config;
  weights.layers.resize(config.num_layers);
  uint64_t state = seed;
  for (int i = 0; i < config.num_layers; ++i) {
    for (TensorSlot& slot : LayerSlots(config, i, weights.layers[i])) {
      int64_t n = 1;
      for (int64_t d : slot.shape) n *= d;
      slot.data->resize(n);
      if (slot.shape.size() == 1 && slot.key.find("weight") != std::string::npos) {
        // RMSNorm gains: around 1, as trained models have them.
        for (float& v : *slot.data) {
          v = 1.0f + 0.1f * (static_cast<float>(SplitMix64(state) >> 40) / (1 << 24) - 0.5f);
        }
        continue;
      }
      const int64_t fan_in = slot.shape.size() == 2 ? slot.shape[1] : config.dim;
      const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
      for (float& v : *slot.data) {
        const float u = static_cast<float>(SplitMix64(state) >> 40) / (1 << 24);  // [0, 1)
        v = (2.0f * u - 1.0f) * bound;
      }
    }
  }
  return weights;
}

std::vector<ModelWeights::NamedTensor> ModelWeights::NamedTensors() const {
  std::vector<NamedTensor> out;
  for (int i = 0; i < static_cast<int>(layers.size()); ++i) {
    // LayerSlots wants mutable storage to fill; naming alone never writes through it.
    auto& layer = const_cast<LayerWeights&>(layers[i]);
    for (TensorSlot& slot : LayerSlots(config, i, layer)) {
      out.push_back({slot.key, slot.shape, slot.data});
    }
  }
  return out;
}

}  // namespace mmdit
