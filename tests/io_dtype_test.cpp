// Tests of moe/io/dtype.hpp: names and sizes, exact decoding, round-to-nearest-even encoding.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <gtest/gtest.h>

#include "moe/io/dtype.hpp"

namespace {

using moe::io::Dtype;

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TEST(IoDtype, NamesSizesAndParsing) {
  const Dtype all[] = {Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F8_E4M3, Dtype::I64,
                       Dtype::I32, Dtype::I16, Dtype::I8,  Dtype::U8,   Dtype::BOOL};
  const char* names[] = {"F64", "F32", "F16", "BF16", "F8_E4M3", "I64",
                         "I32", "I16", "I8",  "U8",   "BOOL"};
  const std::size_t sizes[] = {8, 4, 2, 2, 1, 8, 4, 2, 1, 1, 1};
  for (int i = 0; i < 11; ++i) {
    EXPECT_STREQ(moe::io::dtype_name(all[i]), names[i]);
    EXPECT_EQ(moe::io::dtype_size(all[i]), sizes[i]) << names[i];
    EXPECT_EQ(moe::io::dtype_from_name(names[i]), all[i]);
    EXPECT_EQ(moe::io::dtype_is_floating(all[i]), i < 5) << names[i];
  }
  EXPECT_FALSE(moe::io::dtype_from_name("f32"));
  EXPECT_FALSE(moe::io::dtype_from_name("F8_E5M2"));
  EXPECT_FALSE(moe::io::dtype_from_name(""));
}

// ---- bfloat16 ----

TEST(IoDtype, Bf16RoundsToNearestEven) {
  using moe::io::float_to_bf16;
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);  // 1 + 2^-8: tie, down to even
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);  // 1 + 3*2^-8: tie, up to even
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);  // just above the tie
  EXPECT_EQ(float_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // just below the tie
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F7FFF)), 0x7F7F);  // largest finite bf16
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F8000)), 0x7F80);  // tie to even overflows to inf
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(float_to_bf16(-kInf), 0xFF80);
  // Subnormals round like everything else.
  EXPECT_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);  // half the smallest: tie to 0
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // 1.5 smallest: tie to 2
  EXPECT_EQ(float_to_bf16(from_bits(0x00010000)), 0x0001);  // smallest bf16 subnormal
}

TEST(IoDtype, Bf16NanStaysNan) {
  // Truncating 0x7F800001 would give 0x7F80, infinity.
  const std::uint16_t b = moe::io::float_to_bf16(from_bits(0x7F800001));
  EXPECT_EQ(b & 0x7F80, 0x7F80);
  EXPECT_NE(b & 0x007F, 0);
  EXPECT_EQ(moe::io::float_to_bf16(-kNaN) & 0x8000, 0x8000);
  EXPECT_TRUE(std::isnan(moe::io::bf16_to_float(moe::io::float_to_bf16(kNaN))));
}

TEST(IoDtype, DoubleRoundsOnceNotThroughFloat) {
  // 1 + 2^-8 + 2^-40 is above the bf16 tie, but rounds to the tie 1 + 2^-8 in float, which would
  // then round down to 1.
  const double x = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  EXPECT_EQ(moe::io::float_to_bf16(static_cast<float>(x)), 0x3F80);
  EXPECT_EQ(moe::io::double_to_bf16(x), 0x3F81);
  const double y = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // same for f16
  EXPECT_EQ(moe::io::double_to_f16(y), 0x3C01);
  const double z = 1.0 + std::ldexp(1.0, -4) + std::ldexp(1.0, -40);  // and for e4m3
  EXPECT_EQ(moe::io::double_to_e4m3(z), 0x39);
}

// ---- IEEE binary16 ----

TEST(IoDtype, F16DecodesExactly) {
  using moe::io::f16_to_float;
  EXPECT_EQ(f16_to_float(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_float(0xC000), -2.0f);
  EXPECT_EQ(f16_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(f16_to_float(0xFBFF), -65504.0f);
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_float(0x03FF), 1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_float(0x7C00), kInf);
  EXPECT_EQ(f16_to_float(0xFC00), -kInf);
  EXPECT_TRUE(std::isnan(f16_to_float(0x7E00)));
  EXPECT_TRUE(std::isnan(f16_to_float(0x7C01)));
  EXPECT_TRUE(std::signbit(f16_to_float(0x8000)));
}

TEST(IoDtype, F16RoundsToNearestEven) {
  using moe::io::float_to_f16;
  EXPECT_EQ(float_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie, down to even
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie, up to even
  EXPECT_EQ(float_to_f16(0.1f), 0x2E66);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_f16(65519.0f), 0x7BFF);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7C00);  // tie with 65536 rounds to even: infinity
  EXPECT_EQ(float_to_f16(1e10f), 0x7C00);
  EXPECT_EQ(float_to_f16(kInf), 0x7C00);
  EXPECT_EQ(float_to_f16(-kInf), 0xFC00);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  // Subnormals: multiples of 2^-24.
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);     // tie to even: 0
  EXPECT_EQ(float_to_f16(std::ldexp(1.5f, -25)), 0x0001);     // above the tie
  EXPECT_EQ(float_to_f16(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 units: tie to even 2
  EXPECT_EQ(float_to_f16(std::ldexp(1023.0f, -24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(float_to_f16(std::ldexp(2047.0f, -25)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14)), 0x0400);     // smallest normal
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -100)), 0x0000);    // far underflow
  EXPECT_EQ(float_to_f16(-std::ldexp(1.0f, -100)), 0x8000);   // keeps the sign
  EXPECT_EQ(float_to_f16(from_bits(0x00000001)), 0x0000);     // float subnormal
  const std::uint16_t nan = float_to_f16(kNaN);
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  EXPECT_EQ(float_to_f16(from_bits(0x7F800001)) & 0x3FF, 0x200);  // quiet, never infinity
}

