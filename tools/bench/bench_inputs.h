// The batch every benchmark times: random inputs of one shape, outputs poisoned with NaN, and
// MODEL.md's FLOP count to turn times into rates.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/forward_sample.h"
#include "kernels/model_config.h"

namespace mmdit {

struct BenchInputs {
  std::vector<float> x, y, context, x_out, context_out;
  std::vector<ForwardSample> samples;  // views of the vectors above
};

// `batch` samples of L = seq_len, C = context_len, normal random inputs from `seed`, start_pos
// b % 7 (RoPE offsets in play), no mask.
BenchInputs MakeBenchInputs(const MmditConfig& config, int batch, int seq_len, int context_len,
                            uint32_t seed);

// FLOPs of one sample (MODEL.md): 1.56 GFLOP at the target shape.
double FlopsPerSample(const MmditConfig& config, int seq_len, int context_len);

}  // namespace mmdit
