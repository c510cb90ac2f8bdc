// The CPU fast forward against the shared fixtures (float64 outputs of the original) and against
// the reference forward on random ragged batches. The fast path is written from MODEL.md apart
// from the reference, so agreement also checks the reference.
#include "kernels/cpu/fast_forward.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/reference_forward.h"
#include "kernels/thread_pool.h"
#include "kernels/model_weights.h"
#include "tests/test_util.h"

// Counts every operator new in this binary, so a test can check that a forward allocates nothing.
std::atomic<int64_t> g_allocations{0};

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n == 0 ? 1 : n);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace mmdit {
namespace {

using ::mmdit::testing::Fixture;
using ::mmdit::testing::FixtureNames;
using ::mmdit::testing::FixtureSamples;
using ::mmdit::testing::LoadFixture;
using ::mmdit::testing::RelativeError;

constexpr double kFp32Tolerance = 1e-5;

enum class MaskKind { kNone, kRandom, kCausal, kSparse };

using Batch = testing::RandomBatch;

// The shared random ragged batch (outputs NaN), with this test's mask kinds drawn over it and
// start_pos up to 199.
Batch MakeBatch(int d, const std::vector<std::pair<int, int>>& lengths, MaskKind mask,
                uint64_t seed) {
  MmditConfig config;
  config.dim = d;
  Batch batch = testing::MakeRandomBatch(config, lengths, mask != MaskKind::kNone, seed);
  std::mt19937_64 rng(seed ^ 0x5eed);
  for (size_t b = 0; b < lengths.size(); ++b) {
    const int l = lengths[b].first;
    batch.samples[b].start_pos = static_cast<int64_t>(rng() % 200);
    if (mask != MaskKind::kCausal && mask != MaskKind::kSparse) continue;
    auto& m = batch.masks[b];
    for (int i = 0; i < l; ++i) {
      for (int j = 0; j < l; ++j) {
        // Sparse: most keys invisible to every query, so context queries see few x keys.
        m[static_cast<size_t>(i) * l + j] =
            mask == MaskKind::kCausal ? j <= i : (j % 5 == 0) && rng() % 2 == 0;
      }
      if (mask == MaskKind::kSparse) m[static_cast<size_t>(i) * l + (i % 5 == 0 ? i : 0)] = 1;
    }
  }
  return batch;
}

MmditConfig Config(int dim, int heads, int ff, int layers) {
  MmditConfig config;
  config.dim = dim;
  config.num_heads = heads;
  config.dim_feedforward = ff;
  config.num_layers = layers;
  config.max_seq_len = 512;
  return config;
}

// Runs `lengths` through the reference and the fast path and returns the relative error.
double CompareWithReference(const ModelWeights& weights, CpuFastForward& fast,
                            const std::vector<std::pair<int, int>>& lengths, MaskKind mask,
                            uint64_t seed) {
  Batch ref = MakeBatch(weights.config.dim, lengths, mask, seed);
  Batch got = MakeBatch(weights.config.dim, lengths, mask, seed);
  EXPECT_TRUE(ReferenceForward(weights, ref.samples).ok());
  got.Poison();
  const absl::Status st = fast.Run(got.samples);
  EXPECT_TRUE(st.ok()) << st;
  const std::vector<float> out = got.AllOutputs();
  for (float v : out) {
    if (!std::isfinite(v)) {
      ADD_FAILURE() << "non-finite output";
      return 1.0;
    }
  }
  return RelativeError(out, ref.AllOutputs());
}

std::unique_ptr<CpuFastForward> MakeFast(const ModelWeights& weights, int threads,
                                         int max_batch_size) {
  CpuForwardOptions options;
  options.threads = threads;
  options.max_batch_size = max_batch_size;
  auto fast = CpuFastForward::Create(weights, options);
  EXPECT_TRUE(fast.ok()) << fast.status();
  return fast.ok() ? std::move(*fast) : nullptr;
}

// Every instruction-set variant this CPU runs: the widest (picked by default), AVX2 and the
// generic one every x86-64 runs.
class CpuFastForwardTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    // Without AVX-512 the widest variant is the AVX2 one: no need to run it twice.
    if (std::string(GetParam()) == "avx2" && !__builtin_cpu_supports("avx512f")) {
      GTEST_SKIP() << "the widest variant on this CPU is avx2";
    }
    if (*GetParam() != '\0') {
      setenv("MMDIT_CPU_KERNELS", GetParam(), 1);
    } else {
      unsetenv("MMDIT_CPU_KERNELS");
    }
  }
  void TearDown() override { unsetenv("MMDIT_CPU_KERNELS"); }
};