// ---- F8_E4M3 (E4M3FN) ----

TEST(IoDtype, E4m3DecodesExactly) {
  using moe::io::e4m3_to_float;
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x07), std::ldexp(7.0f, -9));  // largest subnormal
  EXPECT_EQ(e4m3_to_float(0x78), 256.0f);                // exponent 15 is finite in E4M3FN
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xFF)));
  EXPECT_TRUE(std::signbit(e4m3_to_float(0x80)));
  EXPECT_EQ(e4m3_to_float(0x80), 0.0f);
}

TEST(IoDtype, E4m3RoundsToNearestEven) {
  using moe::io::float_to_e4m3;
  EXPECT_EQ(float_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);  // 1 + 2^-4: tie, down to even
  EXPECT_EQ(float_to_e4m3(1.1875f), 0x3A);  // 1 + 3*2^-4: tie, up to even
  EXPECT_EQ(float_to_e4m3(-3.0f), 0xC4);
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  // Subnormals: multiples of 2^-9.
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -10)), 0x00);   // tie to even: 0
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.25f, -10)), 0x01);  // above the tie
  EXPECT_EQ(float_to_e4m3(std::ldexp(3.0f, -10)), 0x02);   // 1.5 units: tie to 2
  EXPECT_EQ(float_to_e4m3(std::ldexp(7.0f, -9)), 0x07);
  EXPECT_EQ(float_to_e4m3(std::ldexp(15.0f, -10)), 0x08);  // 7.5 units: tie, up to 8 = 2^-6
  EXPECT_EQ(float_to_e4m3(-std::ldexp(1.0f, -12)), 0x80);  // underflow keeps the sign
}

TEST(IoDtype, E4m3MaxIs448AndOverflowIsNanOrSaturates) {
  using moe::io::float_to_e4m3;
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(460.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(464.0f), 0x7E);  // tie between 448 and (NaN slot) 480: even is 448
  EXPECT_EQ(float_to_e4m3(464.5f), 0x7F);  // beyond: NaN, as torch.float8_e4m3fn
  EXPECT_EQ(float_to_e4m3(-1000.0f), 0xFF);
  EXPECT_EQ(float_to_e4m3(kInf), 0x7F);
  EXPECT_EQ(float_to_e4m3(-kInf), 0xFF);
  EXPECT_EQ(float_to_e4m3(464.5f, /*saturate=*/true), 0x7E);
  EXPECT_EQ(float_to_e4m3(-1e30f, true), 0xFE);
  EXPECT_EQ(float_to_e4m3(kInf, true), 0x7E);
  EXPECT_EQ(float_to_e4m3(-kInf, true), 0xFE);
  EXPECT_EQ(float_to_e4m3(kNaN), 0x7F);
  EXPECT_EQ(float_to_e4m3(kNaN, true), 0x7F);  // NaN is never saturated
  EXPECT_EQ(float_to_e4m3(-kNaN), 0xFF);
}

// ---- exhaustive properties ----

// Every finite code decodes and re-encodes to itself; the midpoint between two neighbouring
// codes rounds to the even one, and the doubles just beside it round to the nearer one.
template <class Decode, class Encode>
void check_codes(int num_codes, std::uint32_t sign_bit, Decode decode, Encode encode) {
  for (std::uint32_t c = 0; c + 1 < static_cast<std::uint32_t>(num_codes); ++c) {
    if (c & sign_bit) continue;
    const double a = decode(c);
    const double b = decode(c + 1);
    if (std::isnan(a)) continue;
    ASSERT_EQ(encode(a), c) << "code " << c;
    ASSERT_EQ(encode(-a), c | sign_bit) << "code " << c;
    if (std::isnan(b) || std::isinf(b)) continue;
    const double mid = (a + b) / 2;  // exact in double
    ASSERT_EQ(encode(mid), (c & 1) ? c + 1 : c) << "midpoint after code " << c;
    ASSERT_EQ(encode(std::nextafter(mid, 0.0)), c) << "below midpoint after code " << c;
    ASSERT_EQ(encode(std::nextafter(mid, 1e300)), c + 1) << "above midpoint after code " << c;
  }
}

TEST(IoDtype, ExhaustiveF16) {
  check_codes(
      0x10000, 0x8000, [](std::uint32_t c) { return moe::io::f16_to_float(std::uint16_t(c)); },
      [](double x) { return std::uint32_t{moe::io::double_to_f16(x)}; });
}

TEST(IoDtype, ExhaustiveBf16) {
  check_codes(
      0x10000, 0x8000, [](std::uint32_t c) { return moe::io::bf16_to_float(std::uint16_t(c)); },
      [](double x) { return std::uint32_t{moe::io::double_to_bf16(x)}; });
}

TEST(IoDtype, ExhaustiveE4m3) {
  check_codes(
      0x100, 0x80, [](std::uint32_t c) { return moe::io::e4m3_to_float(std::uint8_t(c)); },
      [](double x) { return std::uint32_t{moe::io::double_to_e4m3(x)}; });
}

}  // namespace
