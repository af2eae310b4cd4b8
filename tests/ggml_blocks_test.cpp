// Tests of moe/kernels/ggml_blocks.hpp: each ggml block format decoded from hand-built blocks
// (expected values written from the format's definition, with the packed 6-bit scales worked
// out by hand; Q8_0, Q4_0 and MXFP4 through io's ggml_decode_to_float, which decodes them with
// kernels/quant_formats.hpp), the MXFP4 repacks, and the K-quant encoders' round trips
// (round-to-nearest and NMSE on seeded Gaussian data).
#include "moe/kernels/ggml_blocks.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/gguf_decode.hpp"

namespace {

namespace k = moe::kernels;
using moe::Index;
using moe::io::GgmlType;

void put_half(unsigned char* p, std::uint16_t h) { std::memcpy(p, &h, 2); }

constexpr std::uint16_t kHalfOne = 0x3C00, kHalfHalf = 0x3800, kHalfQuarter = 0x3400;

TEST(GgmlBlocks, Q8_0DecodesScaleTimesCode) {
  unsigned char block[34];
  put_half(block, kHalfQuarter);
  for (int l = 0; l < 32; ++l)
    block[2 + l] = static_cast<unsigned char>(static_cast<std::int8_t>(l * 8 - 128));
  float out[32];
  moe::io::ggml_decode_to_float(GgmlType::Q8_0, block, 32, out);
  for (int l = 0; l < 32; ++l) EXPECT_EQ(out[l], 0.25f * (l * 8 - 128)) << l;
}

TEST(GgmlBlocks, Q4_0LowNibblesFirstThenHigh) {
  unsigned char block[18];
  put_half(block, kHalfHalf);
  for (int l = 0; l < 16; ++l) block[2 + l] = static_cast<unsigned char>(l | ((15 - l) << 4));
  float out[32];
  moe::io::ggml_decode_to_float(GgmlType::Q4_0, block, 32, out);
  for (int l = 0; l < 16; ++l) {
    EXPECT_EQ(out[l], 0.5f * (l - 8)) << l;
    EXPECT_EQ(out[16 + l], 0.5f * (15 - l - 8)) << l;
  }
}

TEST(GgmlBlocks, Mxfp4E2M1ValuesTimesPowerOfTwo) {
  const float e2m1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int e : {0, 1, 120, 127, 130, 254}) {
    unsigned char block[17];
    block[0] = static_cast<unsigned char>(e);
    for (int l = 0; l < 16; ++l) block[1 + l] = static_cast<unsigned char>(l | ((15 - l) << 4));
    float out[32];
    moe::io::ggml_decode_to_float(GgmlType::MXFP4, block, 32, out);
    const double scale = std::ldexp(1.0, e - 127);
    for (int l = 0; l < 16; ++l) {
      EXPECT_EQ(out[l], static_cast<float>(e2m1[l] * scale)) << e << ' ' << l;
      EXPECT_EQ(out[16 + l], static_cast<float>(e2m1[15 - l] * scale)) << e << ' ' << l;
    }
  }
}

TEST(GgmlBlocks, Mxfp4RepackToTheSplitLayoutKeepsEveryValue) {
  // Three blocks of random bytes (scales below 0xFF); the split layout decoded by its own
  // definition (element 2i low nibble, 2i + 1 high nibble of byte i; w = e2m1 * 2^(s - 127))
  // equals ggml's decode of the original blocks.
  const float e2m1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  std::mt19937 rng(9);
  std::vector<unsigned char> blocks(3 * 17);
  for (auto& b : blocks) b = static_cast<unsigned char>(rng());
  for (int b = 0; b < 3; ++b) blocks[17 * b] = static_cast<unsigned char>(100 + 10 * b);
  std::vector<std::uint8_t> codes(3 * 16), scales(3);
  k::repack_mxfp4_to_split(blocks.data(), 96, codes.data(), scales.data());
  std::vector<float> ref(96);
  moe::io::ggml_decode_to_float(GgmlType::MXFP4, blocks.data(), 96, ref.data());
  for (int v = 0; v < 96; ++v) {
    const int b = v / 32, e = v % 32;
    const int code = (e % 2 == 0) ? codes[16 * b + e / 2] & 15 : codes[16 * b + e / 2] >> 4;
    EXPECT_EQ(static_cast<float>(e2m1[code] * std::ldexp(1.0, scales[b] - 127)), ref[v]) << v;
  }
  // And back: the inverse repack gives the original blocks byte for byte.
  std::vector<unsigned char> again(blocks.size());
  k::repack_split_to_mxfp4(codes.data(), scales.data(), 96, again.data());
  EXPECT_EQ(again, blocks);
}

