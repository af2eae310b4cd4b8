// The block-quantised formats (kernels/quant_formats.hpp), the activation quantisation
// (kernels/quant_activations.hpp) and the decode products (kernels/gemv_quant.hpp, gemv_bf16.hpp):
// byte layouts and semantics on hand-built blocks, rounding and scale choices, error messages,
// SIMD == scalar bit for bit over awkward sizes, the exact mode bitwise equal to the fp32 kernel
// on the dequantised weights, and the accuracy of the fast mode against the fp32 product.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/kernels/gemm_quant_prefill.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/kernels/gemv_bf16.hpp"
#include "moe/kernels/gemv_quant.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/quant_activations.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/kernels/quant_panels.hpp"

#include "test_util.hpp"

namespace moe::kernels {
namespace {

std::vector<float> gaussian(Index count, std::mt19937& rng, float sigma) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(std::size_t(count), 0.0f);
  for (float& f : v) f = dist(rng);
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double nmse(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return num / den;
}

// ---- scalar conversions ----

TEST(QuantFp16, RoundTripsEveryHalfAndRoundsToNearestEven) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = fp16_to_float(std::uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(f))));
      continue;
    }
    ASSERT_EQ(float_to_fp16(f), h) << h;
  }
  EXPECT_EQ(fp16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(fp16_to_float(0x0001), 0x1p-24f);  // smallest subnormal
  EXPECT_EQ(float_to_fp16(1.0f + 0x1p-11f), 0x3c00);          // tie -> even (1.0)
  EXPECT_EQ(float_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);      // tie -> even (1 + 2^-9)
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);                 // 65504
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);                 // rounds past the largest: inf
  EXPECT_EQ(float_to_fp16(-0x1p-25f), 0x8000);                // tie to even zero, sign kept
  EXPECT_EQ(float_to_fp16(0x1.8p-25f), 0x0001);
}

TEST(QuantFp16, MatchesTheHardwareConversion) {
#if defined(__F16C__)
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float want = _cvtsh_ss(std::uint16_t(h));
    const float got = fp16_to_float(std::uint16_t(h));
    if (std::isnan(want)) continue;
    ASSERT_EQ(std::memcmp(&got, &want, 4), 0) << h;
  }
#else
  GTEST_SKIP() << "no F16C";
#endif
}

// ---- formats on hand-built blocks (the ggml and gpt-oss byte layouts) ----

TEST(QuantQ8, GgmlByteLayoutAndValues) {
  // A Q8_0 block as it lies in a GGUF file: fp16 d (little endian) then 32 int8.
  unsigned char bytes[34];
  const std::uint16_t d = 0x3800;  // 0.5
  std::memcpy(bytes, &d, 2);
  for (int i = 0; i < 32; ++i) bytes[2 + i] = static_cast<unsigned char>(std::int8_t(i - 16));
  BlockQ8 block;
  std::memcpy(&block, bytes, sizeof block);
  const Q8View w{&block, 1, 32};
  float out[32];
  dequantize_row(w, 0, out);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 0.5f * float(i - 16)) << i;
  EXPECT_EQ(w.bytes(), 34u);
}

// Squared error of a block with codes round(w / d) clamped to [qmin, qmax].
double block_error(const float* w, float d, int qmin, int qmax) {
  double err = 0.0;
  for (int i = 0; i < 32; ++i) {
    const float q = d != 0.0f ? std::clamp(std::nearbyint(w[i] / d), float(qmin), float(qmax)) : 0.f;
    err += (double(w[i]) - double(q) * d) * (double(w[i]) - double(q) * d);
  }
  return err;
}

TEST(QuantQ8, CodesRoundWithTheStoredScaleWhichBeatsAbsmax) {
  std::mt19937 rng(1);
  const std::vector<float> w = gaussian(32 * 64, rng, 0.3f);
  std::vector<BlockQ8> blocks(64);
  quantize_q8_row(w.data(), 32 * 64, blocks.data());
  double searched = 0.0, absmax = 0.0;
  for (int b = 0; b < 64; ++b) {
    const float* x = &w[std::size_t(b * 32)];
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = fp16_to_float(blocks[std::size_t(b)].d);
    for (int i = 0; i < 32; ++i) {
      const float q = std::clamp(std::nearbyint(x[i] / d), -127.0f, 127.0f);
      ASSERT_EQ(blocks[std::size_t(b)].q[i], std::int8_t(q));
    }
    searched += block_error(x, d, -127, 127);
    absmax += block_error(x, fp16_to_float(float_to_fp16(amax / 127.0f)), -127, 127);
  }
  std::printf("[ quant    ] q8 scale search: squared error %.3g of absmax's\n", searched / absmax);
  EXPECT_LT(searched, absmax);
}

TEST(QuantQ4, GgmlNibbleOrderAndOffset) {
  // Element i in the low nibble of byte i, element i + 16 in the high nibble; w = (q - 8) d.
  BlockQ4 block;
  block.d = 0x4000;  // 2.0
  for (int i = 0; i < 16; ++i) block.q[i] = std::uint8_t((i & 15) | ((15 - i) << 4));
  const Q4View w{&block, 1, 32};
  float out[32];
  dequantize_row(w, 0, out);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(out[i], 2.0f * float(i - 8)) << i;
    EXPECT_EQ(out[i + 16], 2.0f * float(15 - i - 8)) << i;
  }
}

