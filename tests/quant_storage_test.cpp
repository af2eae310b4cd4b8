// QuantMatrix and QuantExpertStack (experts/quant_matrix.hpp, quant_expert_stack.hpp): both
// layouts hold the same weights, zero-copy views of stored bytes, repacking, and the errors.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "moe/experts/quant_expert_stack.hpp"
#include "moe/experts/quant_matrix.hpp"

#include "test_util.hpp"

namespace moe {
namespace {

RowMatrix<float> gaussian_matrix(Index rows, Index cols, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 0.1f);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

template <class Format>
class QuantMatrixTest : public ::testing::Test {};
using Formats = ::testing::Types<Q8, Q4, Mxfp4>;
struct Names {
  template <class T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(QuantMatrixTest, Formats, Names);

TYPED_TEST(QuantMatrixTest, BothLayoutsViewsAndRepacksHoldTheSameWeights) {
  using F = TypeParam;
  std::mt19937 rng(1);
  const RowMatrix<float> w = gaussian_matrix(7, 544, rng);  // 17 blocks: a partial super-chunk
  const auto stored = QuantMatrix<F>::quantize(w, QuantLayout::stored);
  const auto panels = QuantMatrix<F>::quantize(w, QuantLayout::panels);
  EXPECT_EQ(stored.layout(), QuantLayout::stored);
  EXPECT_EQ(panels.layout(), QuantLayout::panels);
  EXPECT_EQ(stored.bytes(), panels.bytes());
  EXPECT_EQ(stored.bytes(), std::size_t(7 * 17) * (std::is_same_v<F, Q8>   ? 34u
                                                   : std::is_same_v<F, Q4> ? 18u
                                                                           : 17u));
  const RowMatrix<float> a = stored.dequantize(), b = panels.dequantize();
  EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())), 0);
  // Quantisation error within the format's half step of each block's scale (loose bound).
  EXPECT_LE((a - w).cwiseAbs().maxCoeff(), 0.2f * w.cwiseAbs().maxCoeff());
  // A view of the stored bytes, and panels repacked from them.
  const auto view = QuantMatrix<F>::view(stored.stored());
  const auto repacked = QuantMatrix<F>::repack(stored.stored());
  EXPECT_EQ(view.stored().cols, 544);
  const RowMatrix<float> c = view.dequantize(), d = repacked.dequantize();
  EXPECT_EQ(std::memcmp(a.data(), c.data(), sizeof(float) * std::size_t(a.size())), 0);
  EXPECT_EQ(std::memcmp(a.data(), d.data(), sizeof(float) * std::size_t(a.size())), 0);
}

TEST(QuantMatrixErrors, ColumnsNotInBlocksAndNanScales) {
  std::mt19937 rng(2);
  test::expect_error<shape_error>(
      [&] { QuantMatrix<Q4>::quantize(gaussian_matrix(3, 40, rng), QuantLayout::panels); },
      "moe: q4 weight has 40 columns, expected a positive multiple of 32");
  std::vector<std::uint8_t> codes(32), scales{127, 0xff};
  test::expect_error<value_error>(
      [&] { QuantMatrix<Mxfp4>::view(kernels::Mxfp4View{codes.data(), scales.data(), 1, 64}); },
      "moe: mxfp4 weight has a NaN scale (0xFF) at row 0, block 1");
}

TEST(QuantExpertStack, ShapesLayoutsAndErrors) {
  std::mt19937 rng(3);
  test::expect_error<shape_error>([] { QuantExpertStack<Q8>(4, 64, 100, true); },
                                  "moe: q8 d_ff has 100 columns, expected a positive multiple of 32");
  QuantExpertStack<Q4> s(2, 64, 96, true);
  const auto gate = QuantMatrix<Q4>::quantize(gaussian_matrix(96, 64, rng), QuantLayout::stored);
  const auto up = QuantMatrix<Q4>::quantize(gaussian_matrix(96, 64, rng), QuantLayout::stored);
  const auto down = QuantMatrix<Q4>::quantize(gaussian_matrix(64, 96, rng), QuantLayout::stored);
  s.set_gated(1, gate, up, down);  // stored bytes repacked into the stack's panels
  EXPECT_EQ(s.gate(1).layout(), QuantLayout::panels);
  EXPECT_EQ(s.bytes(), gate.bytes() + up.bytes() + down.bytes());
  test::expect_error<shape_error>([&] { s.set_gated(0, down, up, down); },
                                  "moe: expert 0 gate weight has shape [64 x 96], expected [96 x 64]");
  QuantExpertStack<Q4> exact(1, 64, 96, true, QuantLayout::stored);
  test::expect_error<config_error>(
      [&] { exact.set_gated(0, s.gate(1), up, down); },
      "moe: expert 0 gate weight is in the panel layout, expected the stored layout of an "
      "exact-mode stack");
  test::expect_error<config_error>([&] { s.set_gated(2, gate, up, down); },
                                   "moe: expert index 2 out of range [0, 2)");
}

}  // namespace
}  // namespace moe
