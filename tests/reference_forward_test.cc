#include "kernels/cpu/reference_forward.h"

#include <cmath>
#include <cstdio>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

TEST(ReferenceForwardTest, MatchesEveryFixtureWithin1e5) {
  for (const std::string& name : testing::FixtureNames()) {
    testing::Fixture f = testing::LoadFixture(name);
    std::vector<float> x_out, context_out;
    std::vector<ForwardSample> samples = testing::FixtureSamples(f, x_out, context_out);
    ASSERT_TRUE(ReferenceForward(f.weights, samples).ok()) << name;
    const double ex = testing::RelativeError(x_out, f.x_out_f64);
    const double ec = testing::RelativeError(context_out, f.context_out_f64);
    EXPECT_LE(ex, 1e-5) << name << " x_out";
    EXPECT_LE(ec, 1e-5) << name << " context_out";
    std::printf("%s: x_out rel err %.3g, context_out rel err %.3g\n", name.c_str(), ex, ec);
  }
}

// Samples in a batch are independent: running one alone gives the same bits as in a batch.
TEST(ReferenceForwardTest, SamplesAreIndependentOfTheirBatch) {
  testing::Fixture f = testing::LoadFixture("small");
  std::vector<float> x_out, context_out;
  std::vector<ForwardSample> samples = testing::FixtureSamples(f, x_out, context_out);
  ASSERT_TRUE(ReferenceForward(f.weights, samples).ok());
  std::vector<float> x1(f.seq_len * f.config.dim), c1(f.context_len * f.config.dim);
  ForwardSample alone = samples[2];
  alone.x_out = x1.data();
  alone.context_out = c1.data();
  ASSERT_TRUE(ReferenceForward(f.weights, {alone}).ok());
  EXPECT_TRUE(std::equal(x1.begin(), x1.end(), samples[2].x_out));
}

// The mask rules of MODEL.md: an all-True mask is the same as no mask, and x keys that no query
// row selects are hidden from context queries.
TEST(ReferenceForwardTest, AllTrueMaskEqualsNoMask) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{9, 3}}, false, 5);
  testing::RandomBatch b = testing::MakeRandomBatch(f.config, {{9, 3}}, false, 5);
  std::vector<uint8_t> ones(81, 1);
  b.samples[0].attn_mask = ones.data();
  ASSERT_TRUE(ReferenceForward(f.weights, a.samples).ok());
  ASSERT_TRUE(ReferenceForward(f.weights, b.samples).ok());
  EXPECT_EQ(a.x_out[0], b.x_out[0]);
  EXPECT_EQ(a.context_out[0], b.context_out[0]);
}

TEST(ReferenceForwardTest, MaskChangesOnlyWhatItHides) {
  testing::Fixture f = testing::LoadFixture("small");
  const int L = 6;
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{L, 2}}, false, 9);
  testing::RandomBatch b = testing::MakeRandomBatch(f.config, {{L, 2}}, false, 9);
  // Causal mask: query i sees keys 0..i. Query 0 then sees only key 0 among x keys.
  std::vector<uint8_t> causal(L * L, 0);
  for (int i = 0; i < L; ++i) {
    for (int j = 0; j <= i; ++j) causal[i * L + j] = 1;
  }
  b.samples[0].attn_mask = causal.data();
  ASSERT_TRUE(ReferenceForward(f.weights, a.samples).ok());
  ASSERT_TRUE(ReferenceForward(f.weights, b.samples).ok());
  EXPECT_GT(testing::RelativeError(b.x_out[0], a.x_out[0]), 1e-3);
  for (float v : b.x_out[0]) ASSERT_TRUE(std::isfinite(v));
}

TEST(ReferenceForwardTest, StartPosShiftsOnlyTheXStreamRotation) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{5, 3}}, false, 11);
  testing::RandomBatch b = testing::MakeRandomBatch(f.config, {{5, 3}}, false, 11);
  a.samples[0].start_pos = 0;
  b.samples[0].start_pos = 17;
  ASSERT_TRUE(ReferenceForward(f.weights, a.samples).ok());
  ASSERT_TRUE(ReferenceForward(f.weights, b.samples).ok());
  EXPECT_GT(testing::RelativeError(b.x_out[0], a.x_out[0]), 1e-4);
}

TEST(ReferenceForwardTest, RejectsMaskRowWithNoVisibleKey) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{4, 2}, {4, 2}}, true, 3);
  std::fill_n(a.masks[1].begin() + 2 * 4, 4, 0);  // row 2 of sample 1
  absl::Status s = ReferenceForward(f.weights, a.samples);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("sample 1: attn_mask row 2 has no visible key"));
  EXPECT_TRUE(std::isnan(a.x_out[0][0])) << "nothing is written when a sample is invalid";
}

TEST(ReferenceForwardTest, RejectsPositionsPastMaxSeqLen) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{8, 2}}, false, 3);
  a.samples[0].start_pos = f.config.max_seq_len - 7;
  absl::Status s = ReferenceForward(f.weights, a.samples);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("start_pos + L = 4097 exceeds max_seq_len 4096"));
  a.samples[0].start_pos = f.config.max_seq_len - 8;
  EXPECT_TRUE(ReferenceForward(f.weights, a.samples).ok());
  a.samples[0].start_pos = -1;
  EXPECT_THAT(std::string(ReferenceForward(f.weights, a.samples).message()), HasSubstr(">= 0"));
}

TEST(ReferenceForwardTest, RejectsEmptySequences) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a = testing::MakeRandomBatch(f.config, {{3, 2}}, false, 3);
  a.samples[0].context_len = 0;
  EXPECT_THAT(std::string(ReferenceForward(f.weights, a.samples).message()), HasSubstr("C = 0"));
}

TEST(ReferenceForwardTest, OddShapesStayFinite) {
  testing::Fixture f = testing::LoadFixture("small");
  testing::RandomBatch a =
      testing::MakeRandomBatch(f.config, {{1, 1}, {17, 1}, {1, 33}, {31, 7}}, true, 21);
  ASSERT_TRUE(ReferenceForward(f.weights, a.samples).ok());
  for (const auto& v : a.x_out) {
    for (float e : v) ASSERT_TRUE(std::isfinite(e));
  }
}

}  // namespace
}  // namespace mmdit
