// The benchmark bodies mmdit-bench dispatches to; each prints its own table.
#pragma once

#include "absl/status/status.h"
#include "tools/bench/bench_options.h"

namespace mmdit {

// The CPU forward (fast path beside the reference) on this machine's cores.
absl::Status RunCpuBenchmark(const BenchOptions& options);

// The fused CUDA forward; only in builds with CUDA.
absl::Status RunCudaBenchmark(const BenchOptions& options);

}  // namespace mmdit
