// What mmdit-bench was asked to time; filled from its flags.
#pragma once

#include <string>
#include <vector>

namespace mmdit {

struct BenchOptions {
  std::vector<int> batch_sizes;  // e.g. {1, 8, 64, 256, 512}
  int seq_len = 186;             // L
  int context_len = 64;          // C
  std::string precision;         // "bf16", "fp32" or "all"
  int warmup_iters = 10;
  int timed_iters = 50;
  int cpu_threads = 0;           // 0: every core
  int gpu = 0;                   // CUDA device ordinal
};

}  // namespace mmdit
