#include "kernels/model_config.h"

#include "absl/strings/str_cat.h"

namespace mmdit {

absl::Status MmditConfig::Validate() const {
  auto positive = [](const char* name, int v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(name, " must be positive; was ", v));
  };
  for (auto s : {positive("dim", dim), positive("num_heads", num_heads),
                 positive("dim_feedforward", dim_feedforward),
                 positive("num_layers", num_layers), positive("max_seq_len", max_seq_len)}) {
    if (!s.ok()) return s;
  }
  if (dim % num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dim must be divisible by num_heads; dim ", dim, " and num_heads ", num_heads));
  }
  if (head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head dim (dim / num_heads) must be even for RoPE; was ", head_dim()));
  }
  return absl::OkStatus();
}

}  // namespace mmdit