TEST_P(CpuFastForwardTest, MatchesFixtures) {
  for (const std::string& name : FixtureNames()) {
    SCOPED_TRACE(name);
    const Fixture f = LoadFixture(name);
    auto fast = MakeFast(f.weights, 2, f.batch);
    ASSERT_NE(fast, nullptr);
    std::vector<float> x_out, context_out;
    const std::vector<ForwardSample> samples = FixtureSamples(f, x_out, context_out);
    std::fill(x_out.begin(), x_out.end(), NAN);
    std::fill(context_out.begin(), context_out.end(), NAN);
    ASSERT_TRUE(fast->Run(samples).ok());
    const double ex = RelativeError(x_out, f.x_out_f64);
    const double ec = RelativeError(context_out, f.context_out_f64);
    EXPECT_LE(ex, kFp32Tolerance) << "x_out";
    EXPECT_LE(ec, kFp32Tolerance) << "context_out";
    std::printf("fixture %s: x_out rel err %.3g, context_out rel err %.3g\n", name.c_str(), ex,
                ec);
  }
}

TEST_P(CpuFastForwardTest, MatchesReferenceOnRaggedBatches) {
  struct Case {
    MmditConfig config;
    std::vector<std::pair<int, int>> lengths;
    MaskKind mask;
    int threads;
  };
  const std::vector<Case> cases = {
      // Dh = 16 (the target's head dim: the vectorised attention tile).
      {Config(64, 4, 96, 2), {{1, 1}}, MaskKind::kNone, 2},
      {Config(64, 4, 96, 2), {{1, 1}}, MaskKind::kRandom, 1},
      {Config(64, 4, 96, 2), {{7, 1}, {1, 9}, {33, 5}, {2, 2}, {16, 16}}, MaskKind::kNone, 2},
      {Config(64, 4, 96, 2), {{7, 1}, {1, 9}, {33, 5}, {2, 2}, {16, 16}}, MaskKind::kRandom, 3},
      {Config(64, 4, 96, 2), {{45, 3}, {13, 17}, {31, 1}}, MaskKind::kCausal, 2},
      {Config(64, 4, 96, 2), {{45, 3}, {13, 17}, {31, 1}}, MaskKind::kSparse, 2},
      {Config(128, 8, 256, 1),
       {{3, 2}, {5, 1}, {1, 3}, {9, 4}, {2, 7}, {4, 4}, {6, 1}, {1, 1},
        {11, 2}, {3, 3}, {8, 5}, {2, 1}, {7, 7}, {1, 2}, {5, 5}, {10, 1}},
       MaskKind::kRandom, 2},
      {Config(128, 8, 512, 1), {{186, 64}}, MaskKind::kNone, 2},
      // Other head dims go through the general attention loop.
      {Config(32, 4, 64, 2), {{5, 3}, {19, 1}, {1, 6}}, MaskKind::kRandom, 2},
      {Config(64, 2, 128, 2), {{5, 3}, {19, 1}, {1, 6}}, MaskKind::kCausal, 2},
      {Config(24, 2, 40, 3), {{9, 2}, {1, 1}}, MaskKind::kNone, 2},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "D=" << c.config.dim << " H=" << c.config.num_heads
                                    << " B=" << c.lengths.size() << " mask="
                                    << static_cast<int>(c.mask) << " threads=" << c.threads);
    const ModelWeights weights = ModelWeights::Deterministic(c.config, seed);
    auto fast = MakeFast(weights, c.threads, static_cast<int>(c.lengths.size()));
    ASSERT_NE(fast, nullptr);
    const double err = CompareWithReference(weights, *fast, c.lengths, c.mask, seed);
    EXPECT_LE(err, kFp32Tolerance);
    std::printf("D=%d H=%d B=%zu mask=%d: rel err %.3g\n", c.config.dim, c.config.num_heads,
                c.lengths.size(), static_cast<int>(c.mask), err);
    ++seed;
  }
}

// One instance serves batches of changing shapes: the workspace grows when needed, and a
// smaller batch after a larger one still writes every output.
TEST_P(CpuFastForwardTest, ReusedAcrossShapes) {
  const MmditConfig config = Config(64, 4, 96, 2);
  const ModelWeights weights = ModelWeights::Deterministic(config, 7);
  auto fast = MakeFast(weights, 2, 4);
  ASSERT_NE(fast, nullptr);
  const std::vector<std::vector<std::pair<int, int>>> shapes = {
      {{3, 2}}, {{300, 40}, {2, 100}}, {{5, 5}, {1, 1}, {9, 2}, {4, 3}}, {{1, 1}}};
  uint64_t seed = 100;
  for (const auto& lengths : shapes) {
    for (MaskKind mask : {MaskKind::kNone, MaskKind::kRandom}) {
      EXPECT_LE(CompareWithReference(weights, *fast, lengths, mask, seed++), kFp32Tolerance);
    }
  }
}

