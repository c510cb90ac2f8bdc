// The CUDA forward against the shared fixtures (float64 outputs of the original) and against the
// CPU reference on random ragged batches: L and C of 1 and of sizes that are not multiples of 16,
// with and without masks (dense, causal, sparse with empty columns), non-zero start_pos, batches
// of 1 to 512 (large ones checked on a subset of samples), both tile sizes, both precisions.
// Outputs are NaN-poisoned before every run. Skips without a GPU.
#include <cmath>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "gtest/gtest.h"
#include "kernels/cpu/reference_forward.h"
#include "kernels/cuda/cuda_forward.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using testing::RandomBatch;

constexpr double kBf16Tolerance = 2e-2;
constexpr double kFp32Tolerance = 1e-5;

double Tolerance(CudaPrecision p) {
  return p == CudaPrecision::kBf16 ? kBf16Tolerance : kFp32Tolerance;
}
const char* Name(CudaPrecision p) { return p == CudaPrecision::kBf16 ? "bf16" : "fp32"; }

#define SKIP_WITHOUT_GPU()                                               \
  if (CudaForward::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

// Options for batches of up to `batch` samples of at most `seq_len` x tokens and `context_len`
// context tokens; the rest as the defaults.
CudaForwardOptions SizedFor(int batch, int seq_len, int context_len) {
  CudaForwardOptions options;
  options.max_batch_size = batch;
  options.max_seq_len = seq_len;
  options.max_context_len = context_len;
  return options;
}

void Poison(const ForwardSample& s, int d) {
  std::fill_n(s.x_out, static_cast<size_t>(s.seq_len) * d, NAN);
  std::fill_n(s.context_out, static_cast<size_t>(s.context_len) * d, NAN);
}

class GpuFixtureTest
    : public ::testing::TestWithParam<std::tuple<std::string, CudaPrecision>> {};

TEST_P(GpuFixtureTest, MatchesFloat64Outputs) {
  SKIP_WITHOUT_GPU();
  const auto [name, precision] = GetParam();
  testing::Fixture f = testing::LoadFixture(name);
  ASSERT_FALSE(::testing::Test::HasFailure());
  CudaForwardOptions options = SizedFor(f.batch, f.seq_len, f.context_len);
  options.precision = precision;
  absl::StatusOr<std::unique_ptr<CudaForward>> fwd = CudaForward::Create(f.weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  std::vector<float> x_out, context_out;
  std::vector<ForwardSample> samples = testing::FixtureSamples(f, x_out, context_out);
  for (int rep = 0; rep < 2; ++rep) {  // the second run reuses every buffer
    for (const ForwardSample& s : samples) Poison(s, f.config.dim);
    ASSERT_TRUE((*fwd)->Run(samples).ok());
    const double ex = testing::RelativeError(x_out, f.x_out_f64);
    const double ec = testing::RelativeError(context_out, f.context_out_f64);
    std::printf("fixture %s %s: rel err x_out %.3g context_out %.3g\n", name.c_str(),
                Name(precision), ex, ec);
    EXPECT_LE(ex, Tolerance(precision));
    EXPECT_LE(ec, Tolerance(precision));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuFixtureTest,
                         ::testing::Combine(::testing::Values("small", "target1"),
                                            ::testing::Values(CudaPrecision::kBf16,
                                                              CudaPrecision::kFp32Accurate)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" + Name(std::get<1>(info.param));
                         });

enum class MaskKind { kNone, kDense, kCausal, kSparse, kMixed };

struct RandomCase {
  std::string name;
  int batch;
  int min_len, max_len;  // L drawn from this range
  int min_ctx, max_ctx;  // C drawn from this range
  MaskKind mask;
  int num_layers;
  int checked;  // samples compared with the reference (spread over the batch)
};

RandomBatch MakeCase(const MmditConfig& config, const RandomCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::pair<int, int>> lengths(c.batch);
  for (auto& [L, C] : lengths) {
    L = c.min_len + static_cast<int>(rng() % (c.max_len - c.min_len + 1));
    C = c.min_ctx + static_cast<int>(rng() % (c.max_ctx - c.min_ctx + 1));
  }
  if (c.batch >= 3) {  // the edges, always
    lengths[0] = {c.min_len, c.max_ctx};
    lengths[1] = {c.max_len, c.min_ctx};
  }
  RandomBatch b = testing::MakeRandomBatch(config, lengths, c.mask != MaskKind::kNone, seed);
  for (int i = 0; i < c.batch; ++i) {
    const int L = lengths[i].first;
    MaskKind kind = c.mask;
    if (kind == MaskKind::kMixed) kind = static_cast<MaskKind>(1 + i % 3);
    if (kind == MaskKind::kCausal || kind == MaskKind::kSparse) {
      std::vector<uint8_t>& m = b.masks[i];
      for (int r = 0; r < L; ++r) {
        for (int j = 0; j < L; ++j) {
          m[static_cast<size_t>(r) * L + j] =
              kind == MaskKind::kCausal ? (j <= r) : (rng() % 16 == 0);
        }
        // Sparse rows see at least their first key: leaves columns with no visible query.
        if (kind == MaskKind::kSparse) m[static_cast<size_t>(r) * L + (r % 5 == 0 ? 0 : r)] = 1;
      }
    }
  }
  return b;
}

std::vector<int> CheckedSamples(int batch, int checked) {
  std::vector<int> idx;
  if (checked >= batch) {
    for (int i = 0; i < batch; ++i) idx.push_back(i);
    return idx;
  }
  for (int k = 0; k < checked; ++k) {
    idx.push_back(static_cast<int>(static_cast<int64_t>(k) * (batch - 1) / (checked - 1)));
  }
  return idx;
}

// Runs the reference on the chosen samples (in parallel); returns ‖gpu − ref‖ / ‖ref‖ over them.
double CompareWithReference(const ModelWeights& w, const RandomBatch& b,
                            const std::vector<int>& idx) {
  const int d = w.config.dim;
  std::vector<std::vector<float>> rx(idx.size()), rc(idx.size());
  std::vector<std::future<absl::Status>> jobs;
  for (size_t k = 0; k < idx.size(); ++k) {
    ForwardSample s = b.samples[idx[k]];
    rx[k].assign(static_cast<size_t>(s.seq_len) * d, NAN);
    rc[k].assign(static_cast<size_t>(s.context_len) * d, NAN);
    s.x_out = rx[k].data();
    s.context_out = rc[k].data();
    jobs.push_back(std::async(std::launch::async, [&w, s] {
      return ReferenceForward(w, ForwardBatch(&s, 1));
    }));
  }
  std::vector<float> got, want;
  for (size_t k = 0; k < idx.size(); ++k) {
    EXPECT_TRUE(jobs[k].get().ok());
    const ForwardSample& s = b.samples[idx[k]];
    got.insert(got.end(), s.x_out, s.x_out + static_cast<size_t>(s.seq_len) * d);
    got.insert(got.end(), s.context_out, s.context_out + static_cast<size_t>(s.context_len) * d);
    want.insert(want.end(), rx[k].begin(), rx[k].end());
    want.insert(want.end(), rc[k].begin(), rc[k].end());
  }
  return testing::RelativeError(got, want);
}

// The one-launch forward needs compute capability 9.0; 16 clusters of four CTAs fit on any such
// GPU (an H100 PCIe has 114 SMs).
bool HopperOrLater() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         major >= 9;
}
constexpr int kFusedFitsEverywhere = 16;
int RowTiles16(const RandomBatch& b) {
  int tiles = 0;
  for (const ForwardSample& s : b.samples) {
    tiles += (s.seq_len + 15) / 16 + (s.context_len + 15) / 16;
  }
  return tiles;
}

// Row tiles: 16 tokens on one CTA or on a cluster (CudaForwardOptions::row_cluster_split), or 64;
// attention tiles of 64, 128 or 256 queries (256: bf16 only), or 16 with the keys split over
// warps (bf16; fp32 takes 64 there). `fused` (bf16): the one-launch forward where the batch fits
// it, the kernels of rows16x4_q16 otherwise; `fused_layers`: the same with one launch per layer.
struct RowTiling {
  int rows;
  int cluster_split;
  int attn_queries;
  const char* name;
  bool fused = false;
  bool fused_layers = false;
};
const RowTiling kRows16{16, 1, 64, "rows16"}, kRows16Split2{16, 2, 64, "rows16x2"},
    kRows16Split4{16, 4, 16, "rows16x4_q16"}, kRows64{64, 1, 128, "rows64"},
    kRows64Q256{64, 1, 256, "rows64_q256"}, kFused{16, 4, 16, "fused", true},
    kFusedLayers{16, 4, 16, "fused_layers", false, true};

// The last parameter selects the kernels kept for comparison (the mma.sync row kernel and the
// one-CTA-per-item attention) instead of the bf16 defaults on Hopper.
class GpuRandomTest
    : public ::testing::TestWithParam<std::tuple<RandomCase, CudaPrecision, RowTiling, bool>> {
};

TEST_P(GpuRandomTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const auto [c, precision, tiling, comparison_kernels] = GetParam();
  const int tile_rows = tiling.rows;
  MmditConfig config = TargetConfig();
  config.num_layers = c.num_layers;
  const ModelWeights weights = ModelWeights::Deterministic(config, 1234 + c.num_layers);
  CudaForwardOptions options = SizedFor(c.batch, c.max_len, c.max_ctx);
  options.precision = precision;
  options.row_tile_rows = tile_rows;
  options.row_cluster_split = tiling.cluster_split;
  options.attn_tile_queries =
      tiling.attn_queries == 16 && precision != CudaPrecision::kBf16 ? 64 : tiling.attn_queries;
  options.use_wgmma = !comparison_kernels;
  options.persistent_attention = !comparison_kernels;
  options.fused_forward = tiling.fused;
  options.fused_layers = tiling.fused_layers;
  absl::StatusOr<std::unique_ptr<CudaForward>> fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  RandomBatch b = MakeCase(config, c, 99 + c.batch);
  ASSERT_TRUE((*fwd)->Run(b.samples).ok());
  const bool fits = RowTiles16(b) <= kFusedFitsEverywhere && HopperOrLater() &&
                    precision == CudaPrecision::kBf16;
  if (!tiling.fused) EXPECT_FALSE((*fwd)->fused());
  if (!tiling.fused_layers) EXPECT_FALSE((*fwd)->fused_layers());
  if (fits) {
    EXPECT_EQ((*fwd)->fused(), tiling.fused);
    EXPECT_EQ((*fwd)->fused_layers(), tiling.fused_layers);
  }
  const std::vector<int> idx = CheckedSamples(c.batch, c.checked);
  const double err = CompareWithReference(weights, b, idx);
  std::printf("%s %s %s%s%s: rel err %.3g over %zu of %d samples\n", c.name.c_str(),
              Name(precision), tiling.name, comparison_kernels ? " (comparison kernels)" : "",
              (*fwd)->fused()          ? " (one launch)"
              : (*fwd)->fused_layers() ? " (one launch per layer)"
                                       : "",
              err, idx.size(), c.batch);
  EXPECT_LE(err, Tolerance(precision));

  // Deterministic: a second run on poisoned outputs gives the same bits.
  std::vector<float> first = b.x_out[idx.back()];
  for (const ForwardSample& s : b.samples) Poison(s, config.dim);
  ASSERT_TRUE((*fwd)->Run(b.samples).ok());
  EXPECT_EQ(0, std::memcmp(first.data(), b.x_out[idx.back()].data(), first.size() * 4));
}

const RandomCase kCases[] = {
    {"one_token", 1, 1, 1, 1, 1, MaskKind::kNone, 2, 1},
    {"one_token_masked", 2, 1, 1, 1, 1, MaskKind::kDense, 2, 2},
    {"odd_sizes_masked", 5, 1, 70, 1, 33, MaskKind::kMixed, 2, 5},
    {"odd_sizes", 8, 17, 150, 1, 90, MaskKind::kNone, 2, 8},
    {"sparse_mask", 4, 30, 131, 5, 20, MaskKind::kSparse, 2, 4},
    {"target_b64", 64, 150, 200, 40, 80, MaskKind::kNone, 2, 6},
    {"target_b256_masked", 256, 1, 200, 1, 64, MaskKind::kMixed, 2, 6},
    {"target_b512", 512, 186, 186, 64, 64, MaskKind::kNone, 1, 4},
    {"twelve_layers", 2, 186, 186, 64, 64, MaskKind::kNone, 12, 2},
    {"two_small_sparse", 2, 20, 45, 3, 17, MaskKind::kSparse, 3, 2},
    {"one_target_causal", 1, 186, 186, 64, 64, MaskKind::kCausal, 12, 1},
};

std::string RandomName(const ::testing::TestParamInfo<GpuRandomTest::ParamType>& info) {
  return std::get<0>(info.param).name + "_" + Name(std::get<1>(info.param)) + "_" +
         std::get<2>(info.param).name + (std::get<3>(info.param) ? "_mma_sync" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Random, GpuRandomTest,
    ::testing::Combine(::testing::ValuesIn(kCases),
                       ::testing::Values(CudaPrecision::kBf16, CudaPrecision::kFp32Accurate),
                       ::testing::Values(kRows16, kRows16Split2, kRows16Split4, kRows64),
                       ::testing::Values(false)),
    RandomName);

// 256-query attention tiles are bf16 only (the persistent kernel).
INSTANTIATE_TEST_SUITE_P(Queries256, GpuRandomTest,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(CudaPrecision::kBf16),
                                            ::testing::Values(kRows64Q256),
                                            ::testing::Values(false)),
                         RandomName);

// The one-launch forward and the launch per layer are bf16 only: in fp32 their tiling is
// rows16x4_q16's, tested above.
INSTANTIATE_TEST_SUITE_P(OneLaunch, GpuRandomTest,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(CudaPrecision::kBf16),
                                            ::testing::Values(kFused, kFusedLayers),
                                            ::testing::Values(false)),
                         RandomName);

INSTANTIATE_TEST_SUITE_P(ComparisonKernels, GpuRandomTest,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(CudaPrecision::kBf16),
                                            ::testing::Values(kRows64), ::testing::Values(true)),
                         RandomName);

