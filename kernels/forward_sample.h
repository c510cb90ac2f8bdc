// One sample of a forward pass, as views of caller-owned float32 memory. A batch is a span of
// these: samples may have different L and C and are never padded to a common shape.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/model_config.h"

namespace mmdit {

struct ForwardSample {
  int seq_len = 0;              // L: x tokens
  int context_len = 0;          // C: context tokens
  const float* x = nullptr;         // [L, D]
  const float* y = nullptr;         // [D]
  const float* context = nullptr;   // [C, D]
  const uint8_t* attn_mask = nullptr;  // [L, L], nonzero = query i may see key j; null = all
  int64_t start_pos = 0;            // RoPE position offset
  float* x_out = nullptr;           // [L, D]
  float* context_out = nullptr;     // [C, D]
};

using ForwardBatch = absl::Span<const ForwardSample>;

// The rules every forward path shares: L, C >= 1, start_pos >= 0, start_pos + L <= max_seq_len,
// every mask row has a visible key, and no pointer that must be set is null. `index` names the
// sample in the message.
absl::Status ValidateSample(const MmditConfig& config, const ForwardSample& sample, int index);
absl::Status ValidateBatch(const MmditConfig& config, ForwardBatch batch);

}  // namespace mmdit
