// Shared test helpers: the golden fixtures, relative error, random inputs, temp folders.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/forward_sample.h"
#include "kernels/model_weights.h"
#include "kernels/safetensors.h"

namespace mmdit::testing {

// ‖out − ref‖ / ‖ref‖ over all elements.
double RelativeError(const std::vector<float>& out, const std::vector<double>& ref);
double RelativeError(const std::vector<float>& out, const std::vector<float>& ref);

// A shared fixture (MODEL.md): its weights, inputs and the original's float64 outputs.
struct Fixture {
  std::string name;
  MmditConfig config;
  ModelWeights weights;
  int batch = 0, seq_len = 0, context_len = 0;
  std::vector<float> x, y, context;
  std::vector<uint8_t> attn_mask;  // empty when the case has none
  std::vector<int64_t> start_pos;
  std::vector<double> x_out_f64, context_out_f64;

  std::string weights_path() const;
  std::string io_path() const;
};

std::string FixturesDir();
std::vector<std::string> FixtureNames();  // {"small", "target1"}
Fixture LoadFixture(const std::string& name);  // fails the test (ADD_FAILURE) on error

// Per-sample views of a fixture's inputs, writing into the given output buffers (resized here).
std::vector<ForwardSample> FixtureSamples(const Fixture& f, std::vector<float>& x_out,
                                          std::vector<float>& context_out);

// A random ragged batch: owns its memory, hands out ForwardSample views.
struct RandomBatch {
  std::vector<std::vector<float>> x, y, context, x_out, context_out;
  std::vector<std::vector<uint8_t>> masks;
  std::vector<ForwardSample> samples;

  void Poison();                            // every output back to NaN
  std::vector<float> AllOutputs() const;    // x_out of every sample, then context_out
};
// `lengths` is (L, C) per sample. `masked`: random masks with every row visible somewhere.
RandomBatch MakeRandomBatch(const MmditConfig& config,
                            const std::vector<std::pair<int, int>>& lengths, bool masked,
                            uint64_t seed);

// A fresh empty folder under the test temp dir.
std::string MakeTempDir(const std::string& prefix);

// Writes DIR/<name>/config.pbtxt and DIR/<name>/<version>/model.safetensors (a copy of
// `weights_file`), for a model of `config`.
void WriteModelRepository(const std::string& dir, const std::string& name,
                          const MmditConfig& config, const std::string& weights_file,
                          int max_batch_size = 8, int version = 1,
                          const std::string& extra_config = "");

}  // namespace mmdit::testing
