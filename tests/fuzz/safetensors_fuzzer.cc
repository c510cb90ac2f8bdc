// Any bytes into the safetensors parser: it must return an error or views inside its buffer.
#include <cstring>

#include "kernels/model_weights.h"
#include "kernels/safetensors.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = mmdit::SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size),
                                            "fuzz");
  if (!file.ok()) return 0;
  for (const auto& [name, view] : file->tensors()) {
    // Touch every byte so that ASan sees a view that leaves the buffer.
    volatile uint8_t sink = 0;
    for (uint8_t b : view.bytes) sink ^= b;
    (void)file->GetFloat(name, view.shape);
  }
  mmdit::MmditConfig config;
  config.dim = 4;
  config.num_heads = 2;
  config.dim_feedforward = 8;
  config.num_layers = 1;
  (void)mmdit::ModelWeights::FromSafetensors(*file, config);
  return 0;
}

namespace mmdit::fuzz {
std::vector<std::string> Seeds() {
  MmditConfig config;
  config.dim = 4;
  config.num_heads = 2;
  config.dim_feedforward = 8;
  config.num_layers = 1;
  ModelWeights w = ModelWeights::Deterministic(config, 1);
  SafetensorsWriter full;
  for (const auto& t : w.NamedTensors()) full.AddFloat(t.name, t.shape, *t.data);
  full.SetMetadata("num_heads", "2");
  SafetensorsWriter mixed;
  const std::vector<uint8_t> half = {0x00, 0x3c, 0x00, 0xc0};
  mixed.Add("h", DType::kF16, {2}, half);
  mixed.Add("b", DType::kBF16, {1, 2}, half);
  mixed.Add("m", DType::kBool, {2, 2}, std::vector<uint8_t>{1, 0, 0, 1});
  return {full.Serialize(), mixed.Serialize(), std::string(8, '\0')};
}
}  // namespace mmdit::fuzz