TEST(QuantQ4, CodesRoundWithTheStoredScaleWhichBeatsGgmls) {
  // ggml Q4_0: d = m / -8 with m the signed weight of largest magnitude; the search refines it.
  std::mt19937 rng(12);
  const std::vector<float> w = gaussian(32 * 64, rng, 0.3f);
  std::vector<BlockQ4> blocks(64);
  quantize_q4_row(w.data(), 32 * 64, blocks.data());
  double searched = 0.0, ggml = 0.0;
  for (int b = 0; b < 64; ++b) {
    const float* x = &w[std::size_t(b * 32)];
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) {
      if (std::fabs(x[i]) > std::fabs(m)) m = x[i];
    }
    const float d = fp16_to_float(blocks[std::size_t(b)].d);
    float out[32];
    dequantize_row(Q4View{&blocks[std::size_t(b)], 1, 32}, 0, out);
    for (int i = 0; i < 32; ++i) {
      const float q = std::clamp(std::nearbyint(x[i] / d), -8.0f, 7.0f);
      ASSERT_EQ(out[i], q * d);
    }
    searched += block_error(x, d, -8, 7);
    ggml += block_error(x, fp16_to_float(float_to_fp16(m / -8.0f)), -8, 7);
  }
  std::printf("[ quant    ] q4 scale search: squared error %.3g of ggml's\n", searched / ggml);
  EXPECT_LT(searched, 0.9 * ggml);
}

TEST(QuantMxfp4, GptOssNibbleOrderCodesAndScales) {
  // Byte i holds element 2i (low nibble) and 2i + 1 (high nibble); E8M0 scale 2^(s - 127).
  std::uint8_t codes[16];
  for (int i = 0; i < 16; ++i) codes[i] = std::uint8_t(i | ((15 - i) << 4));
  const float e2m1[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  for (std::uint8_t s : {std::uint8_t(127), std::uint8_t(130), std::uint8_t(120)}) {
    const Mxfp4View w{codes, &s, 1, 32};
    float out[32];
    dequantize_row(w, 0, out);
    const float scale = std::ldexp(1.0f, int(s) - 127);
    for (int i = 0; i < 16; ++i) {
      EXPECT_EQ(out[2 * i], e2m1[i] * scale) << i;
      EXPECT_EQ(out[2 * i + 1], e2m1[15 - i] * scale) << i;
    }
  }
}

TEST(QuantMxfp4, RoundsToNearestEvenAndNeverSaturates) {
  EXPECT_EQ(e2m1_round(0.25f), 0u);   // tie 0 | 0.5 -> even code 0
  EXPECT_EQ(e2m1_round(0.26f), 1u);
  EXPECT_EQ(e2m1_round(0.75f), 2u);   // tie 0.5 | 1 -> code 2 (1.0)
  EXPECT_EQ(e2m1_round(2.5f), 4u);    // tie 2 | 3 -> code 4 (2.0)
  EXPECT_EQ(e2m1_round(5.0f), 6u);    // tie 4 | 6 -> code 6 (4.0)
  EXPECT_EQ(e2m1_round(5.01f), 7u);
  EXPECT_EQ(e2m1_round(100.0f), 7u);
  // Scale: the smallest 2^e with max|w| <= 6 * 2^e.
  for (const auto& [amax, byte] : {std::pair<float, int>{6.0f, 127}, {6.01f, 128}, {3.0f, 126},
                                   {3.01f, 127}, {0.0f, 127}, {1e-6f, 127 - 22}}) {
    std::vector<float> w(32, 0.0f);
    w[7] = -amax;
    std::uint8_t codes[16], scale = 0;
    quantize_mxfp4_row(w.data(), 32, codes, &scale);
    EXPECT_EQ(int(scale), byte) << amax;
    float out[32];
    dequantize_row(Mxfp4View{codes, &scale, 1, 32}, 0, out);
    EXPECT_LE(std::fabs(out[7] + amax), 0.25f * std::ldexp(1.0f, byte - 127)) << amax;
  }
}

TEST(QuantErrors, MessagesNameTheFieldExpectedAndGiven) {
  test::expect_error<shape_error>([] { check_quant_cols("q4", "expert 3 down_proj", 100); },
                                  "moe: q4 expert 3 down_proj has 100 columns, expected a "
                                  "positive multiple of 32");
  std::vector<float> w(64, 0.5f);
  w[40] = std::numeric_limits<float>::quiet_NaN();
  BlockQ8 q8[2];
  test::expect_error<value_error>([&] { quantize_q8_row(w.data(), 64, q8, 9); },
                                  "moe: cannot quantise to q8: non-finite weight at row 9, "
                                  "column 40");
  w[40] = 1e7f;
  test::expect_error<value_error>([&] { quantize_q8_row(w.data(), 64, q8, 9); },
                                  "moe: cannot quantise to q8: the scale of row 9, block 1 "
                                  "overflows fp16 (max |w| = 1e+07)");
  std::uint8_t codes[32] = {}, scales[2] = {127, 0xff};
  test::expect_error<value_error>(
      [&] { check_mxfp4_scales(Mxfp4View{codes, scales, 1, 64}, "gate_up_proj"); },
      "moe: mxfp4 gate_up_proj has a NaN scale (0xFF) at row 0, block 1");
}

// ---- the scale searches against plain, one-block-at-a-time versions (bitwise) ----

// The Q8 / Q4 scale search written plainly: one block, one trial at a time, the 19 trial inverse
// scales (qref +- 0.1 t) / ref, codes clamp(round(w * inv)), the least-squares scale
// d = sum(w q) / sum(q^2) of those codes; its squared error is sum(w^2) - sum(w q)^2 / sum(q^2),
// so the largest sum(w q)^2 / sum(q^2) wins (the first on ties).
float plain_block_scale(const float* x, float ref, float qref, int qmin, int qmax) {
  if (ref == 0.0f) return 0.0f;
  const float sign = qref < 0 ? -1.0f : 1.0f;
  if (!std::isfinite((qref + 0.1f * 9.0f * sign) / ref)) return ref / qref;
  float best_d = 0.0f;
  double best_score = -1.0;
  for (int t = -9; t <= 9; ++t) {
    const float inv = (qref + 0.1f * float(t) * sign) / ref;
    double s1 = 0.0, s2 = 0.0;
    for (int i = 0; i < 32; ++i) {
      const float q = std::clamp(std::nearbyint(x[i] * inv), float(qmin), float(qmax));
      s1 += double(x[i]) * double(q);
      s2 += double(q) * double(q);
    }
    if (s2 > 0.0 && s1 * s1 / s2 > best_score) {
      best_score = s1 * s1 / s2;
      best_d = float(s1 / s2);
    }
  }
  return best_d;
}

// A block's codes for the stored scale d: clamp(round(w / d)), 0 when d = 0.
int plain_code(float w, float d, int qmin, int qmax) {
  return d != 0.0f ? int(std::clamp(std::nearbyint(w / d), float(qmin), float(qmax))) : 0;
}

std::vector<BlockQ8> plain_q8_row(const float* w, Index cols) {
  std::vector<BlockQ8> out(std::size_t(cols / 32));
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    BlockQ8& o = out[std::size_t(b)];
    o.d = float_to_fp16(plain_block_scale(x, amax, 127.0f, -127, 127));
    for (int i = 0; i < 32; ++i) o.q[i] = std::int8_t(plain_code(x[i], fp16_to_float(o.d), -127, 127));
  }
  return out;
}