// Workspace is sized at Create or grown by the first batch of a shape; a batch of a shape seen
// before allocates nothing.
TEST_P(CpuFastForwardTest, SeenShapeDoesNotAllocate) {
  const MmditConfig config = Config(64, 4, 96, 2);
  const ModelWeights weights = ModelWeights::Deterministic(config, 11);
  auto fast = MakeFast(weights, 2, 3);
  ASSERT_NE(fast, nullptr);
  Batch batch = MakeBatch(config.dim, {{37, 5}, {3, 64}, {1, 1}}, MaskKind::kRandom, 12);
  const int64_t first = g_allocations.load();
  ASSERT_TRUE(fast->Run(batch.samples).ok());
  EXPECT_GT(g_allocations.load(), first) << "the first masked batch grows the mask rows";
  Batch same = MakeBatch(config.dim, {{37, 5}, {3, 64}, {1, 1}}, MaskKind::kRandom, 13);
  const int64_t before = g_allocations.load();
  const absl::Status st = fast->Run(same.samples);
  const int64_t allocations = g_allocations.load() - before;
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(allocations, 0);
}

// The pool and a small threaded forward: short, so the ThreadSanitizer build runs them too
// (the `tsan` entry in cpu_fast_tests.cmake).
TEST(ThreadPoolTest, RunsEveryTaskOnceOnValidThreads) {
  ThreadPool pool(4);
  std::vector<std::atomic<int>> runs(1000);
  std::atomic<int> bad_thread{0};
  pool.ParallelFor(1000, [&](int task, int thread) {
    runs[task].fetch_add(1);
    if (thread < 0 || thread >= 4) bad_thread.fetch_add(1);
  });
  for (const auto& r : runs) ASSERT_EQ(r.load(), 1);
  EXPECT_EQ(bad_thread.load(), 0);
}

TEST(ThreadPoolTest, ManyShortLoopsAndIdleGaps) {
  ThreadPool pool(3);
  std::vector<int64_t> sums(3, 0);
  int64_t expected = 0;
  for (int loop = 0; loop < 2000; ++loop) {
    // Per-thread slots: each thread writes only its own, the pool orders loops.
    pool.ParallelFor(5, [&](int task, int thread) { sums[thread] += task + loop; });
    expected += 10 + 5 * loop;
    if (loop % 500 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(sums[0] + sums[1] + sums[2], expected);
}

TEST(ThreadPoolTest, SmallForwardWithThreeThreads) {
  const MmditConfig config = Config(32, 4, 64, 1);
  const ModelWeights weights = ModelWeights::Deterministic(config, 21);
  auto fast = MakeFast(weights, 3, 3);
  ASSERT_NE(fast, nullptr);
  for (int repeat = 0; repeat < 2; ++repeat) {
    EXPECT_LE(CompareWithReference(weights, *fast, {{5, 3}, {2, 2}, {9, 1}}, MaskKind::kRandom,
                                   22 + repeat),
              kFp32Tolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, CpuFastForwardTest, ::testing::Values("", "avx2", "generic"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           return *info.param == '\0' ? std::string("Widest")
                                                       : std::string(info.param);
                         });

TEST(CpuFastForwardErrorsTest, RejectsBadOptions) {
  const ModelWeights weights = ModelWeights::Deterministic(Config(32, 4, 64, 1), 1);
  CpuForwardOptions options;
  options.max_batch_size = 0;
  EXPECT_EQ(CpuFastForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.max_batch_size = 1;
  options.threads = -1;
  EXPECT_EQ(CpuFastForward::Create(weights, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CpuFastForwardErrorsTest, RejectsBadBatchesWithoutWriting) {
  const MmditConfig config = Config(32, 4, 64, 1);
  const ModelWeights weights = ModelWeights::Deterministic(config, 1);
  auto fast = MakeFast(weights, 2, 2);
  ASSERT_NE(fast, nullptr);

  Batch too_many = MakeBatch(config.dim, {{2, 2}, {2, 2}, {2, 2}}, MaskKind::kNone, 3);
  EXPECT_EQ(fast->Run(too_many.samples).code(), absl::StatusCode::kInvalidArgument);

  // A mask row with no visible key, and a position past max_seq_len.
  Batch bad = MakeBatch(config.dim, {{3, 1}, {4, 2}}, MaskKind::kCausal, 4);
  bad.masks[1][1 * 4 + 0] = 0;
  bad.masks[1][1 * 4 + 1] = 0;
  EXPECT_EQ(fast->Run(bad.samples).code(), absl::StatusCode::kInvalidArgument);
  Batch far = MakeBatch(config.dim, {{3, 1}}, MaskKind::kNone, 5);
  far.samples[0].start_pos = config.max_seq_len - 2;
  EXPECT_EQ(fast->Run(far.samples).code(), absl::StatusCode::kInvalidArgument);
  for (const Batch* b : {&bad, &far}) {
    for (float v : b->AllOutputs()) ASSERT_TRUE(std::isnan(v));
  }
}

}  // namespace
}  // namespace mmdit
