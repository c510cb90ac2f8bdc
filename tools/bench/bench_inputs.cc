#include "tools/bench/bench_inputs.h"

#include <cmath>
#include <random>

namespace mmdit {

BenchInputs MakeBenchInputs(const MmditConfig& config, int batch, int seq_len, int context_len,
                            uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  BenchInputs in;
  const size_t d = config.dim;
  in.x.resize(batch * seq_len * d);
  in.y.resize(batch * d);
  in.context.resize(batch * context_len * d);
  for (auto* v : {&in.x, &in.y, &in.context}) {
    for (float& e : *v) e = normal(rng);
  }
  in.x_out.assign(in.x.size(), NAN);
  in.context_out.assign(in.context.size(), NAN);
  for (int b = 0; b < batch; ++b) {
    ForwardSample s;
    s.seq_len = seq_len;
    s.context_len = context_len;
    s.x = &in.x[b * seq_len * d];
    s.y = &in.y[b * d];
    s.context = &in.context[b * context_len * d];
    s.start_pos = b % 7;
    s.x_out = &in.x_out[b * seq_len * d];
    s.context_out = &in.context_out[b * context_len * d];
    in.samples.push_back(s);
  }
  return in;
}

double FlopsPerSample(const MmditConfig& c, int seq_len, int context_len) {
  const double t = seq_len + context_len, d = c.dim, f = c.dim_feedforward;
  const double per_layer =
      2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * f + 4 * d * 6 * d;
  return per_layer * c.num_layers;
}

}  // namespace mmdit