std::vector<BlockQ4> plain_q4_row(const float* w, Index cols) {
  std::vector<BlockQ4> out(std::size_t(cols / 32));
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) {
      if (std::fabs(x[i]) > std::fabs(m)) m = x[i];
    }
    BlockQ4& o = out[std::size_t(b)];
    o.d = float_to_fp16(plain_block_scale(x, m, -8.0f, -8, 7));
    const float d = fp16_to_float(o.d);
    for (int i = 0; i < 16; ++i) {
      o.q[i] = std::uint8_t((plain_code(x[i], d, -8, 7) + 8) |
                            ((plain_code(x[i + 16], d, -8, 7) + 8) << 4));
    }
  }
  return out;
}

// e2m1 rounding by table: the nearest of the 8 values, ties to the even code, saturating at 6.
unsigned plain_e2m1(float v) {
  static constexpr float kValue[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  if (v >= 6.0f) return 7;  // saturates (far above 6 the distances below round to equal)
  unsigned code = 0;
  for (unsigned k = 1; k < 8; ++k) {
    const double dk = std::fabs(double(v) - kValue[k]), dc = std::fabs(double(v) - kValue[code]);
    if (dk < dc || (dk == dc && k % 2 == 0)) code = k;
  }
  return code;
}

// Mxfp4 plainly: candidates e0 (the smallest with max|w| <= 6 * 2^e0) and e0 - 1, both clamped to
// [-125, 127], squared errors summed in double in weight order, e0 kept on ties.
void plain_mxfp4_row(const float* w, Index cols, std::uint8_t* codes, std::uint8_t* scales) {
  static constexpr float kValue[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    int e = 0;
    if (amax > 0.0f) {
      int e0 = -200;
      while (6.0f * std::ldexp(1.0f, e0) < amax) ++e0;
      double best = -1.0;
      for (int cand : {e0, e0 - 1}) {
        const int c = std::clamp(cand, -125, 127);
        double err = 0.0;
        for (int i = 0; i < 32; ++i) {
          const float v = std::ldexp(std::fabs(x[i]), -c);
          const double r = std::fabs(double(x[i])) - std::ldexp(double(kValue[plain_e2m1(v)]), c);
          err += r * r;
        }
        if (best < 0.0 || err < best) {
          best = err;
          e = c;
        }
      }
    }
    scales[b] = std::uint8_t(e + 127);
    for (int i = 0; i < 16; ++i) {
      unsigned c[2];
      for (int h = 0; h < 2; ++h) {
        const float v = x[2 * i + h];
        const unsigned m = plain_e2m1(std::ldexp(std::fabs(v), -e));
        c[h] = (v < 0.0f && m != 0) ? (m | 8u) : m;
      }
      codes[b * 16 + i] = std::uint8_t(c[0] | (c[1] << 4));
    }
  }
}

// Rows of Gaussian weights of several scales, with awkward blocks mixed in: all zero, one nonzero
// weight, all equal, tiny (1e-38: the inverse scale overflows), subnormal, and exact ties.
std::vector<float> awkward_row(Index cols, std::mt19937& rng) {
  std::vector<float> w = gaussian(cols, rng, 0.02f);
  std::uniform_real_distribution<float> sigma(-6.0f, 3.0f);
  for (Index b = 0; b < cols / 32; ++b) {
    float* x = &w[std::size_t(b * 32)];
    const float s = std::pow(10.0f, sigma(rng));
    switch (rng() % 9) {
      case 0: std::fill(x, x + 32, 0.0f); break;
      case 1: std::fill(x, x + 32, 0.0f); x[rng() % 32] = -s; break;
      case 2: std::fill(x, x + 32, s); break;
      case 3: for (int i = 0; i < 32; ++i) x[i] *= 1e-36f; break;
      case 4: for (int i = 0; i < 32; ++i) x[i] = float(int(rng() % 17) - 8) * 0.25f; break;
      case 5: for (int i = 0; i < 32; ++i) x[i] = float(int(rng() % 255) - 127) * 1e-42f; break;
      default: for (int i = 0; i < 32; ++i) x[i] *= s / 0.02f; break;
    }
  }
  return w;
}

TEST(QuantSearch, FastRowsEqualThePlainSearchBitForBit) {
  std::mt19937 rng(21);
  for (Index blocks : {1, 7, 15, 16, 17, 31, 129}) {
    const Index cols = 32 * blocks;
    for (int rep = 0; rep < 4; ++rep) {
      const std::vector<float> w = awkward_row(cols, rng);
      std::vector<BlockQ8> q8(static_cast<std::size_t>(blocks));
      quantize_q8_row(w.data(), cols, q8.data());
      const std::vector<BlockQ8> q8_plain = plain_q8_row(w.data(), cols);
      ASSERT_EQ(std::memcmp(q8.data(), q8_plain.data(), q8.size() * sizeof(BlockQ8)), 0)
          << "q8, " << blocks << " blocks, rep " << rep;
      std::vector<BlockQ4> q4(static_cast<std::size_t>(blocks));
      quantize_q4_row(w.data(), cols, q4.data());
      const std::vector<BlockQ4> q4_plain = plain_q4_row(w.data(), cols);
      ASSERT_EQ(std::memcmp(q4.data(), q4_plain.data(), q4.size() * sizeof(BlockQ4)), 0)
          << "q4, " << blocks << " blocks, rep " << rep;
      std::vector<std::uint8_t> codes(static_cast<std::size_t>(blocks * 16)), scales(static_cast<std::size_t>(blocks));
      std::vector<std::uint8_t> codes_plain(codes.size()), scales_plain(scales.size());
      quantize_mxfp4_row(w.data(), cols, codes.data(), scales.data());
      plain_mxfp4_row(w.data(), cols, codes_plain.data(), scales_plain.data());
      ASSERT_EQ(codes, codes_plain) << "mxfp4, " << blocks << " blocks, rep " << rep;
      ASSERT_EQ(scales, scales_plain) << "mxfp4, " << blocks << " blocks, rep " << rep;
    }
  }
}

TEST(QuantSearch, E2m1RoundingEqualsTheTableOnEveryTieAndAround) {
  for (float v : {0.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, 7.0f, 1e30f}) {
    for (float u : {v, std::nextafter(v, 0.0f), std::nextafter(v, 100.0f)}) {
      EXPECT_EQ(e2m1_round(u), plain_e2m1(u)) << u;
    }
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(0.0f, 8.0f);
  for (int k = 0; k < 100000; ++k) {
    const float v = dist(rng);
    ASSERT_EQ(e2m1_round(v), plain_e2m1(v)) << v;
  }
}

TEST(QuantSearch, TheChosenTrialHasTheLeastSquaredErrorOfAllTrials) {
  // The closed form sum(w^2) - s1^2 / s2 against the error summed weight by weight.
  std::mt19937 rng(8);
  const std::vector<float> w = gaussian(32 * 200, rng, 0.02f);
  for (int b = 0; b < 200; ++b) {
    const float* x = &w[std::size_t(b * 32)];
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    auto error_of = [&](float inv, double* d_out) {
      double s1 = 0.0, s2 = 0.0;
      float q[32];
      for (int i = 0; i < 32; ++i) {
        q[i] = std::clamp(std::nearbyint(x[i] * inv), -127.0f, 127.0f);
        s1 += double(x[i]) * q[i];
        s2 += double(q[i]) * q[i];
      }
      const double d = s1 / s2;
      double err = 0.0;
      for (int i = 0; i < 32; ++i) err += (double(x[i]) - d * q[i]) * (double(x[i]) - d * q[i]);
      if (d_out != nullptr) *d_out = d;
      return err;
    };
    const float chosen = plain_block_scale(x, amax, 127.0f, -127, 127);
    double best = 1e300, chosen_err = -1.0;
    for (int t = -9; t <= 9; ++t) {
      double d = 0.0;
      const double err = error_of((127.0f + 0.1f * float(t)) / amax, &d);
      best = std::min(best, err);
      if (float(d) == chosen && chosen_err < 0.0) chosen_err = err;
    }
    ASSERT_GE(chosen_err, 0.0) << b;
    EXPECT_LE(chosen_err, best * (1.0 + 1e-9) + 1e-30) << b;
  }
}

// ---- activation quantisation ----

TEST(QuantActivations, CodesScalesBlockSumsStepOrderAndPadding) {
  std::mt19937 rng(2);
  const Index cols = 96, rows = 2;  // 3 blocks: padded to 16 (one super-chunk)
  std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
  x[std::size_t(cols + 40)] = -9.0f;  // the extreme of row 1, block 1 (element 8)
  std::vector<unsigned char> scratch(activations_i8_bytes(rows, cols));
  ActivationsI8 a = make_activations_i8(scratch.data(), rows, cols);
  quantize_activations_i8(x.data(), cols, 8, a);
  ASSERT_EQ(a.padded_blocks, 16);
  const Index row1 = 32 * a.padded_blocks;
  // Element 8 of block 1: step 2 (elements 8..11), lane 1, byte 0.
  EXPECT_EQ(activation_offset(1, 8), 2 * 64 + 4);
  EXPECT_EQ(a.q[row1 + 2 * 64 + 4], -127);
  EXPECT_EQ(a.scale[a.padded_blocks + 1], 9.0f / 127.0f);
  for (Index r = 0; r < rows; ++r) {
    for (Index b = 0; b < a.padded_blocks; ++b) {
      int sum = 0;
      for (Index e = 0; e < 32; ++e) {
        const int q = a.q[r * row1 + activation_offset(b, e)];
        sum += q;
        EXPECT_LE(std::abs(q), 127);
        if (b >= cols / 32) {
          EXPECT_EQ(q, 0);
        } else {
          const float dx = a.scale[r * a.padded_blocks + b];
          EXPECT_LE(std::fabs(float(q) * dx - x[std::size_t(r * cols + b * 32 + e)]),
                    0.5f * dx * 1.0001f);
        }
      }
      EXPECT_EQ(a.corr[r * a.padded_blocks + b], -8 * sum);
      if (b >= cols / 32) {
        EXPECT_EQ(a.scale[r * a.padded_blocks + b], 0.0f);
      }
    }
  }
}

TEST(QuantActivations, SimdEqualsScalarBitForBit) {
  std::mt19937 rng(9);
  for (Index cols : {32, 96, 1056}) {
    const Index rows = 3;
    std::vector<float> x = gaussian(rows * cols, rng, 2.0f);
    x[5] = 0.0f;
    for (Index i = 32; i < 64 && i < cols; ++i) x[std::size_t(i)] = 0.0f;  // an all-zero block
    x[std::size_t(cols + 3)] = std::numeric_limits<float>::quiet_NaN();
    std::vector<unsigned char> s1(activations_i8_bytes(rows, cols)), s2 = s1;
    ActivationsI8 a1 = make_activations_i8(s1.data(), rows, cols);
    ActivationsI8 a2 = make_activations_i8(s2.data(), rows, cols);
    quantize_activations_i8(x.data(), cols, 12, a1);
    quantize_activations_i8_scalar(x.data(), cols, 12, a2);
    EXPECT_EQ(std::memcmp(s1.data(), s2.data(), s1.size()), 0) << cols;
    // Column ranges quantised separately (as the FFN tasks do) give the same bytes.
    std::vector<unsigned char> s3(s1.size(), 0xAB);
    ActivationsI8 a3 = make_activations_i8(s3.data(), rows, cols);
    const Index mid = (cols / 32 / 2) * 32;
    quantize_activations_i8_cols(x.data(), cols, 12, a3, mid, cols);
    quantize_activations_i8_cols(x.data(), cols, 12, a3, 0, mid);
    EXPECT_EQ(std::memcmp(s1.data(), s3.data(), s1.size()), 0) << cols;
    EXPECT_TRUE(std::isnan(a1.scale[a1.padded_blocks]));  // row 1, block 0
  }
}

TEST(QuantActivations, NonFiniteActivationGivesNanOutputs) {
  std::mt19937 rng(3);
  const Index cols = 64, out = 5;
  std::vector<float> wf = gaussian(out * cols, rng, 0.1f);
  std::vector<BlockQ8> blocks(std::size_t(out * 2));
  for (Index o = 0; o < out; ++o) quantize_q8_row(&wf[std::size_t(o * cols)], cols, &blocks[std::size_t(o * 2)]);
  std::vector<float> x = gaussian(cols, rng, 1.0f);
  x[50] = std::numeric_limits<float>::infinity();
  std::vector<unsigned char> scratch(activations_i8_bytes(1, cols));
  ActivationsI8 a = make_activations_i8(scratch.data(), 1, cols);
  quantize_activations_i8(x.data(), cols, quant_offset<Q8>, a);
  std::vector<std::uint8_t> codes(panel_code_bytes<Q8>(out, cols));
  std::vector<std::uint16_t> scales(panel_scale_count(out, cols));
  pack_panels<Q8>(Q8View{blocks.data(), out, cols}, 0, out, codes.data(), scales.data());
  std::vector<float> y(static_cast<std::size_t>(out));
  gemv_quant_nt<Q8>(a, QuantPanels<Q8>{codes.data(), scales.data(), out, cols}, 0, out, y.data(),
                    out);
  for (float v : y) EXPECT_TRUE(std::isnan(v));
}

// ---- the products: SIMD == scalar bitwise, exact == fp32 kernel bitwise, accuracy ----

template <class Format>
struct Quantised {
  std::vector<BlockQ8> q8;
  std::vector<BlockQ4> q4;
  std::vector<std::uint8_t> codes, scales;
  QuantView<Format> view;

  Quantised(const std::vector<float>& w, Index rows, Index cols) {
    const Index nb = cols / 32;
    if constexpr (std::is_same_v<Format, Q8>) {
      q8.resize(std::size_t(rows * nb));
      for (Index o = 0; o < rows; ++o) quantize_q8_row(&w[std::size_t(o * cols)], cols, &q8[std::size_t(o * nb)], o);
      view = Q8View{q8.data(), rows, cols};
    } else if constexpr (std::is_same_v<Format, Q4>) {
      q4.resize(std::size_t(rows * nb));
      for (Index o = 0; o < rows; ++o) quantize_q4_row(&w[std::size_t(o * cols)], cols, &q4[std::size_t(o * nb)], o);
      view = Q4View{q4.data(), rows, cols};
    } else {
      codes.resize(std::size_t(rows * nb * 16));
      scales.resize(std::size_t(rows * nb));
      for (Index o = 0; o < rows; ++o) {
        quantize_mxfp4_row(&w[std::size_t(o * cols)], cols, &codes[std::size_t(o * nb * 16)],
                           &scales[std::size_t(o * nb)], o);
      }
      view = Mxfp4View{codes.data(), scales.data(), rows, cols};
    }
  }
  std::vector<std::uint8_t> panel_codes;
  std::vector<panel_scale_t<Format>> panel_scales;
  QuantPanels<Format> panels() {
    panel_codes.assign(panel_code_bytes<Format>(view.rows, view.cols), 0);
    panel_scales.assign(panel_scale_count(view.rows, view.cols), 0);
    // Two ranges, as concurrent tasks would repack them.
    pack_panels<Format>(view, 0, view.rows / 2, panel_codes.data(), panel_scales.data());
    pack_panels<Format>(view, view.rows / 2, view.rows, panel_codes.data(), panel_scales.data());
    return QuantPanels<Format>{panel_codes.data(), panel_scales.data(), view.rows, view.cols};
  }
  std::vector<float> dequantised() const {
    std::vector<float> d(std::size_t(view.rows * view.cols));
    for (Index o = 0; o < view.rows; ++o) dequantize_row(view, o, &d[std::size_t(o * view.cols)]);
    return d;
  }
};

template <class Format>
class QuantKernel : public ::testing::Test {};
using QuantFormats = ::testing::Types<Q8, Q4, Mxfp4>;
struct QuantFormatNames {
  template <class T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(QuantKernel, QuantFormats, QuantFormatNames);

TYPED_TEST(QuantKernel, SimdEqualsScalarBitForBitOverAwkwardSizes) {
  using F = TypeParam;
  std::mt19937 rng(4);
  for (Index cols : {32, 96, 1056}) {
    for (Index rows : {1, 3, 7, 17}) {
      for (Index out : {1, 7, 17}) {
        const std::vector<float> wf = gaussian(out * cols, rng, 0.05f);
        const std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
        Quantised<F> w(wf, out, cols);
        const QuantPanels<F> panels = w.panels();
        std::vector<unsigned char> scratch(activations_i8_bytes(rows, cols));
        ActivationsI8 a = make_activations_i8(scratch.data(), rows, cols);
        quantize_activations_i8(x.data(), cols, quant_offset<F>, a);
        // Y wider than out (ldy = out + 3) with a sentinel: columns outside the range untouched.
        const Index ldy = out + 3;
        std::vector<float> fast(std::size_t(rows * ldy), -7.0f), ref = fast, split = fast;
        gemv_quant_nt<F>(a, panels, 0, out, fast.data(), ldy);
        gemv_quant_nt_scalar<F>(a, panels, 0, out, ref.data(), ldy);
        EXPECT_TRUE(same_bits(fast, ref)) << F::name << " cols " << cols << " rows " << rows << " out " << out;
        // Rows picked by index (reversed) give the rows' results.
        std::vector<Index> order(static_cast<std::size_t>(rows));
        for (Index r = 0; r < rows; ++r) order[std::size_t(r)] = rows - 1 - r;
        std::vector<float> picked(std::size_t(rows * ldy), -7.0f);
        gemv_quant_nt<F>(select_rows(a, order.data(), rows), panels, 0, out, picked.data(), ldy);
        for (Index r = 0; r < rows; ++r) {
          EXPECT_EQ(std::memcmp(&picked[std::size_t(r * ldy)], &ref[std::size_t((rows - 1 - r) * ldy)],
                                sizeof(float) * std::size_t(out)),
                    0);
        }
        // A split of the output range at an odd place gives the same bits.
        const Index mid = out / 2 + 1 > out ? out : out / 2 + 1;
        gemv_quant_nt<F>(a, panels, 0, mid, split.data(), ldy);
        gemv_quant_nt<F>(a, panels, mid, out, split.data(), ldy);
        EXPECT_TRUE(same_bits(split, ref)) << F::name << " split, cols " << cols;
        for (Index r = 0; r < rows; ++r) EXPECT_EQ(fast[std::size_t(r * ldy + out)], -7.0f);
      }
    }
  }
}

TYPED_TEST(QuantKernel, ExactModeEqualsFp32KernelOnDequantisedWeights) {
  using F = TypeParam;
  std::mt19937 rng(5);
  for (Index cols : {32, 96, 1056}) {
    for (Index rows : {1, 3, 7, 17}) {
      for (Index out : {1, 7, 17}) {
        const std::vector<float> wf = gaussian(out * cols, rng, 0.05f);
        const std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
        const Quantised<F> w(wf, out, cols);
        const std::vector<float> deq = w.dequantised();
        std::vector<float> exact(std::size_t(rows * out)), scalar = exact, fp32 = exact;
        gemv_quant_nt_exact<F>(x.data(), rows, cols, w.view, 0, out, exact.data(), out);
        gemv_quant_nt_exact_scalar<F>(x.data(), rows, cols, w.view, 0, out, scalar.data(), out);
        gemm_small_nt<float>(x.data(), rows, cols, deq.data(), cols, cols, 0, out, fp32.data(), out);
        EXPECT_TRUE(same_bits(exact, scalar)) << F::name << " cols " << cols << " rows " << rows;
        // gemm_small_nt's order is 16 lanes only where Eigen's packets are 16 floats (AVX-512).
        if (Eigen::internal::packet_traits<float>::size == 16) {
          EXPECT_TRUE(same_bits(exact, fp32)) << F::name << " cols " << cols << " rows " << rows;
        }
      }
    }
  }
}

TYPED_TEST(QuantKernel, PanelsHoldTheStoredCodesAndScales) {
  using F = TypeParam;
  std::mt19937 rng(10);
  for (Index cols : {32, 96, 544, 1056}) {  // 1, 3, 17, 33 blocks: partial super-chunks
    const Index out = 3;
    Quantised<F> w(gaussian(out * cols, rng, 0.05f), out, cols);
    const QuantPanels<F> p = w.panels();
    EXPECT_EQ(p.bytes(), w.view.bytes());
    for (Index o = 0; o < out; ++o) {
      for (Index i = 0; i < cols; ++i) {
        ASSERT_EQ(panel_code(p, o, i / 32, int(i % 32)), quant_code(w.view, o, i)) << i;
      }
      for (Index b = 0; b < cols / 32; ++b) {
        ASSERT_EQ(panel_scale(p, o, b), quant_scale(w.view, o, b));
      }
    }
  }
}

TYPED_TEST(QuantKernel, PrefillDecodesPanelsExactlyAndMultiplies) {
  using F = TypeParam;
  std::mt19937 rng(11);
  for (Index cols : {32, 544, 1056}) {
    const Index out = 37, rows = 29;
    Quantised<F> w(gaussian(out * cols, rng, 0.05f), out, cols);
    const QuantPanels<F> p = w.panels();
    const std::vector<float> deq = w.dequantised();
    std::vector<float> simd(deq.size()), scalar(deq.size());
    dequantize_panel_rows(p, 0, out, simd.data());
    dequantize_panel_rows_scalar(p, 0, out, scalar.data());
    EXPECT_TRUE(same_bits(simd, deq)) << cols;
    EXPECT_TRUE(same_bits(scalar, deq)) << cols;
    std::vector<float> stored(deq.size());
    dequantize_stored_rows<F>(w.view, 0, out, stored.data());
    EXPECT_TRUE(same_bits(stored, deq)) << cols;
    const std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
    // A scratch of 5 rows: several tiles and a partial one.
    std::vector<float> scratch(std::size_t(5 * cols)), y(std::size_t(rows * out)), ref = y;
    gemm_quant_nt_prefill(x.data(), rows, cols, p, 0, out, y.data(), out, scratch.data(),
                          Index(scratch.size()));
    for (Index r = 0; r < rows; ++r) {
      for (Index o = 0; o < out; ++o) {
        double sum = 0.0;
        for (Index i = 0; i < cols; ++i) {
          sum += double(x[std::size_t(r * cols + i)]) * deq[std::size_t(o * cols + i)];
        }
        ref[std::size_t(r * out + o)] = float(sum);
      }
    }
    EXPECT_LE(nmse(y, ref), 1e-11) << cols;
    std::vector<float> y_stored(y.size());
    gemm_quant_nt_prefill(x.data(), rows, cols, w.view, 0, out, y_stored.data(), out,
                          scratch.data(), Index(scratch.size()));
    EXPECT_TRUE(same_bits(y_stored, y)) << cols;  // same decoded tiles, same GEMM
  }
}

// Output NMSE of the fast product against the fp32 product on the original weights (weights and
// activations quantised), within the bounds for the formats; and the exact mode, whose
// only error is the weights', no worse than the fast one by more than the activations' share.
template <class F>
constexpr double kFastBound = 0;
template <>
constexpr double kFastBound<Q8> = 1e-4;
template <>
constexpr double kFastBound<Q4> = 1.5e-2;
template <>
constexpr double kFastBound<Mxfp4> = 2e-2;

TYPED_TEST(QuantKernel, FastModeAccuracyAgainstFp32) {
  using F = TypeParam;
  std::mt19937 rng(6);
  const Index cols = 1024, out = 256, rows = 8;
  const std::vector<float> wf = gaussian(out * cols, rng, 0.05f);
  const std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
  Quantised<F> w(wf, out, cols);
  const QuantPanels<F> panels = w.panels();
  std::vector<unsigned char> scratch(activations_i8_bytes(rows, cols));
  ActivationsI8 a = make_activations_i8(scratch.data(), rows, cols);
  quantize_activations_i8(x.data(), cols, quant_offset<F>, a);
  std::vector<float> fast(std::size_t(rows * out)), exact = fast, fp32 = fast;
  gemv_quant_nt<F>(a, panels, 0, out, fast.data(), out);
  gemv_quant_nt_exact<F>(x.data(), rows, cols, w.view, 0, out, exact.data(), out);
  gemm_small_nt<float>(x.data(), rows, cols, wf.data(), cols, cols, 0, out, fp32.data(), out);
  const double e_fast = nmse(fast, fp32), e_exact = nmse(exact, fp32);
  std::printf("[ quant    ] %s nmse fast %.3g exact %.3g\n", F::name, e_fast, e_exact);
  EXPECT_GT(e_fast, 0.0);
  EXPECT_LE(e_fast, kFastBound<F>);
  EXPECT_LE(e_exact, e_fast * 1.05);
  // The activations' own share: fast vs exact, int8 per block of 32 (~1e-5 relative variance).
  EXPECT_LE(nmse(fast, exact), 5e-5);
}

// ---- bf16 x bf16 ----

TEST(GemvBf16, SimdEqualsScalarBitForBitOverAwkwardSizes) {
  std::mt19937 rng(7);
  for (Index cols : {1, 7, 31, 32, 96, 129, 1056}) {
    for (Index rows : {1, 3, 7, 17}) {
      for (Index out : {1, 7, 17}) {
        const std::vector<float> wf = gaussian(out * cols, rng, 0.05f);
        std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
        std::vector<std::uint16_t> w(wf.size());
        for (std::size_t i = 0; i < wf.size(); ++i) w[i] = float_to_bf16_rne(wf[i]);
        // Subnormal inputs and products that underflow: read and flushed as the hardware does.
        w[0] = 0x0001;
        if (x.size() > 2) x[2] = 1e-39f;
        const Index ld = bf16_padded_cols(cols);
        std::vector<std::uint16_t> xb(std::size_t(rows * ld));
        activations_to_bf16(x.data(), rows, cols, cols, xb.data(), ld);
        std::vector<float> fast(std::size_t(rows * out)), ref = fast;
        gemv_bf16_nt(xb.data(), rows, ld, w.data(), cols, cols, 0, out, fast.data(), out);
        gemv_bf16_nt_scalar(xb.data(), rows, ld, w.data(), cols, cols, 0, out, ref.data(), out);
        EXPECT_TRUE(same_bits(fast, ref)) << "cols " << cols << " rows " << rows << " out " << out;
      }
    }
  }
}

TEST(GemvBf16, AccuracyAgainstFp32) {
  std::mt19937 rng(8);
  const Index cols = 1024, out = 256, rows = 4;
  const std::vector<float> wf = gaussian(out * cols, rng, 0.05f);
  const std::vector<float> x = gaussian(rows * cols, rng, 1.0f);
  std::vector<std::uint16_t> w(wf.size());
  for (std::size_t i = 0; i < wf.size(); ++i) w[i] = float_to_bf16_rne(wf[i]);
  std::vector<std::uint16_t> xb(std::size_t(rows * cols));
  activations_to_bf16(x.data(), rows, cols, cols, xb.data(), cols);
  std::vector<float> fast(std::size_t(rows * out)), fp32 = fast;
  gemv_bf16_nt(xb.data(), rows, cols, w.data(), cols, cols, 0, out, fast.data(), out);
  gemm_small_nt<float>(x.data(), rows, cols, wf.data(), cols, cols, 0, out, fp32.data(), out);
  const double e = nmse(fast, fp32);
  std::printf("[ quant    ] bf16 x bf16 nmse %.3g\n", e);
  EXPECT_GT(e, 0.0);
  EXPECT_LE(e, 3e-5);
}

TEST(QuantKernel, ReportsWhichPathRuns) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  EXPECT_TRUE(gemv_quant_simd);
#else
  EXPECT_FALSE(gemv_quant_simd);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  EXPECT_TRUE(gemv_bf16_simd);
#else
  EXPECT_FALSE(gemv_bf16_simd);
#endif
}

}  // namespace
}  // namespace moe::kernels