// Sharp attention: q and k RMSNorm weights scaled up so that scores span tens of units in exp2
// and a row's maximum grows from key block to key block by more than the bf16 attention's lazy
// maximum lets pass (2^8), so its rescaling path runs, next to fully masked blocks (causal
// masks). bf16 is also held against the comparison kernels, which rescale at every block: at
// such scores most of bf16's error against the reference is the rounding of q and k, which both
// share.
TEST(GpuForwardTest, SharpAttentionMatchesReference) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 2;
  ModelWeights weights = ModelWeights::Deterministic(config, 21);
  for (auto& layer : weights.layers) {
    for (StreamWeights* w : {&layer.x, &layer.context}) {
      for (size_t i = 0; i < w->rms_q.size(); ++i) {
        w->rms_q[i] *= 4.5f + 0.05f * static_cast<float>(i % 7);
        w->rms_k[i] *= 4.5f;
      }
    }
  }
  // attn_queries 16: the attention with the keys split over warps, which combines the warps'
  // partial results at different offsets.
  auto run = [&](CudaPrecision p, bool comparison_kernels, int attn_queries = 128) {
    CudaForwardOptions options = SizedFor(4, 186, 64);
    options.precision = p;
    options.row_tile_rows = 64;
    options.attn_tile_queries = attn_queries;
    options.use_wgmma = !comparison_kernels;
    options.persistent_attention = !comparison_kernels;
    auto fwd = CudaForward::Create(weights, options);
    EXPECT_TRUE(fwd.ok()) << fwd.status();
    RandomBatch b =
        testing::MakeRandomBatch(config, {{186, 64}, {130, 7}, {186, 1}, {65, 64}}, true, 31);
    for (size_t i = 0; i < b.masks.size(); ++i) {
      const int L = b.samples[i].seq_len;
      for (int r = 0; r < L; ++r)
        for (int j = 0; j < L; ++j) b.masks[i][static_cast<size_t>(r) * L + j] = j <= r;
    }
    if (fwd.ok()) EXPECT_TRUE((*fwd)->Run(b.samples).ok());
    return b;
  };
  for (CudaPrecision p : {CudaPrecision::kBf16, CudaPrecision::kFp32Accurate}) {
    const RandomBatch b = run(p, false);
    const double err = CompareWithReference(weights, b, {0, 1, 2, 3});
    std::printf("sharp attention %s: rel err %.3g\n", Name(p), err);
    EXPECT_LE(err, Tolerance(p));
    if (p == CudaPrecision::kBf16) {
      const RandomBatch c = run(p, true);
      auto diff = [&](const RandomBatch& x) {
        std::vector<float> got, want;
        for (size_t i = 0; i < x.x_out.size(); ++i) {
          got.insert(got.end(), x.x_out[i].begin(), x.x_out[i].end());
          want.insert(want.end(), c.x_out[i].begin(), c.x_out[i].end());
        }
        return testing::RelativeError(got, want);
      };
      const double d = diff(b);
      std::printf("sharp attention bf16 against the comparison kernels: rel diff %.3g\n", d);
      EXPECT_LE(d, 5e-3);
      const RandomBatch split = run(p, false, 16);
      const double ds = diff(split);
      const double es = CompareWithReference(weights, split, {0, 1, 2, 3});
      std::printf("sharp attention bf16, keys split over warps: rel err %.3g, rel diff against "
                  "the comparison kernels %.3g\n", es, ds);
      EXPECT_LE(es, Tolerance(p));
      EXPECT_LE(ds, 5e-3);
    }
  }
}

