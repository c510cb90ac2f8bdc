// Any text into the config.pbtxt parser and validator: an error or a config that validates.
#include <cstdlib>

#include "server/model_repository.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = mmdit::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size),
                                        "fuzz.pbtxt");
  if (config.ok() && !mmdit::ValidateModelConfig(*config, "fuzz.pbtxt").ok()) std::abort();
  return 0;
}

namespace mmdit::fuzz {
std::vector<std::string> Seeds() {
  return {
      "name: \"m\" max_batch_size: 8 precision: \"bf16\"\n"
      "mmdit { dim: 128 num_heads: 8 dim_feedforward: 512 num_layers: 12 max_seq_len: 4096 }\n"
      "dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [4, 8]\n"
      "  max_queue_size: 10 default_timeout_microseconds: 5 }\n"
      "instance_group [ { kind: KIND_GPU count: 1 gpus: [0] }, { kind: KIND_CPU count: 2 } ]\n",
      "name: \"x\" max_batch_size: 1 mmdit { dim: 4 num_heads: 2 dim_feedforward: 4 num_layers: 1 }",
  };
}
}  // namespace mmdit::fuzz
