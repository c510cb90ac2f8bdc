#include "tests/test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace mmdit::testing {
namespace fs = std::filesystem;

double RelativeError(const std::vector<float>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = out[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  if (std::isnan(num)) return INFINITY;
  return std::sqrt(num / den);
}

double RelativeError(const std::vector<float>& out, const std::vector<float>& ref) {
  return RelativeError(out, std::vector<double>(ref.begin(), ref.end()));
}

std::string FixturesDir() {
  if (const char* env = std::getenv("MMDIT_FIXTURES_DIR")) return env;
  return MMDIT_FIXTURES_DIR;
}

std::vector<std::string> FixtureNames() { return {"small", "target1"}; }

std::string Fixture::weights_path() const { return FixturesDir() + "/" + name + "_weights.safetensors"; }
std::string Fixture::io_path() const { return FixturesDir() + "/" + name + "_io.safetensors"; }

Fixture LoadFixture(const std::string& name) {
  Fixture f;
  f.name = name;
  absl::StatusOr<SafetensorsFile> wfile = SafetensorsFile::Read(f.weights_path());
  if (!wfile.ok()) {
    ADD_FAILURE() << wfile.status();
    return f;
  }
  auto meta = [&](const char* key) { return std::stoi(wfile->metadata().at(key)); };
  f.config.dim = meta("dim");
  f.config.num_heads = meta("num_heads");
  f.config.dim_feedforward = meta("dim_feedforward");
  f.config.num_layers = meta("num_layers");
  absl::StatusOr<ModelWeights> weights = ModelWeights::FromSafetensors(*wfile, f.config);
  if (!weights.ok()) {
    ADD_FAILURE() << weights.status();
    return f;
  }
  f.weights = *std::move(weights);

  absl::StatusOr<SafetensorsFile> io = SafetensorsFile::Read(f.io_path());
  if (!io.ok()) {
    ADD_FAILURE() << io.status();
    return f;
  }
  const auto& t = io->tensors();
  f.batch = static_cast<int>(t.at("x").shape[0]);
  f.seq_len = static_cast<int>(t.at("x").shape[1]);
  f.context_len = static_cast<int>(t.at("context").shape[1]);
  const int64_t b = f.batch, d = f.config.dim;
  f.x = *io->GetFloat("x", {b, f.seq_len, d});
  f.y = *io->GetFloat("y", t.at("y").shape);
  f.context = *io->GetFloat("context", {b, f.context_len, d});
  if (t.count("attn_mask")) {
    const auto& bytes = t.at("attn_mask").bytes;
    f.attn_mask.assign(bytes.begin(), bytes.end());
  }
  f.start_pos.assign(b, 0);
  if (t.count("start_pos")) std::memcpy(f.start_pos.data(), t.at("start_pos").bytes.data(), b * 8);
  auto f64 = [&](const char* key) {
    const TensorView& v = t.at(key);
    std::vector<double> out(v.num_elements());
    std::memcpy(out.data(), v.bytes.data(), out.size() * 8);
    return out;
  };
  f.x_out_f64 = f64("x_out_f64");
  f.context_out_f64 = f64("context_out_f64");
  return f;
}

std::vector<ForwardSample> FixtureSamples(const Fixture& f, std::vector<float>& x_out,
                                          std::vector<float>& context_out) {
  const int64_t d = f.config.dim, L = f.seq_len, C = f.context_len;
  x_out.assign(f.x.size(), NAN);  // poisoned: every element must be written
  context_out.assign(f.context.size(), NAN);
  std::vector<ForwardSample> samples(f.batch);
  for (int b = 0; b < f.batch; ++b) {
    ForwardSample& s = samples[b];
    s.seq_len = static_cast<int>(L);
    s.context_len = static_cast<int>(C);
    s.x = &f.x[b * L * d];
    s.y = &f.y[b * d];
    s.context = &f.context[b * C * d];
    s.attn_mask = f.attn_mask.empty() ? nullptr : &f.attn_mask[b * L * L];
    s.start_pos = f.start_pos[b];
    s.x_out = &x_out[b * L * d];
    s.context_out = &context_out[b * C * d];
  }
  return samples;
}

RandomBatch MakeRandomBatch(const MmditConfig& config,
                            const std::vector<std::pair<int, int>>& lengths, bool masked,
                            uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::bernoulli_distribution coin(0.7);
  const int d = config.dim;
  RandomBatch batch;
  const size_t n = lengths.size();
  batch.x.resize(n), batch.y.resize(n), batch.context.resize(n);
  batch.x_out.resize(n), batch.context_out.resize(n), batch.masks.resize(n);
  batch.samples.resize(n);
  for (size_t b = 0; b < n; ++b) {
    const auto [L, C] = lengths[b];
    auto fill = [&](std::vector<float>& v, size_t count) {
      v.resize(count);
      for (float& e : v) e = normal(rng);
    };
    fill(batch.x[b], static_cast<size_t>(L) * d);
    fill(batch.y[b], d);
    fill(batch.context[b], static_cast<size_t>(C) * d);
    batch.x_out[b].assign(static_cast<size_t>(L) * d, NAN);
    batch.context_out[b].assign(static_cast<size_t>(C) * d, NAN);
    if (masked) {
      auto& m = batch.masks[b];
      m.resize(static_cast<size_t>(L) * L);
      for (auto& e : m) e = coin(rng);
      for (int i = 0; i < L; ++i) m[static_cast<size_t>(i) * L + rng() % L] = 1;  // no empty row
    }
    ForwardSample& s = batch.samples[b];
    s.seq_len = L;
    s.context_len = C;
    s.x = batch.x[b].data();
    s.y = batch.y[b].data();
    s.context = batch.context[b].data();
    s.attn_mask = masked ? batch.masks[b].data() : nullptr;
    s.start_pos = static_cast<int64_t>(rng() % 64);
    s.x_out = batch.x_out[b].data();
    s.context_out = batch.context_out[b].data();
  }
  return batch;
}

void RandomBatch::Poison() {
  for (auto& v : x_out) std::fill(v.begin(), v.end(), NAN);
  for (auto& v : context_out) std::fill(v.begin(), v.end(), NAN);
}

std::vector<float> RandomBatch::AllOutputs() const {
  std::vector<float> all;
  for (const auto& v : x_out) all.insert(all.end(), v.begin(), v.end());
  for (const auto& v : context_out) all.insert(all.end(), v.begin(), v.end());
  return all;
}

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string templ = absl::StrCat(base ? base : fs::temp_directory_path().string(), "/", prefix,
                                   "XXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  const char* made = mkdtemp(buf.data());
  EXPECT_NE(made, nullptr) << "mkdtemp " << templ;
  return made ? made : "";
}

void WriteModelRepository(const std::string& dir, const std::string& name,
                          const MmditConfig& config, const std::string& weights_file,
                          int max_batch_size, int version, const std::string& extra_config) {
  const fs::path model_dir = fs::path(dir) / name;
  fs::create_directories(model_dir / std::to_string(version));
  fs::copy_file(weights_file, model_dir / std::to_string(version) / "model.safetensors",
                fs::copy_options::overwrite_existing);
  std::ofstream out(model_dir / "config.pbtxt");
  out << "name: \"" << name << "\"\n"
      << "max_batch_size: " << max_batch_size << "\n"
      << "mmdit { dim: " << config.dim << " num_heads: " << config.num_heads
      << " dim_feedforward: " << config.dim_feedforward << " num_layers: " << config.num_layers
      << " max_seq_len: " << config.max_seq_len << " }\n"
      << extra_config;
}

}  // namespace mmdit::testing
