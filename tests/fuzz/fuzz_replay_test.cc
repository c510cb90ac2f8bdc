// Replays a fuzz target's seeds and a fixed number of deterministic mutations of them (bit
// flips, truncations, insertions, splices), so that every CI build, sanitizers included,
// exercises the parser on malformed input without needing libFuzzer.
#include <random>

#include "gtest/gtest.h"
#include "tests/fuzz/fuzz_target.h"

namespace mmdit::fuzz {
namespace {

constexpr int kMutationsPerSeed = 3000;

std::string Mutate(std::string s, std::mt19937& rng) {
  const int edits = 1 + rng() % 4;
  for (int e = 0; e < edits; ++e) {
    const size_t pos = s.empty() ? 0 : rng() % s.size();
    switch (rng() % 5) {
      case 0:  // flip a bit
        if (!s.empty()) s[pos] = static_cast<char>(s[pos] ^ (1 << (rng() % 8)));
        break;
      case 1:  // truncate
        s.resize(pos);
        break;
      case 2:  // insert a random byte
        s.insert(s.begin() + pos, static_cast<char>(rng()));
        break;
      case 3:  // overwrite with an interesting byte
        if (!s.empty()) s[pos] = "\0\xff\x7f\x80\"{}[]:,-9"[rng() % 13];
        break;
      default:  // duplicate a span
        if (!s.empty()) s.insert(pos, s.substr(rng() % s.size(), 1 + rng() % 16));
        break;
    }
  }
  return s;
}

TEST(FuzzReplayTest, SeedsAndMutationsNeverCrash) {
  std::mt19937 rng(12345);
  const std::vector<std::string> seeds = Seeds();
  ASSERT_FALSE(seeds.empty());
  int runs = 0;
  for (const std::string& seed : seeds) {
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(seed.data()), seed.size());
    for (int i = 0; i < kMutationsPerSeed; ++i) {
      const std::string input = Mutate(seed, rng);
      LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
      ++runs;
    }
  }
  EXPECT_EQ(runs, kMutationsPerSeed * static_cast<int>(seeds.size()));
}

}  // namespace
}  // namespace mmdit::fuzz
