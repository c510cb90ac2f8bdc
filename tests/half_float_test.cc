#include "kernels/half_float.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace mmdit {
namespace {

TEST(HalfFloatTest, Fp16RoundTripsEveryFiniteValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    if ((bits & 0x7c00) == 0x7c00) continue;  // inf / NaN checked below
    EXPECT_EQ(FloatToFp16(Fp16ToFloat(bits)), bits) << std::hex << h;
  }
}

TEST(HalfFloatTest, Fp16KnownValues) {
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(Fp16ToFloat(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(Fp16ToFloat(0x7c00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7e00)));
  EXPECT_EQ(FloatToFp16(1e6f), 0x7c00);                    // overflow to infinity
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -26)), 0x0000);   // below half the smallest subnormal
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie rounds to even
  EXPECT_EQ(FloatToFp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

TEST(HalfFloatTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3fc0), 1.5f);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);       // tie → even
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);   // tie → even (up)
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  for (uint32_t h = 0; h < 0x10000; h += 7) {
    const uint16_t bits = static_cast<uint16_t>(h);
    if ((bits & 0x7f80) == 0x7f80) continue;
    EXPECT_EQ(FloatToBf16(Bf16ToFloat(bits)), bits);
  }
}

}  // namespace
}  // namespace mmdit