// A feed-forward wider than the wgmma row kernel takes runs on the mma.sync kernel instead.
TEST(GpuForwardTest, WideFeedForwardFallsBack) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 1;
  config.dim_feedforward = 2176;  // 17 x 128: past the wgmma kernel's 2048
  const ModelWeights weights = ModelWeights::Deterministic(config, 5);
  CudaForwardOptions options = SizedFor(4, 186, 64);
  options.row_tile_rows = 64;
  auto fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  RandomBatch b = testing::MakeRandomBatch(config, {{186, 64}, {70, 9}, {1, 1}, {128, 64}},
                                           false, 17);
  ASSERT_TRUE((*fwd)->Run(b.samples).ok());
  EXPECT_LE(CompareWithReference(weights, b, {0, 1, 2, 3}), kBf16Tolerance);
}

// Two target layers of deterministic weights, with one layer's q or k RMSNorm gains (both
// streams) scaled by `factor`.
ModelWeights WithScaledGains(int layer, bool keys, float factor) {
  MmditConfig config = TargetConfig();
  config.num_layers = 2;
  ModelWeights weights = ModelWeights::Deterministic(config, 17);
  for (StreamWeights* w : {&weights.layers[layer].x, &weights.layers[layer].context}) {
    for (float& v : keys ? w->rms_k : w->rms_q) v *= factor;
  }
  return weights;
}