// The 12 packed scale bytes used below, and the scales/mins they hold, worked out by hand from the
// layout (j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,
// m = (s[j+4] >> 4) | (s[j] >> 6) << 4):
const unsigned char kScales[12] = {0x41, 0x82, 0x03, 0xC4, 0x05, 0x46,
                                   0x87, 0xC8, 0x9A, 0xBC, 0xDE, 0xF1};
const int kSc[8] = {1, 2, 3, 4, 26, 44, 14, 49};
const int kMin[8] = {5, 6, 7, 8, 9, 27, 45, 63};

TEST(GgmlBlocks, KScalePackingMatchesTheHandWorkedValues) {
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k::ggml_detail::k_scale_min(j, kScales, sc, m);
    EXPECT_EQ(sc, kSc[j]) << j;
    EXPECT_EQ(m, kMin[j]) << j;
  }
  unsigned char packed[12];
  k::ggml_detail::k_pack_scale_min(kSc, kMin, packed);
  EXPECT_EQ(std::memcmp(packed, kScales, 12), 0);
}

TEST(GgmlBlocks, Q4_KSubBlocksOfThirtyTwoWithScaleAndMin) {
  unsigned char block[144];
  put_half(block, kHalfOne);       // d = 1
  put_half(block + 2, kHalfHalf);  // dmin = 0.5
  std::memcpy(block + 4, kScales, 12);
  for (int i = 0; i < 128; ++i) block[16 + i] = static_cast<unsigned char>((i * 7) & 0xFF);
  float out[256];
  k::dequantize_q4_k(block, 256, out);
  for (int v = 0; v < 256; ++v) {
    // Value v: chunk c = v / 64 shares qs[32c .. 32c+31]; low nibbles are sub-block 2c.
    const int c = v / 64, within = v % 64, l = within % 32;
    const int byte = ((32 * c + l) * 7) & 0xFF;
    const int q = within < 32 ? (byte & 15) : (byte >> 4);
    const int j = 2 * c + (within >= 32);
    EXPECT_EQ(out[v], 1.0f * kSc[j] * q - 0.5f * kMin[j]) << v;
  }
}

TEST(GgmlBlocks, Q5_KAddsTheHighBitFromQh) {
  unsigned char block[176];
  put_half(block, kHalfHalf);     // d = 0.5
  put_half(block + 2, kHalfOne);  // dmin = 1
  std::memcpy(block + 4, kScales, 12);
  for (int l = 0; l < 32; ++l) block[16 + l] = static_cast<unsigned char>((l * 37 + 11) & 0xFF);
  for (int i = 0; i < 128; ++i) block[48 + i] = static_cast<unsigned char>((i * 13 + 5) & 0xFF);
  float out[256];
  k::dequantize_q5_k(block, 256, out);
  for (int v = 0; v < 256; ++v) {
    const int c = v / 64, within = v % 64, l = within % 32;
    const int j = 2 * c + (within >= 32);  // sub-block; its high bits are bit j of qh[l]
    const int byte = ((32 * c + l) * 13 + 5) & 0xFF;
    const int low = within < 32 ? (byte & 15) : (byte >> 4);
    const int high = (((l * 37 + 11) & 0xFF) >> j) & 1;
    EXPECT_EQ(out[v], 0.5f * kSc[j] * (low + 16 * high) - 1.0f * kMin[j]) << v;
  }
}

