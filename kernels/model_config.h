// The hyper-parameters of an MMDiT stack (MODEL.md) and their validation.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace mmdit {

struct MmditConfig {
  int dim = 128;              // D
  int num_heads = 8;          // H; head dim D / H must be even (RoPE rotates pairs)
  int dim_feedforward = 512;  // F
  int num_layers = 12;        // N
  int max_seq_len = 4096;     // RoPE positions: start_pos + L must not exceed it

  int head_dim() const { return dim / num_heads; }

  // Checks every field; the message names the field and its value.
  absl::Status Validate() const;
};

// The target configuration of MODEL.md (D=128, H=8, F=512, N=12).
inline MmditConfig TargetConfig() { return MmditConfig{}; }

}  // namespace mmdit