// Scores bounded by the q and k RMSNorm weights: the attention takes exp2 of them without a
// running maximum. Layer 0 has the default gains (bound ~52 in exp2 units), layer 1's q gains
// are 1.2x (bound ~62, near the limit of 64); held against the running maximum (option off) and
// the reference, for each attention kernel (256-, 128- and 64-query tiles, keys split over
// warps).
TEST(GpuForwardTest, BoundedScoresMatchRunningMaximum) {
  SKIP_WITHOUT_GPU();
  const ModelWeights weights = WithScaledGains(1, /*keys=*/false, 1.2f);
  const MmditConfig& config = weights.config;
  for (int attn_queries : {256, 128, 64, 16}) {
    auto run = [&](bool bounded) {
      CudaForwardOptions options = SizedFor(3, 186, 64);
      options.row_tile_rows = 64;
      options.attn_tile_queries = attn_queries;
      options.static_softmax_offsets = bounded;
      RandomBatch b = testing::MakeRandomBatch(config, {{186, 64}, {77, 1}, {9, 40}}, true, 3);
      auto fwd = CudaForward::Create(weights, options);
      EXPECT_TRUE(fwd.ok()) << fwd.status();
      if (!fwd.ok()) return b;
      EXPECT_EQ((*fwd)->bounded_score_layers(), bounded ? 2 : 0);
      EXPECT_TRUE((*fwd)->Run(b.samples).ok());
      return b;
    };
    const RandomBatch fast = run(true), lazy = run(false);
    std::vector<float> got, want;
    for (size_t i = 0; i < fast.x_out.size(); ++i) {
      got.insert(got.end(), fast.x_out[i].begin(), fast.x_out[i].end());
      want.insert(want.end(), lazy.x_out[i].begin(), lazy.x_out[i].end());
    }
    const double diff = testing::RelativeError(got, want);
    const double err = CompareWithReference(weights, fast, {0, 1, 2});
    std::printf("bounded scores, %d-query attention: rel err %.3g, rel diff against the running "
                "maximum %.3g\n", attn_queries, err, diff);
    EXPECT_LE(err, kBf16Tolerance);
    EXPECT_LE(diff, 5e-3);
  }
}

// Gains too large for the bound: the running maximum, without being asked.
TEST(GpuForwardTest, UnboundedScoresKeepRunningMaximum) {
  SKIP_WITHOUT_GPU();
  const ModelWeights weights = WithScaledGains(0, /*keys=*/true, 1.3f);  // layer 0's bound ~68
  CudaForwardOptions options;
  auto fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  EXPECT_EQ((*fwd)->bounded_score_layers(), 1);
  options.precision = CudaPrecision::kFp32Accurate;
  fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  EXPECT_EQ((*fwd)->bounded_score_layers(), 0);
}

TEST(GpuForwardTest, GraphReplayMatchesRun) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 2;
  const ModelWeights weights = ModelWeights::Deterministic(config, 7);
  CudaForwardOptions options = SizedFor(3, 64, 16);
  auto fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  RandomBatch b = testing::MakeRandomBatch(config, {{64, 16}, {5, 3}, {33, 9}}, true, 5);
  ASSERT_TRUE((*fwd)->Run(b.samples).ok());
  const std::vector<std::vector<float>> want = b.x_out;
  for (const ForwardSample& s : b.samples) Poison(s, config.dim);
  ASSERT_TRUE((*fwd)->Stage(b.samples).ok());
  ASSERT_TRUE((*fwd)->CaptureGraph().ok());
  ASSERT_TRUE((*fwd)->ReplayGraph().ok());
  ASSERT_TRUE((*fwd)->ReplayGraph().ok());
  ASSERT_TRUE((*fwd)->FetchStaged(b.samples).ok());
  EXPECT_EQ(want, b.x_out);
}

// Two forwards of the same weights and sizes: one launching every kernel, one replaying graphs
// from a cache of `cache_size`.
struct LaunchedAndCached {
  std::unique_ptr<CudaForward> launched, cached;
};
absl::StatusOr<LaunchedAndCached> MakeLaunchedAndCached(const ModelWeights& weights,
                                                        CudaForwardOptions options,
                                                        int cache_size) {
  LaunchedAndCached f;
  options.graph_cache_size = 0;
  absl::StatusOr<std::unique_ptr<CudaForward>> launched = CudaForward::Create(weights, options);
  if (!launched.ok()) return launched.status();
  options.graph_cache_size = cache_size;
  absl::StatusOr<std::unique_ptr<CudaForward>> cached = CudaForward::Create(weights, options);
  if (!cached.ok()) return cached.status();
  f.launched = *std::move(launched);
  f.cached = *std::move(cached);
  return f;
}

