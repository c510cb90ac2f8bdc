#include "kernels/forward_sample.h"

#include "absl/strings/str_cat.h"

namespace mmdit {

absl::Status ValidateSample(const MmditConfig& config, const ForwardSample& s, int index) {
  auto error = [index](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("sample ", index, ": ", parts...));
  };
  if (s.seq_len < 1) return error("x has L = ", s.seq_len, "; need at least one token");
  if (s.context_len < 1) return error("context has C = ", s.context_len, "; need at least one token");
  if (!s.x || !s.y || !s.context || !s.x_out || !s.context_out) {
    return error("x, y, context and both outputs must be set");
  }
  if (s.start_pos < 0) return error("start_pos is ", s.start_pos, "; must be >= 0");
  if (s.start_pos > config.max_seq_len - s.seq_len) {
    return error("start_pos + L = ", s.start_pos + s.seq_len, " exceeds max_seq_len ",
                 config.max_seq_len);
  }
  if (s.attn_mask != nullptr) {
    // An x query with no visible x key sees no context key either (MODEL.md step 6): its
    // softmax row would be empty, which the original turns into NaN.
    for (int i = 0; i < s.seq_len; ++i) {
      const uint8_t* row = s.attn_mask + static_cast<int64_t>(i) * s.seq_len;
      bool any = false;
      for (int j = 0; j < s.seq_len && !any; ++j) any = row[j] != 0;
      if (!any) return error("attn_mask row ", i, " has no visible key");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBatch(const MmditConfig& config, ForwardBatch batch) {
  for (int i = 0; i < static_cast<int>(batch.size()); ++i) {
    if (absl::Status s = ValidateSample(config, batch[i], i); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace mmdit
