// The float32 CPU reference forward of MODEL.md: written for clarity, one sample at a time,
// because it is the oracle every faster path is checked against.
#pragma once

#include "absl/status/status.h"
#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"

namespace mmdit {

// Runs every sample of `batch` through all layers. Validates each sample first (ValidateBatch)
// and writes nothing when one is invalid.
absl::Status ReferenceForward(const ModelWeights& weights, ForwardBatch batch);

}  // namespace mmdit