// Run() on batches of a shape it has run before launches a cached graph of the forward: captured
// on a shape's second run, replayed on later ones, the least recently used dropped when the
// cache is full. Every run has new inputs (values, masks, RoPE offsets) and gives the same bits
// as a forward that launches each kernel, and the first matches the reference.
TEST(GpuForwardTest, RepeatedShapesRunFromCachedGraphs) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 3;
  const ModelWeights weights = ModelWeights::Deterministic(config, 17);
  const std::vector<std::pair<int, int>> shape_a = {{70, 9}, {17, 3}}, shape_b = {{33, 5}};
  auto fwds = MakeLaunchedAndCached(weights, SizedFor(2, 70, 9), 1);
  ASSERT_TRUE(fwds.ok()) << fwds.status();
  CudaForward* const launched = fwds->launched.get();
  CudaForward* const cached = fwds->cached.get();
  // (shape, graph runs after it, cached graphs after it)
  struct Step {
    bool a;
    int64_t graph_runs;
    int cached_graphs;
  };
  const Step steps[] = {
      {true, 0, 0},   // first run of A: launched
      {true, 1, 1},   // second: captured, run from the graph
      {true, 2, 1},   // replayed
      {false, 2, 1},  // first run of B
      {false, 3, 1},  // B captured; A's graph dropped
      {true, 3, 1},   // A counts as new again
      {true, 4, 1},   // and is captured again
      {true, 5, 1},
  };
  for (int i = 0; i < static_cast<int>(std::size(steps)); ++i) {
    const Step& step = steps[i];
    RandomBatch want = testing::MakeRandomBatch(config, step.a ? shape_a : shape_b, true, 60 + i);
    RandomBatch got = testing::MakeRandomBatch(config, step.a ? shape_a : shape_b, true, 60 + i);
    for (const ForwardSample& s : got.samples) Poison(s, config.dim);
    ASSERT_TRUE(launched->Run(want.samples).ok());
    ASSERT_TRUE(cached->Run(got.samples).ok());
    EXPECT_EQ(want.AllOutputs(), got.AllOutputs()) << "run " << i + 1;
    EXPECT_EQ(cached->graph_runs(), step.graph_runs) << "run " << i + 1;
    EXPECT_EQ(cached->cached_graphs(), step.cached_graphs) << "run " << i + 1;
    if (i == 2) EXPECT_LE(CompareWithReference(weights, got, {0, 1}), kBf16Tolerance);
  }
  EXPECT_EQ(launched->graph_runs(), 0);
  EXPECT_EQ(launched->cached_graphs(), 0);
}

// A graph is an optimisation: when a shape's capture fails, Run() launches the forward kernel by
// kernel instead (same bits), caches nothing, and captures the shape again after two more runs.
// The capture is made to fail by querying the stream from the launch hook while it is captured,
// which CUDA does not allow and which invalidates the capture.
TEST(GpuForwardTest, FailedCaptureFallsBackToLaunching) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 2;
  const ModelWeights weights = ModelWeights::Deterministic(config, 23);
  const std::vector<std::pair<int, int>> shape = {{40, 7}, {9, 2}};
  auto fwds = MakeLaunchedAndCached(weights, SizedFor(2, 40, 7), 2);
  ASSERT_TRUE(fwds.ok()) << fwds.status();
  CudaForward* const launched = fwds->launched.get();
  CudaForward* const fwd = fwds->cached.get();
  int captures_to_break = 1, broken = 0;
  fwd->set_launch_hook([&](const char*) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(fwd->stream(), &capture);
    if (capture == cudaStreamCaptureStatusActive && captures_to_break > 0) {
      --captures_to_break;
      ++broken;
      EXPECT_NE(cudaStreamQuery(fwd->stream()), cudaSuccess);  // invalidates the capture
    }
  });
  // (graph runs after it, cached graphs after it)
  const std::pair<int64_t, int> steps[] = {
      {0, 0},  // first run: launched
      {0, 0},  // second: its capture fails, so it is launched
      {0, 0},  // counts as a first run again
      {1, 1},  // captured and run from the graph
      {2, 1},  // replayed
  };
  for (int i = 0; i < static_cast<int>(std::size(steps)); ++i) {
    RandomBatch want = testing::MakeRandomBatch(config, shape, true, 80 + i);
    RandomBatch got = testing::MakeRandomBatch(config, shape, true, 80 + i);
    for (const ForwardSample& s : got.samples) Poison(s, config.dim);
    ASSERT_TRUE(launched->Run(want.samples).ok());
    const absl::Status run = fwd->Run(got.samples);
    ASSERT_TRUE(run.ok()) << "run " << i + 1 << ": " << run;
    EXPECT_EQ(want.AllOutputs(), got.AllOutputs()) << "run " << i + 1;
    EXPECT_EQ(fwd->graph_runs(), steps[i].first) << "run " << i + 1;
    EXPECT_EQ(fwd->cached_graphs(), steps[i].second) << "run " << i + 1;
    if (i == 1) EXPECT_LE(CompareWithReference(weights, got, {0, 1}), kBf16Tolerance);
  }
  EXPECT_EQ(broken, 1);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// q, k, v and the attention output head by head (the wgmma row kernel with the persistent
// attention) are a layout only: the same products in the same order as token by token, so the
// outputs are identical.
TEST(GpuForwardTest, HeadMajorAttentionMatchesTokenMajor) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 2;
  const ModelWeights weights = ModelWeights::Deterministic(config, 9);
  for (int queries : {64, 128, 256}) {
    std::vector<std::vector<float>> outputs[2];
    for (bool head_major : {false, true}) {
      CudaForwardOptions options = SizedFor(4, 300, 40);
      options.row_tile_rows = 64;
      options.attn_tile_queries = queries;
      options.head_major_attention = head_major;
      auto fwd = CudaForward::Create(weights, options);
      ASSERT_TRUE(fwd.ok()) << fwd.status();
      RandomBatch b =
          testing::MakeRandomBatch(config, {{300, 40}, {1, 1}, {37, 5}, {130, 17}}, true, 13);
      ASSERT_TRUE((*fwd)->Run(b.samples).ok());
      EXPECT_LE(CompareWithReference(weights, b, {0, 1, 2, 3}), Tolerance(CudaPrecision::kBf16))
          << queries << "-query tiles, head-major " << head_major;
      outputs[head_major] = b.x_out;
    }
    EXPECT_EQ(outputs[0], outputs[1]) << queries << "-query tiles";
  }
}