TEST(GgmlBlocks, Q6_KSixteenSignedScalesAndOffsetCodes) {
  unsigned char block[210];
  for (int i = 0; i < 128; ++i) block[i] = static_cast<unsigned char>((i * 29 + 3) & 0xFF);
  for (int i = 0; i < 64; ++i) block[128 + i] = static_cast<unsigned char>((i * 53 + 17) & 0xFF);
  const std::int8_t scales[16] = {1, -1, 2, -2, 127, -128, 3, 5, -7, 11, 13, -17, 19, 23, -29, 31};
  std::memcpy(block + 192, scales, 16);
  put_half(block + 208, kHalfQuarter);  // d = 0.25 (last field)
  float out[256];
  k::dequantize_q6_k(block, 256, out);
  for (int v = 0; v < 256; ++v) {
    const int h = v / 128, r = (v % 128) / 32, l = v % 32;
    const int ql = ((64 * h + l + 32 * (r & 1)) * 29 + 3) & 0xFF;
    const int qh = ((32 * h + l) * 53 + 17) & 0xFF;
    const int q = ((r < 2 ? ql & 15 : ql >> 4) | (((qh >> (2 * r)) & 3) << 4)) - 32;
    EXPECT_EQ(out[v], 0.25f * scales[v / 16] * q) << v;
  }
}

/// Normalised mean squared error sum (x - y)^2 / sum x^2, in double.
double nmse(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(x[i]) * x[i];
  }
  return num / den;
}

struct Codec {
  const char* name;
  Index block;
  std::size_t bytes;
  void (*encode)(const float*, Index, unsigned char*);
  void (*decode)(const unsigned char*, Index, float*);
  double max_nmse;  // order of step^2 / 12 over the data's variance, with margin
};

class GgmlCodec : public ::testing::TestWithParam<Codec> {};

TEST_P(GgmlCodec, RoundTripOfGaussianDataHasTheFormatsError) {
  const Codec& c = GetParam();
  for (Index blocks : {1, 7, 31}) {
    const Index n = blocks * c.block;
    std::mt19937 rng(static_cast<unsigned>(blocks));
    std::normal_distribution<float> g(0.0f, 0.02f);  // weight-like magnitudes
    std::vector<float> x(static_cast<std::size_t>(n)), y(x.size());
    for (auto& v : x) v = g(rng);
    std::vector<unsigned char> q(static_cast<std::size_t>(blocks) * c.bytes);
    c.encode(x.data(), n, q.data());
    c.decode(q.data(), n, y.data());
    const double e = nmse(x, y);
    EXPECT_LT(e, c.max_nmse) << c.name << " blocks " << blocks;
    EXPECT_GT(e, 0.0) << c.name;  // a lossy format that reports no loss is suspect
    if (blocks == 31) std::printf("[ measure  ] %s NMSE %.3g\n", c.name, e);
  }
}

TEST_P(GgmlCodec, ZerosStayZero) {
  const Codec& c = GetParam();
  std::vector<float> x(static_cast<std::size_t>(c.block), 0.0f), y(x.size(), 1.0f);
  std::vector<unsigned char> q(c.bytes);
  c.encode(x.data(), c.block, q.data());
  c.decode(q.data(), c.block, y.data());
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, GgmlCodec,
    ::testing::Values(Codec{"Q4_K", 256, 144, k::quantize_q4_k, k::dequantize_q4_k, 2e-2},
                      Codec{"Q5_K", 256, 176, k::quantize_q5_k, k::dequantize_q5_k, 5e-3},
                      Codec{"Q6_K", 256, 210, k::quantize_q6_k, k::dequantize_q6_k, 2e-3}),
    [](const ::testing::TestParamInfo<Codec>& info) { return std::string(info.param.name); });

TEST(GgmlBlocks, KQuantEncodersRoundToTheNearestLevel) {
  // The encoder's grid covers each sub-block's range (scales rounded up) and its start is within
  // dmin / 2 of the sub-block's minimum, so every value decodes within (d * sc + dmin) / 2.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(256), y(256);
  for (auto& v : x) v = u(rng);
  for (int levels : {15, 31}) {
    std::vector<unsigned char> q(levels == 15 ? 144 : 176);
    (levels == 15 ? k::quantize_q4_k : k::quantize_q5_k)(x.data(), 256, q.data());
    (levels == 15 ? k::dequantize_q4_k : k::dequantize_q5_k)(q.data(), 256, y.data());
    const float d = k::ggml_detail::load_half(q.data());
    const float dmin = k::ggml_detail::load_half(q.data() + 2);
    for (int v = 0; v < 256; ++v) {
      int sc, m;
      k::ggml_detail::k_scale_min(v / 32, q.data() + 4, sc, m);
      (void)m;
      EXPECT_LE(std::fabs(x[v] - y[v]), 0.5f * (d * sc + dmin) * (1 + 1e-5f)) << levels << ' ' << v;
    }
  }
}

}  // namespace
