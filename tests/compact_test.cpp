// Tests of compact weight formats (moe/compact.hpp) and their kernels
// (moe/kernels/gemm_compact.hpp): exact round trips, SIMD == scalar bit for bit, accuracy.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/experts/compact_expert_stack.hpp"
#include "moe/experts/compact_matrix.hpp"
#include "moe/kernels/gemm_compact.hpp"

namespace {

using moe::Bf16;
using moe::CompactMatrix;
using moe::Fp8E4M3;
using moe::Index;
using moe::Int8;
using moe::RowMatrix;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

RowMatrix<float> row(std::vector<float> v) {
  RowMatrix<float> m(1, Index(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) m(0, Index(i)) = v[i];
  return m;
}

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

RowMatrix<float> random_matrix(Index rows, Index cols, std::uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

// ---- round trips with exact expected values ----

TEST(CompactBf16, RoundsToNearestEvenAndKeepsNan) {
  // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: to 1. 1 + 3 * 2^-8 is halfway between
  // 1 + 2^-7 (odd) and 1 + 2^-6 (even): up. 1 + 2^-8 + 2^-20 is above half: up.
  const auto m = CompactMatrix<Bf16>::quantize(
      row({1.0f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f, -2.5f, kNan, -kNan,
           kInf, 3.4e38f}));
  const std::vector<std::uint16_t> expected = {0x3f80, 0x3f80, 0x3f82, 0x3f81, 0xc020,
                                               0x7fc0, 0xffc0, 0x7f80, 0x7f80};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(m.codes()[i], expected[i]) << "element " << i;
  }
  const RowMatrix<float> d = m.dequantize();
  EXPECT_EQ(d(0, 0), 1.0f);
  EXPECT_EQ(d(0, 2), 1.0f + 0x1p-6f);
  EXPECT_EQ(d(0, 4), -2.5f);
  EXPECT_TRUE(std::isnan(d(0, 5)));
  EXPECT_TRUE(std::isnan(d(0, 6)));
  EXPECT_EQ(d(0, 7), kInf);
  EXPECT_EQ(m.scales(), nullptr);
  EXPECT_EQ(m.bytes(), 9u * 2u);
}

TEST(CompactInt8, PerRowScaleRoundsHalfEvenAndSaturates) {
  // Row 0: max |w| = 127, scale 1: ties to even, infinities saturate to +-127.
  // Row 1: max |w| = 2.54, scale 0.02. Row 2: all zero, scale 0.
  RowMatrix<float> w(3, 8);
  w.row(0) << 127.0f, 0.5f, 1.5f, 2.5f, -3.5f, kInf, -kInf, -126.6f;
  w.row(1) << 2.54f, -2.54f, 0.0f, 1.0f, -1.0f, 0.02f, 0.03f, 0.0f;
  w.row(2).setZero();
  const auto m = CompactMatrix<Int8>::quantize(w);
  EXPECT_EQ(m.scales()[0], 1.0f);
  EXPECT_EQ(m.scales()[1], 2.54f / 127.0f);
  EXPECT_EQ(m.scales()[2], 0.0f);
  const std::vector<int> row0 = {127, 0, 2, 2, -4, 127, -127, -127};
  const std::vector<int> row1 = {127, -127, 0, 50, -50, 1, 2, 0};
  for (Index i = 0; i < 8; ++i) {
    EXPECT_EQ(m.codes()[i], row0[std::size_t(i)]) << "row 0, column " << i;
    EXPECT_EQ(m.codes()[8 + i], row1[std::size_t(i)]) << "row 1, column " << i;
    EXPECT_EQ(m.codes()[16 + i], 0);
  }
  const RowMatrix<float> d = m.dequantize();
  EXPECT_EQ(d(0, 5), 127.0f);
  EXPECT_EQ(d(1, 3), 50.0f * (2.54f / 127.0f));
  EXPECT_EQ(d(2, 0), 0.0f);
  EXPECT_EQ(m.bytes(), 24u + 3u * 4u);
}

TEST(CompactInt8, NanIsRejectedWithItsPosition) {
  try {
    (void)CompactMatrix<Int8>::quantize(row({1.0f, kNan}));
    FAIL() << "expected value_error";
  } catch (const moe::value_error& e) {
    EXPECT_STREQ(e.what(), "moe: cannot quantise NaN to int8 (row 0, column 1)");
  }
}

TEST(CompactFp8, PerTensorExactValuesSubnormalsMaximumSaturationNan) {
  // Scale 1: subnormals are multiples of 2^-9; 2^-10 ties to 0 (even), 3 * 2^-10 ties to 2^-8
  // (code 2, even); 448 is the largest finite; 464 ties to 448; above saturates; NaN stays NaN.
  const auto m = CompactMatrix<Fp8E4M3>::quantize_per_tensor(
      row({0x1p-9f, 0x1p-10f, 3 * 0x1p-10f, 7 * 0x1p-9f, 0x1p-6f, 448.0f, 464.0f, 500.0f, -1e6f,
           kInf, kNan, -kNan, 1.0f, -0.0f}),
      1.0f);
  const std::vector<std::uint8_t> expected = {0x01, 0x00, 0x02, 0x07, 0x08, 0x7e, 0x7e,
                                              0x7e, 0xfe, 0x7e, 0x7f, 0xff, 0x38, 0x80};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(m.codes()[i], expected[i]) << "element " << i;
  }
  const RowMatrix<float> d = m.dequantize();
  EXPECT_EQ(d(0, 0), 0x1p-9f);
  EXPECT_EQ(d(0, 2), 0x1p-8f);
  EXPECT_EQ(d(0, 3), 7 * 0x1p-9f);
  EXPECT_EQ(d(0, 5), 448.0f);
  EXPECT_EQ(d(0, 8), -448.0f);
  EXPECT_TRUE(std::isnan(d(0, 10)));
  EXPECT_TRUE(std::isnan(d(0, 11)));
  EXPECT_FALSE(m.simple());  // holds NaN codes
  EXPECT_EQ(m.scale_grid_rows(), 1);
  EXPECT_EQ(m.scale_grid_cols(), 1);

  // Scale 2: values above 448 * 2 saturate to 896.
  const auto s = CompactMatrix<Fp8E4M3>::quantize_per_tensor(row({896.0f, 1000.0f, -3.0f}), 2.0f);
  const RowMatrix<float> ds = s.dequantize();
  EXPECT_EQ(ds(0, 0), 896.0f);
  EXPECT_EQ(ds(0, 1), 896.0f);
  EXPECT_EQ(ds(0, 2), -3.0f);
  try {
    (void)CompactMatrix<Fp8E4M3>::quantize_per_tensor(row({1.0f}), 0.0f);
    FAIL() << "expected value_error";
  } catch (const moe::value_error& e) {
    EXPECT_STREQ(e.what(), "moe: fp8 per-tensor scale must be > 0 and finite, got 0");
  }
}

TEST(CompactFp8, BlockScalesFollowDeepSeekLayout) {
  const RowMatrix<float> w = random_matrix(130, 260, 3);
  const auto m = CompactMatrix<Fp8E4M3>::quantize(w);
  ASSERT_EQ(m.scale_grid_rows(), 2);
  ASSERT_EQ(m.scale_grid_cols(), 3);
  EXPECT_EQ(m.num_scales(), 6);
  for (Index br = 0; br < 2; ++br) {
    for (Index bc = 0; bc < 3; ++bc) {
      const Index r0 = br * 128, c0 = bc * 128;
      const Index r1 = std::min<Index>(130, r0 + 128), c1 = std::min<Index>(260, c0 + 128);
      const float amax = w.block(r0, c0, r1 - r0, c1 - c0).cwiseAbs().maxCoeff();
      EXPECT_EQ(m.scales()[br * 3 + bc], amax / 448.0f);
      EXPECT_EQ(m.scale(r1 - 1, c1 - 1), amax / 448.0f);
    }
  }
  EXPECT_TRUE(m.simple());
  EXPECT_EQ(m.bytes(), 130u * 260u + 6u * 4u);
  // Each element within half an fp8 step (2^-4 relative for normals) of the original.
  const RowMatrix<float> d = m.dequantize();
  for (Index i = 0; i < w.size(); ++i) {
    const float s = m.scale(i / 260, i % 260);
    EXPECT_LE(std::abs(d.data()[i] - w.data()[i]),
              std::abs(w.data()[i]) / 16 + 0x1p-10f * s * 1.0001f)
        << i;
  }
}

TEST(CompactFp8, ZeroCopyViewOfCheckpointTensors) {
  // An F8_E4M3 weight [3 x 20] with weight_scale_inv [1 x 1] of block 128 x 128, as a mapping
  // would hand them over: the view reads the caller's arrays in place.
  std::vector<std::uint8_t> codes(60, 0x38);  // 1.0
  codes[5] = 0x01;                            // 2^-9
  codes[59] = 0xfe;                           // -448
  const float scale_inv = 0.5f;
  const auto v = CompactMatrix<Fp8E4M3>::view(codes.data(), 3, 20, &scale_inv);
  EXPECT_FALSE(v.owning());
  EXPECT_EQ(v.codes(), codes.data());
  EXPECT_EQ(v(0, 0), 0.5f);
  EXPECT_EQ(v(0, 5), 0x1p-10f);
  EXPECT_EQ(v(2, 19), -224.0f);
  codes[0] = 0x40;  // 2.0: the view sees the change (no copy)
  EXPECT_EQ(v(0, 0), 1.0f);

  std::vector<std::uint16_t> b = {0x3f80, 0xc000, 0x7fc0};
  const auto vb = CompactMatrix<Bf16>::view(b.data(), 1, 3);
  EXPECT_EQ(vb(0, 1), -2.0f);
  EXPECT_TRUE(std::isnan(vb(0, 2)));

  try {
    (void)CompactMatrix<Fp8E4M3>::view(codes.data(), 3, 20, &scale_inv, 128, 8);
    FAIL() << "expected config_error";
  } catch (const moe::config_error& e) {
    EXPECT_STREQ(e.what(),
                 "moe: fp8 scale block [128 x 8] is invalid for a [3 x 20] matrix: sides must be "
                 ">= 1 and block_cols a power of two >= 16 or >= cols");
  }
  try {
    (void)CompactMatrix<Int8>::view(nullptr, 2, 2);
    FAIL() << "expected config_error";
  } catch (const moe::config_error& e) {
    EXPECT_STREQ(e.what(), "moe: int8 weights need scales");
  }
}

// ---- SIMD == scalar, bit for bit ----

template <class Format>
CompactMatrix<Format> quantize_for(const RowMatrix<float>& w, bool per_tensor) {
  if constexpr (std::is_same_v<Format, Fp8E4M3>) {
    if (per_tensor)
      return CompactMatrix<Format>::quantize(w, std::max<Index>(w.rows(), 1),
                                             std::max<Index>(w.cols(), 1));
  }
  (void)per_tensor;
  return CompactMatrix<Format>::quantize(w);
}

bool same_bits(float a, float b) { return (std::isnan(a) && std::isnan(b)) || bits(a) == bits(b); }

template <class Format>
void check_simd_equals_scalar(const CompactMatrix<Format>& w, Index n, const std::string& what) {
  const Index in = w.cols(), out = w.rows();
  const Index ldx = in + 3, ldy = out + 2;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> x(std::size_t(n * ldx));
  for (float& v : x) v = dist(rng);
  std::vector<float> y1(std::size_t(n * ldy), -7.0f), y2(y1);
  // Every column range: whole, and a split at an unaligned boundary.
  const Index split = out / 3;
  moe::kernels::gemm_compact_nt(x.data(), n, ldx, w.kernel_view(), 0, split, y1.data(), ldy);
  moe::kernels::gemm_compact_nt(x.data(), n, ldx, w.kernel_view(), split, out, y1.data(), ldy);
  moe::kernels::gemm_compact_nt_scalar(x.data(), n, ldx, w.kernel_view(), 0, out, y2.data(), ldy);
  for (Index r = 0; r < n; ++r) {
    for (Index o = 0; o < ldy; ++o) {
      const float a = y1[std::size_t(r * ldy + o)], b = y2[std::size_t(r * ldy + o)];
      ASSERT_TRUE(same_bits(a, b))
          << what << " n " << n << " r " << r << " o " << o << ": " << a << " vs " << b;
    }
  }
}

template <class Format>
class CompactKernel : public ::testing::Test {};
using Formats = ::testing::Types<Bf16, Int8, Fp8E4M3>;
struct FormatNames {
  template <class Format>
  static std::string GetName(int /*index*/) {
    return Format::name;
  }
};
TYPED_TEST_SUITE(CompactKernel, Formats, FormatNames);

TYPED_TEST(CompactKernel, SimdEqualsScalarBitForBitOverAwkwardSizes) {
  for (Index in : {1, 15, 16, 17, 129, 300}) {
    for (Index out : {1, 3, 33}) {
      const RowMatrix<float> w = random_matrix(out, in, std::uint32_t(in * 100 + out));
      for (bool per_tensor : {false, true}) {
        const auto c = quantize_for<TypeParam>(w, per_tensor);
        for (Index n = 1; n <= 17; ++n) {
          check_simd_equals_scalar(c, n,
                                   std::string(TypeParam::name) + " in " + std::to_string(in) +
                                       " out " + std::to_string(out) +
                                       (per_tensor ? " per-tensor" : ""));
          if (this->HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(CompactKernel, Fp8GeneralPathNanCodesAndLargeScales) {
  // Scales >= 2^100 and NaN codes take the general (non-"simple") SIMD path: still bit-identical.
  const RowMatrix<float> w = random_matrix(33, 129, 5, 1e35f);
  auto c = CompactMatrix<Fp8E4M3>::quantize(w);
  EXPECT_FALSE(c.simple());
  for (Index n : {1, 4, 7}) check_simd_equals_scalar(c, n, "fp8 large scale");
  std::vector<std::uint8_t> codes(33 * 129);
  std::mt19937 rng(2);
  for (auto& v : codes) v = std::uint8_t(rng());
  std::vector<float> scales(2, 0.01f);
  const auto v = CompactMatrix<Fp8E4M3>::view(codes.data(), 33, 129, scales.data());
  EXPECT_FALSE(v.simple());
  for (Index n : {1, 5}) check_simd_equals_scalar(v, n, "fp8 NaN codes");
  std::vector<float> y(33);
  std::vector<float> x(129, 1.0f);
  moe::kernels::gemm_compact_nt(x.data(), 1, 129, v.kernel_view(), 0, 33, y.data(), 33);
  for (Index o = 0; o < 33; ++o) {
    bool has_nan = false;
    for (Index i = 0; i < 129; ++i) has_nan |= (codes[std::size_t(o * 129 + i)] & 0x7f) == 0x7f;
    EXPECT_EQ(std::isnan(y[std::size_t(o)]), has_nan) << o;
  }
}

TEST(CompactKernel, ReportsWhichPathRuns) {
  std::printf("[ info ] gemm_compact_nt SIMD (AVX-512) path: %s\n",
              moe::kernels::gemm_compact_simd ? "yes" : "no (scalar)");
}

// ---- accuracy against fp32 ----

double nmse(const RowMatrix<double>& ref, const RowMatrix<float>& y) {
  return (y.cast<double>() - ref).squaredNorm() / ref.squaredNorm();
}

template <class Format>
double measured_nmse(Index n, bool prefill) {
  const Index out = 256, in = 1024;
  const RowMatrix<float> w = random_matrix(out, in, 21, 0.02f);
  const RowMatrix<float> x = random_matrix(n, in, 22);
  const RowMatrix<double> ref = x.cast<double>() * w.cast<double>().transpose();
  const auto c = CompactMatrix<Format>::quantize(w);
  RowMatrix<float> y(n, out);
  if (prefill) {
    std::vector<float> scratch(std::size_t(moe::kernels::gemm_compact_scratch_floats(in)));
    moe::kernels::gemm_compact_nt_prefill(x.data(), n, in, c.kernel_view(), 0, out, y.data(), out,
                                          scratch.data(), Index(scratch.size()));
  } else {
    moe::kernels::gemm_compact_nt(x.data(), n, in, c.kernel_view(), 0, out, y.data(), out);
  }
  return nmse(ref, y);
}

TEST(CompactAccuracy, NormalisedMseAgainstFp32) {
  const double bf16 = measured_nmse<Bf16>(8, false), int8 = measured_nmse<Int8>(8, false),
               fp8 = measured_nmse<Fp8E4M3>(8, false);
  const double bf16_p = measured_nmse<Bf16>(64, true), int8_p = measured_nmse<Int8>(64, true),
               fp8_p = measured_nmse<Fp8E4M3>(64, true);
  std::printf(
      "[ info ] NMSE vs fp32 (256 x 1024 gaussian weights), small n=8 / prefill n=64: "
      "bf16 %.3g / %.3g, int8 %.3g / %.3g, fp8 %.3g / %.3g\n",
      bf16, bf16_p, int8, int8_p, fp8, fp8_p);
  EXPECT_LE(bf16, 1e-5);
  EXPECT_LE(int8, 1e-4);
  EXPECT_LE(fp8, 2e-3);
  EXPECT_LE(bf16_p, 1e-5);
  EXPECT_LE(int8_p, 1e-4);
  EXPECT_LE(fp8_p, 2e-3);
}

TYPED_TEST(CompactKernel, PrefillMatchesDequantisedProduct) {
  const Index out = 300, in = 129, n = 40;
  const RowMatrix<float> w = random_matrix(out, in, 31);
  const RowMatrix<float> x = random_matrix(n, in, 32);
  const auto c = CompactMatrix<TypeParam>::quantize(w);
  const RowMatrix<double> ref =
      x.cast<double>() * c.dequantize().template cast<double>().transpose();
  // A scratch of 100 rows: tiles of 100, 100, 100 (the last partial for out_begin 7).
  std::vector<float> scratch(std::size_t(100 * in));
  RowMatrix<float> y = RowMatrix<float>::Constant(n, out, -5.0f);
  moe::kernels::gemm_compact_nt_prefill(x.data(), n, in, c.kernel_view(), 7, out, y.data(), out,
                                        scratch.data(), Index(scratch.size()));
  EXPECT_EQ(y(0, 6), -5.0f);
  EXPECT_LE(nmse(ref.rightCols(out - 7), y.rightCols(out - 7)), 1e-12);
  RowMatrix<float> ys(n, out);
  moe::kernels::gemm_compact_nt_auto(x.data(), 3, in, c.kernel_view(), 0, out, ys.data(), out,
                                     nullptr, 0);
  EXPECT_LE(nmse(ref.topRows(3), ys.topRows(3)), 1e-12);
}

// ---- the compact expert stack ----

TYPED_TEST(CompactKernel, ExpertStackFromFp32) {
  moe::ExpertStack<float> w(3, 64, 48, true);
  w.stacked_in() = random_matrix(3 * 96, 64, 41);
  w.stacked_out() = random_matrix(3 * 64, 48, 42);
  const auto s = moe::CompactExpertStack<TypeParam>::from(w);
  EXPECT_EQ(s.num_experts(), 3);
  EXPECT_EQ(s.in_rows(), 96);
  for (Index e = 0; e < 3; ++e) {
    EXPECT_EQ(s.gate(e).dequantize(), CompactMatrix<TypeParam>::quantize(w.gate(e)).dequantize());
    EXPECT_EQ(s.up(e).dequantize(), CompactMatrix<TypeParam>::quantize(w.up(e)).dequantize());
    EXPECT_EQ(s.w_out(e).dequantize(), CompactMatrix<TypeParam>::quantize(w.w_out(e)).dequantize());
  }
  const std::size_t weights = 3 * (96 * 64 + 64 * 48);
  if constexpr (std::is_same_v<TypeParam, Bf16>) {
    EXPECT_EQ(s.bytes(), weights * 2);
  } else if constexpr (std::is_same_v<TypeParam, Int8>) {
    EXPECT_EQ(s.bytes(), weights + 3 * (48 + 48 + 64) * 4);
  } else {
    EXPECT_EQ(s.bytes(), weights + 3 * 3 * 4);  // one 128 x 128 block per projection
  }
  EXPECT_EQ(w.bytes(), weights * 4);
  moe::CompactExpertStack<TypeParam> t(2, 64, 48, true);
  try {
    t.set_gated(1, s.gate(0), s.up(0), s.gate(0));
    FAIL() << "expected shape_error";
  } catch (const moe::shape_error& e) {
    EXPECT_STREQ(e.what(), "moe: expert 1 down weight has shape [48 x 64], expected [64 x 48]");
  }
}

}  // namespace