// The residual stream in bf16 between the wgmma row kernels: three layers, so that one kernel
// reads and writes it in bf16 between the fp32 input and the fp32 output. Both residual
// precisions stay within the bf16 tolerance of the reference; the outputs differ (the bf16 path
// ran) by about the rounding of a residual. By default a batch this small keeps it in fp32.
TEST(GpuForwardTest, Bf16ResidualMatchesReference) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 3;
  const ModelWeights weights = ModelWeights::Deterministic(config, 17);
  std::vector<float> outputs[3];  // fp32, bf16, by batch size
  for (int bf16_residual : {0, 1, -1}) {
    CudaForwardOptions options = SizedFor(4, 186, 64);
    options.row_tile_rows = 64;
    options.bf16_residual = bf16_residual;
    auto fwd = CudaForward::Create(weights, options);
    ASSERT_TRUE(fwd.ok()) << fwd.status();
    RandomBatch b =
        testing::MakeRandomBatch(config, {{186, 64}, {1, 1}, {70, 9}, {129, 17}}, true, 19);
    ASSERT_TRUE((*fwd)->Run(b.samples).ok());
    const double err = CompareWithReference(weights, b, {0, 1, 2, 3});
    std::printf("bf16_residual = %d: rel err %.3g\n", bf16_residual, err);
    EXPECT_LE(err, Tolerance(CudaPrecision::kBf16));
    std::vector<float>& out = outputs[bf16_residual < 0 ? 2 : bf16_residual];
    for (int i = 0; i < 4; ++i) {
      out.insert(out.end(), b.x_out[i].begin(), b.x_out[i].end());
      out.insert(out.end(), b.context_out[i].begin(), b.context_out[i].end());
    }
  }
  const double diff = testing::RelativeError(outputs[1], outputs[0]);
  std::printf("bf16 against fp32 residual: rel diff %.3g\n", diff);
  EXPECT_GT(diff, 0.0);
  EXPECT_LE(diff, 5e-3);
  EXPECT_EQ(outputs[2], outputs[0]);
}

// The warpgroup-MMA adaLN against the reference and against the mma.sync kernel: with 2 layers
// (their outputs then differ by ~3e-4; a product left out would show) at B = 64, where both
// options run the mma.sync kernel, 65 (the second warpgroup's samples mostly past the batch) and
// 300 (three sample blocks); with all 12 layers (CTAs with more chunks than stages, so that
// stages are refilled; the bf16 rounding of 12 layers takes the outputs ~4e-3 apart) at 512.
// (It is one of the cases compute-sanitizer's racecheck runs on: docs/BENCHMARKS.md.)
TEST(GpuForwardTest, WgmmaAdaLnMatchesMmaSyncAdaLn) {
  SKIP_WITHOUT_GPU();
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  const bool hopper = prop.major == 9 && prop.minor == 0;
  std::mt19937 rng(43);
  struct Case {
    int layers, batch;
    double max_diff;
  };
  for (const Case& c : {Case{2, 64, 0.0}, Case{2, 65, 1e-3}, Case{2, 300, 1e-3},
                        Case{12, 512, 1e-2}}) {
    MmditConfig config = TargetConfig();
    config.num_layers = c.layers;
    const ModelWeights weights = ModelWeights::Deterministic(config, 41);
    std::vector<std::pair<int, int>> lengths;
    for (int i = 0; i < c.batch; ++i) {
      lengths.push_back({std::uniform_int_distribution<int>(1, 24)(rng),
                         std::uniform_int_distribution<int>(1, 12)(rng)});
    }
    std::vector<float> outputs[2];
    for (bool wgmma : {false, true}) {
      CudaForwardOptions options = SizedFor(c.batch, 24, 12);
      options.wgmma_adaln = wgmma;
      auto fwd = CudaForward::Create(weights, options);
      ASSERT_TRUE(fwd.ok()) << fwd.status();
      RandomBatch b = testing::MakeRandomBatch(config, lengths, false, 47);
      b.Poison();
      ASSERT_TRUE((*fwd)->Run(b.samples).ok());
      EXPECT_EQ((*fwd)->wgmma_adaln(), wgmma && hopper && c.batch >= 65) << "B = " << c.batch;
      const double err = CompareWithReference(weights, b, {0, c.batch / 2, c.batch - 1});
      EXPECT_LE(err, Tolerance(CudaPrecision::kBf16)) << "B = " << c.batch << ", wgmma " << wgmma;
      outputs[wgmma] = b.AllOutputs();
    }
    const double diff = testing::RelativeError(outputs[1], outputs[0]);
    std::printf("%d layers, B = %d: wgmma against mma.sync adaLN, rel diff %.3g\n", c.layers,
                c.batch, diff);
    EXPECT_LE(diff, c.max_diff) << "B = " << c.batch;
  }
}

// Per-sample sync changes only when each tile and item runs, not what it computes: its outputs
// equal those of kernels that wait for each other whole, run after run (the counters start from
// zero each forward). Enough samples that the attention CTAs take several items each and the
// row kernel's CTAs several rounds; keys of up to 380 tokens, so some items span two stages.
TEST(GpuForwardTest, PerSampleSyncMatchesWholeKernelWaits) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 3;
  const ModelWeights weights = ModelWeights::Deterministic(config, 23);
  std::mt19937 rng(29);
  std::vector<std::pair<int, int>> lengths;
  // 200 samples: ~1 900 attention items, more chunks of four than an H100's 264 CTAs, so that
  // CTAs go on to a second chunk.
  for (int i = 0; i < 200; ++i) {
    lengths.push_back({std::uniform_int_distribution<int>(1, 300)(rng),
                       std::uniform_int_distribution<int>(1, 80)(rng)});
  }
  std::vector<float> outputs[2];
  for (bool sync : {false, true}) {
    CudaForwardOptions options = SizedFor(200, 300, 80);
    options.row_tile_rows = 64;
    options.attn_tile_queries = 256;
    options.per_sample_sync = sync;
    auto fwd = CudaForward::Create(weights, options);
    ASSERT_TRUE(fwd.ok()) << fwd.status();
    // Two batches of the same shapes, alternately: each run must see its own inputs.
    RandomBatch b = testing::MakeRandomBatch(config, lengths, true, 31);
    RandomBatch other = testing::MakeRandomBatch(config, lengths, true, 37);
    std::vector<float> other_out;
    for (int run = 0; run < 4; ++run) {
      RandomBatch& r = run % 2 == 0 ? b : other;
      r.Poison();
      ASSERT_TRUE((*fwd)->Run(r.samples).ok());
      EXPECT_EQ((*fwd)->per_sample_sync(), sync);
      std::vector<float>& first = run % 2 == 0 ? outputs[sync] : other_out;
      if (run < 2) {
        first = r.AllOutputs();
      } else {
        EXPECT_EQ(r.AllOutputs(), first) << "sync " << sync << ", run " << run;
      }
    }
    EXPECT_NE(other_out, outputs[sync]);
    const double err = CompareWithReference(weights, b, {0, 1, 99, 198, 199});
    std::printf("per_sample_sync = %d: rel err %.3g\n", sync, err);
    EXPECT_LE(err, Tolerance(CudaPrecision::kBf16));
  }
  EXPECT_EQ(outputs[1], outputs[0]);
}

// Options are checked before any device work, so this runs (and fails loudly) without a GPU too.
TEST(CudaForwardOptionsTest, OutOfRangeOptionsAreRejectedWithTheirName) {
  MmditConfig config = TargetConfig();
  config.num_layers = 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 7);
  auto rejected = [&](CudaForwardOptions options, const std::string& field) {
    const absl::Status s = CudaForward::Create(weights, options).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
  };
  CudaForwardOptions options;
  options.bf16_residual = 2;
  rejected(options, "bf16_residual");
  options = CudaForwardOptions();
  options.row_tile_rows = 32;
  rejected(options, "row_tile_rows");
  options = CudaForwardOptions();
  options.attn_tile_queries = 96;
  rejected(options, "attn_tile_queries");
  options = CudaForwardOptions();
  options.max_batch_size = 0;
  rejected(options, "max_batch_size");
  options = CudaForwardOptions();
  options.graph_cache_size = -1;
  rejected(options, "graph_cache_size");
  options = CudaForwardOptions();
  options.copy_threads = 0;
  rejected(options, "copy_threads");
}

// A batch of ~7.7 MB each way moves between the samples and the device in two chunks of the
// staging block, each copied by four threads in pieces while the other chunk is in transfer:
// every sample's outputs land where they belong, the same bits as one thread's copies.
TEST(GpuForwardTest, ParallelHostCopiesMatchOneThread) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 23);
  std::vector<std::pair<int, int>> shapes;
  for (int i = 0; i < 64; ++i) shapes.push_back({150 + i, 40 + i % 24});  // 14 848 tokens
  std::vector<float> outputs[2];
  for (int threads : {1, 4}) {
    CudaForwardOptions options = SizedFor(64, 213, 63);
    options.copy_threads = threads;
    auto fwd = CudaForward::Create(weights, options);
    ASSERT_TRUE(fwd.ok()) << fwd.status();
    RandomBatch b = testing::MakeRandomBatch(config, shapes, false, 77);
    for (const ForwardSample& s : b.samples) Poison(s, config.dim);
    ASSERT_TRUE((*fwd)->Run(b.samples).ok());
    EXPECT_LE(CompareWithReference(weights, b, {0, 31, 63}), kBf16Tolerance);
    outputs[threads == 4] = b.AllOutputs();
  }
  EXPECT_EQ(outputs[0], outputs[1]);
}

TEST(GpuForwardTest, RejectsBatchesOverCapacity) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 7);
  CudaForwardOptions options = SizedFor(2, 32, 8);
  auto fwd = CudaForward::Create(weights, options);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  RandomBatch three = testing::MakeRandomBatch(config, {{4, 4}, {4, 4}, {4, 4}}, false, 1);
  EXPECT_EQ((*fwd)->Run(three.samples).code(), absl::StatusCode::kInvalidArgument);
  RandomBatch long_x = testing::MakeRandomBatch(config, {{33, 4}}, false, 1);
  EXPECT_EQ((*fwd)->Run(long_x.samples).code(), absl::StatusCode::kInvalidArgument);
  RandomBatch long_c = testing::MakeRandomBatch(config, {{3, 9}}, false, 1);
  EXPECT_EQ((*fwd)->Run(long_c.samples).code(), absl::StatusCode::kInvalidArgument);
  RandomBatch bad_mask = testing::MakeRandomBatch(config, {{4, 4}}, true, 1);
  std::fill(bad_mask.masks[0].begin(), bad_mask.masks[0].begin() + 4, 0);  // row 0 sees nothing
  EXPECT_EQ((*fwd)->Run(bad_mask.samples).code(), absl::StatusCode::kInvalidArgument);
  RandomBatch ok = testing::MakeRandomBatch(config, {{32, 8}, {1, 1}}, true, 1);
  EXPECT_TRUE((*fwd)->Run(ok.samples).ok());  // still in service
  options.max_batch_size = 0;
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.max_batch_size = 2;
  options.row_cluster_split = 3;
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.row_cluster_split = 0;
  options.attn_tile_queries = 16;
  options.precision = CudaPrecision::kFp32Accurate;
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.attn_tile_queries = 256;  // the persistent bf16 kernel's only
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.precision = CudaPrecision::kBf16;
  options.persistent_attention = false;
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.attn_tile_queries = 384;
  options.persistent_attention = true;
  EXPECT_EQ(CudaForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GpuForwardTest, UnsupportedShapeIsUnimplemented) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_heads = 4;  // head dim 32
  config.num_layers = 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 7);
  EXPECT_EQ(CudaForward::Create(weights, CudaForwardOptions{}).status().code(),
            absl::StatusCode::kUnimplemented);
}

// With the one-launch forward allowed, a batch of one at the target shape runs as one launch
// (bf16, Hopper), and with the launch per layer allowed as one launch per layer; both match the
// reference and the launch-per-kernel forward.
TEST(GpuForwardTest, OneSampleRunsAsOneLaunch) {
  SKIP_WITHOUT_GPU();
  if (!HopperOrLater()) GTEST_SKIP() << "the one-launch forward needs compute capability 9.0";
  MmditConfig config = TargetConfig();
  config.num_layers = 4;
  const ModelWeights weights = ModelWeights::Deterministic(config, 21);
  std::vector<std::vector<float>> outputs;
  enum Mode { kOneLaunch, kPerLayer, kPerKernel };
  for (Mode mode : {kOneLaunch, kPerLayer, kPerKernel}) {
    CudaForwardOptions options;
    options.max_seq_len = 186;
    options.max_context_len = 64;
    options.fused_forward = mode == kOneLaunch;
    options.fused_layers = mode == kPerLayer;
    auto fwd = CudaForward::Create(weights, options);
    ASSERT_TRUE(fwd.ok()) << fwd.status();
    RandomBatch b = testing::MakeRandomBatch(config, {{186, 64}}, true, 5);
    ASSERT_TRUE((*fwd)->Run(b.samples).ok());
    EXPECT_EQ((*fwd)->fused(), mode == kOneLaunch);
    EXPECT_EQ((*fwd)->fused_layers(), mode == kPerLayer);
    EXPECT_LE(CompareWithReference(weights, b, {0}), kBf16Tolerance);
    // Run after run, the same bits: the grid barrier's counters are back at zero after each
    // launch, and no CTA reads a layer's q, k or v while another writes the next layer's (nor,
    // launched per layer, a tile's residual rows while a peer writes them).
    std::vector<float> first = b.x_out[0];
    for (int run = 0; run < 5; ++run) {
      Poison(b.samples[0], config.dim);
      ASSERT_TRUE((*fwd)->Run(b.samples).ok());
      EXPECT_EQ(first, b.x_out[0]) << "run " << run + 2;
    }
    outputs.push_back(first);
  }
  // The same kernels' arithmetic in all three: only the order of a few sums differs.
  EXPECT_LE(testing::RelativeError(outputs[kOneLaunch], outputs[kPerKernel]), 5e-3);
  EXPECT_LE(testing::RelativeError(outputs[kPerLayer], outputs[kPerKernel]), 5e-3);
}

// A model deeper than the one-launch forward stages runs one launch per kernel even where the
// one-launch forward is allowed: the same bits as with it disallowed.
TEST(GpuForwardTest, DeepModelRunsLaunchPerKernel) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = kFusedForwardMaxLayers + 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 8);
  std::vector<std::vector<float>> outputs;
  for (bool fused : {true, false}) {
    CudaForwardOptions options;
    options.max_seq_len = 20;
    options.max_context_len = 5;
    options.fused_forward = fused;
    options.row_tile_rows = 16;
    options.row_cluster_split = 4;
    options.attn_tile_queries = 16;
    auto fwd = CudaForward::Create(weights, options);
    ASSERT_TRUE(fwd.ok()) << fwd.status();
    RandomBatch b = testing::MakeRandomBatch(config, {{20, 5}}, false, 9);
    ASSERT_TRUE((*fwd)->Run(b.samples).ok());
    EXPECT_FALSE((*fwd)->fused());
    for (float v : b.x_out[0]) ASSERT_TRUE(std::isfinite(v));
    outputs.push_back(b.x_out[0]);
  }
  EXPECT_EQ(outputs[0], outputs[1]);
}

// A small case for compute-sanitizer (memcheck, racecheck): ragged, masked, both precisions,
// every kernel.
TEST(GpuForwardTest, SanitizerCase) {
  SKIP_WITHOUT_GPU();
  MmditConfig config = TargetConfig();
  config.num_layers = 1;
  const ModelWeights weights = ModelWeights::Deterministic(config, 3);
  for (CudaPrecision p : {CudaPrecision::kBf16, CudaPrecision::kFp32Accurate}) {
    // 2, 4: 16-token tiles split over clusters of that size, with 4 (bf16) attention split over
    // keys; 1 and 3: the same tiling as 4 as one launch and as one launch per layer (bf16); 0:
    // 64-token tiles on the comparison kernels; 256 (bf16): 256-query attention tiles with a
    // sample of four 256-key stages, so that one of the kernel's three stage buffers is refilled.
    for (int variant : {16, 2, 4, 1, 3, 64, 0, 256}) {
      const bool fused = variant == 1, fused_layers = variant == 3;
      const bool long_keys = variant == 256;
      if (long_keys && p != CudaPrecision::kBf16) continue;
      if (fused || fused_layers) variant = 4;
      const int rows = variant == 0 || variant >= 64 ? 64 : 16;
      CudaForwardOptions options = SizedFor(3, long_keys ? 800 : 70, 9);
      options.fused_forward = fused;
      options.fused_layers = fused_layers;
      options.use_wgmma = variant != 0;
      options.persistent_attention = variant != 0;
      options.row_cluster_split = variant == 2 || variant == 4 ? variant : 1;
      options.attn_tile_queries =
          long_keys ? 256 : variant == 4 && p == CudaPrecision::kBf16 ? 16 : 0;
      options.precision = p;
      options.row_tile_rows = rows;
      auto fwd = CudaForward::Create(weights, options);
      ASSERT_TRUE(fwd.ok()) << fwd.status();
      RandomBatch b = testing::MakeRandomBatch(
          config, {{long_keys ? 800 : 70, 9}, {1, 1}, {17, 3}}, true, 11);
      ASSERT_TRUE((*fwd)->Run(b.samples).ok());
      EXPECT_EQ((*fwd)->fused(), fused && p == CudaPrecision::kBf16 && HopperOrLater());
      EXPECT_EQ((*fwd)->fused_layers(),
                fused_layers && p == CudaPrecision::kBf16 && HopperOrLater());
      EXPECT_LE(CompareWithReference(weights, b, {0, 1, 2}), Tolerance(p));
    }
  }
}

}  // namespace
}  // namespace mmdit
