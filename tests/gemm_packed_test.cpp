// Tests of the packed GEMM (moe/kernels/gemm_packed.hpp, gemm_packed_epilogue.hpp): against a
// plain double-precision product with a rounding bound, bitwise across column splits, thread
// counts, row counts and the prepacked entry, the scalar fallback, and every epilogue.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moe/kernels/gemm_packed.hpp"
#include "moe/kernels/gemm_packed_epilogue.hpp"
#include "moe/moe.hpp"
#include "test_util.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;

template <class T>
using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;

// W packed once plus the scratch of one call.
template <class T>
struct Packed {
  Buffer<T> panels;
  kernels::PackedPanels<T> view;
  Buffer<T> scratch;
};

template <class T>
Packed<T> pack(const RowMatrix<T>& w) {
  Packed<T> p;
  p.panels.resize(std::size_t(kernels::gemm_packed_size<T>(w.rows(), w.cols())));
  p.view = kernels::pack_nt(w.data(), w.rows(), w.cols(), w.cols(), p.panels.data());
  p.scratch.resize(std::size_t(kernels::gemm_packed_scratch_size<T>(w.cols())));
  return p;
}

// out = x * W^T on the packed kernel, all columns in one call, with exactly the scratch
// gemm_packed_scratch_size(n, k) asks for, followed by guard values that must stay untouched.
template <class T, kernels::GemmIsa Isa = kernels::GemmIsa::native>
RowMatrix<T> packed_product(const RowMatrix<T>& x, Packed<T>& p) {
  RowMatrix<T> out = RowMatrix<T>::Constant(x.rows(), p.view.cols, T(-7));
  kernels::StoreEpilogue<T> store{out.data(), out.cols()};
  const Index size = kernels::gemm_packed_scratch_size<T>(x.rows(), x.cols());
  constexpr Index kGuard = 64;
  Buffer<T> scratch(std::size_t(size + kGuard), T(12345));
  kernels::gemm_packed_nt<T, kernels::StoreEpilogue<T>, Isa>(
      x.data(), x.rows(), x.cols(), p.view, 0, p.view.cols, store, scratch.data());
  EXPECT_TRUE(std::all_of(scratch.begin() + size, scratch.end(), [](T v) { return v == T(12345); }))
      << "scratch overrun, " << x.rows() << " x " << x.cols();
  return out;
}

// Reordered sums of k products differ from the exact sum by at most about k eps sum |x w|
// (Higham, Accuracy and Stability, 3.1); twice that, plus one rounding, as the bound.
template <class T>
void expect_near_exact(const RowMatrix<T>& x, const RowMatrix<T>& w, const RowMatrix<T>& out,
                       const std::string& where) {
  const double eps = std::numeric_limits<T>::epsilon();
  const RowMatrix<double> xd = x.template cast<double>(), wd = w.template cast<double>();
  const RowMatrix<double> exact = xd * wd.transpose();
  const RowMatrix<double> bound = xd.cwiseAbs() * wd.cwiseAbs().transpose();
  ASSERT_EQ(out.rows(), exact.rows());
  ASSERT_EQ(out.cols(), exact.cols());
  for (Index r = 0; r < out.rows(); ++r) {
    for (Index j = 0; j < out.cols(); ++j) {
      const double tol = 2.0 * double(x.cols() + 1) * eps * bound(r, j) + 1e-300;
      ASSERT_LE(std::abs(double(out(r, j)) - exact(r, j)), tol)
          << where << " at (" << r << ", " << j << "): " << out(r, j) << " vs " << exact(r, j);
    }
  }
}

bool bitwise_equal(const RowMatrix<float>& a, const RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data(), [](float u, float v) {
           return std::memcmp(&u, &v, sizeof u) == 0;
         });
}
bool bitwise_equal(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data(), [](double u, double v) {
           return std::memcmp(&u, &v, sizeof u) == 0;
         });
}

template <class T>
class GemmPacked : public testing::Test {};
using Scalars = testing::Types<float, double>;
struct ScalarName {
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(GemmPacked, Scalars, ScalarName);

// Sizes around every blocking edge: rows 1, 7, 31, 129 and one past a row block (mc) and tile
// (mr); k 1, 7, 257 (one past the k block) and 600; columns 1, 31, 129 and two column blocks.
TYPED_TEST(GemmPacked, MatchesExactProductOverAwkwardSizes) {
  using T = TypeParam;
  using Shape = kernels::GemmPackedShape<T>;
  std::mt19937_64 rng(11);
  for (Index n : {Index(1), Index(7), Index(31), Index(129), Shape::mc + Shape::mr + 1}) {
    for (Index k : {Index(1), Index(7), Shape::kc + 1, Index(600)}) {
      for (Index c : {Index(1), Index(31), Index(129), 2 * Shape::nc + 5}) {
        if (n * k * c > Index(40) << 20) continue;  // keeps the double reference fast
        const RowMatrix<T> x = moe::test::random_matrix<T>(n, k, rng);
        const RowMatrix<T> w = moe::test::random_matrix<T>(c, k, rng);
        Packed<T> p = pack(w);
        const std::string where = testing::PrintToString(std::vector<Index>{n, k, c});
        expect_near_exact(x, w, packed_product(x, p), where + " native");
        expect_near_exact(x, w, packed_product<T, kernels::GemmIsa::scalar>(x, p),
                          where + " scalar");
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// A row's result is the same FMA chain whoever computes it: any split of the columns into tasks
// (on granule boundaries), run serially or on two threads, and any number of other rows.
TYPED_TEST(GemmPacked, BitwiseIndependentOfColumnSplitThreadsAndRows) {
  using T = TypeParam;
  using Shape = kernels::GemmPackedShape<T>;
  std::mt19937_64 rng(12);
  const Index n = Shape::mc + 3, k = Shape::kc + 77, c = 3 * Shape::nc + 31;
  const RowMatrix<T> x = moe::test::random_matrix<T>(n, k, rng);
  const RowMatrix<T> w = moe::test::random_matrix<T>(c, k, rng);
  Packed<T> p = pack(w);
  const RowMatrix<T> whole = packed_product(x, p);

  moe::ThreadPool pool(2);
  const moe::Executor* executors[] = {&moe::serial_executor(), &pool};
  for (const moe::Executor* ex : executors) {
    for (Index parts : {2, 3, 7, 29}) {
      RowMatrix<T> split = RowMatrix<T>::Constant(n, c, T(-7));
      Buffer<T> scratch(std::size_t(ex->num_workers() * kernels::gemm_packed_scratch_size<T>(k)));
      ex->run(parts, [&](Index task, Index worker) {
        const auto [c0, c1] = moe::block_range(c, parts, task, Shape::granule);
        kernels::StoreEpilogue<T> store{split.data(), c};
        kernels::gemm_packed_nt(x.data(), n, k, p.view, c0, c1, store,
                                scratch.data() + worker * kernels::gemm_packed_scratch_size<T>(k));
      });
      EXPECT_TRUE(bitwise_equal(split, whole)) << parts << " parts, " << ex->num_workers();
    }
  }
  // Each row alone, the first few rows (the few-row path), and through the prepacked entry.
  for (Index r : {Index(0), Index(5), n - 1}) {
    const RowMatrix<T> row = x.row(r);
    EXPECT_TRUE(bitwise_equal(packed_product(row, p), RowMatrix<T>(whole.row(r)))) << "row " << r;
  }
  for (Index rows : {2, 3, 4, 5, 8, 9}) {
    const RowMatrix<T> top = x.topRows(rows);
    EXPECT_TRUE(bitwise_equal(packed_product(top, p), RowMatrix<T>(whole.topRows(rows))))
        << rows << " rows";
  }
  Buffer<T> xpack(std::size_t(kernels::gemm_packed_x_size<T>(n, k)));
  kernels::gemm_packed_pack_x(x.data(), n, k, k, xpack.data());
  RowMatrix<T> prepacked = RowMatrix<T>::Constant(n, c, T(-7));
  Buffer<T> acc(std::size_t(kernels::gemm_packed_acc_size<T>()));
  kernels::gemm_packed_nt_prepacked(xpack.data(), n, p.view, 0, c,
                                    kernels::StoreEpilogue<T>{prepacked.data(), c}, acc.data());
  EXPECT_TRUE(bitwise_equal(prepacked, whole));
}

// x and out with row strides wider than their rows; columns outside [c0, c1) untouched.
TYPED_TEST(GemmPacked, StridedOperandsAndPartialColumnRange) {
  using T = TypeParam;
  using Shape = kernels::GemmPackedShape<T>;
  std::mt19937_64 rng(13);
  const Index n = 31, k = 129, c = 2 * Shape::granule + 9, ldx = k + 5, ldo = c + 3;
  const RowMatrix<T> xs = moe::test::random_matrix<T>(n, ldx, rng);
  const RowMatrix<T> w = moe::test::random_matrix<T>(c, k, rng);
  Packed<T> p = pack(w);
  RowMatrix<T> out = RowMatrix<T>::Constant(n, ldo, T(-7));
  const Index c0 = Shape::granule, c1 = c - 2;
  kernels::gemm_packed_nt(xs.data(), n, ldx, p.view, c0, c1,
                          kernels::StoreEpilogue<T>{out.data(), ldo}, p.scratch.data());
  const RowMatrix<T> x = xs.leftCols(k);
  const RowMatrix<T> inside = out.middleCols(c0, c1 - c0);
  const RowMatrix<T> w_inside = w.middleRows(c0, c1 - c0);
  expect_near_exact(x, w_inside, inside, "strided");
  EXPECT_TRUE((out.leftCols(c0).array() == T(-7)).all());
  EXPECT_TRUE((out.rightCols(ldo - c1).array() == T(-7)).all());
}

TYPED_TEST(GemmPacked, EmptyInnerDimensionGivesZeros) {
  using T = TypeParam;
  const RowMatrix<T> x(5, 0), w(9, 0);
  Packed<T> p = pack(w);
  EXPECT_TRUE((packed_product(x, p).array() == T(0)).all());
}

// The routing weight folded into the epilogue: one rounding of scale * product, as a separate pass.
TYPED_TEST(GemmPacked, ScaleRowsEqualsStoreThenScale) {
  using T = TypeParam;
  std::mt19937_64 rng(14);
  const Index n = 37, k = 300, c = 100;
  const RowMatrix<T> x = moe::test::random_matrix<T>(n, k, rng);
  const RowMatrix<T> w = moe::test::random_matrix<T>(c, k, rng);
  const RowMatrix<T> scale = moe::test::random_matrix<T>(n, 1, rng);
  Packed<T> p = pack(w);
  const RowMatrix<T> plain = packed_product(x, p);
  RowMatrix<T> scaled(n, c);
  kernels::gemm_packed_nt(x.data(), n, k, p.view, 0, c,
                          kernels::ScaleRowsEpilogue<T>{scaled.data(), c, scale.data()},
                          p.scratch.data());
  RowMatrix<T> expected(n, c);
  for (Index r = 0; r < n; ++r) {
    for (Index j = 0; j < c; ++j) expected(r, j) = scale(r, 0) * plain(r, j);
  }
  EXPECT_TRUE(bitwise_equal(scaled, expected));
}

// Gated weights: pack_gated_nt + the SwiGLU / generic gated epilogues against silu(g) * u from the
// exact products, over d_ff not a multiple of the pair group, split across gated_granule tasks.
TYPED_TEST(GemmPacked, GatedEpiloguesMatchExactActivations) {
  using T = TypeParam;
  using Shape = kernels::GemmPackedShape<T>;
  std::mt19937_64 rng(15);
  for (Index f : {Index(1), Index(7), Index(31), Index(129)}) {
    const Index n = 33, k = 70;
    const RowMatrix<T> x = moe::test::random_matrix<T>(n, k, rng);
    const RowMatrix<T> gate = moe::test::random_matrix<T>(f, k, rng);
    const RowMatrix<T> up = moe::test::random_matrix<T>(f, k, rng);
    const Index cols = kernels::gemm_packed_gated_cols<T>(f);
    Buffer<T> panels(std::size_t(kernels::gemm_packed_size<T>(cols, k)));
    const auto w = kernels::pack_gated_nt(gate.data(), k, up.data(), k, f, k, panels.data());
    ASSERT_EQ(w.cols, cols);
    Buffer<T> scratch(std::size_t(kernels::gemm_packed_scratch_size<T>(k)));
    RowMatrix<T> swiglu = RowMatrix<T>::Constant(n, f, T(-7));
    RowMatrix<T> generic = RowMatrix<T>::Constant(n, f, T(-7));
    for (Index parts : {1, 3}) {
      for (Index part = 0; part < parts; ++part) {
        const auto [c0, c1] = moe::block_range(cols, parts, part, Shape::gated_granule);
        kernels::gemm_packed_nt(x.data(), n, k, w, c0, c1,
                                kernels::SwiGluEpilogue<T>{swiglu.data(), f, f}, scratch.data());
        kernels::gemm_packed_nt(x.data(), n, k, w, c0, c1,
                                kernels::GatedEpilogue<T, moe::Silu>{generic.data(), f, f},
                                scratch.data());
      }
    }
    const RowMatrix<double> xd = x.template cast<double>();
    const RowMatrix<double> g = xd * gate.template cast<double>().transpose();
    const RowMatrix<double> u = xd * up.template cast<double>().transpose();
    const double eps = std::numeric_limits<T>::epsilon();
    for (Index r = 0; r < n; ++r) {
      for (Index a = 0; a < f; ++a) {
        const double exact = g(r, a) / (1.0 + std::exp(-g(r, a))) * u(r, a);
        // The products carry k eps of their magnitude; silu and the product a few eps more.
        const double scale = std::abs(g(r, a)) * std::abs(u(r, a)) + std::abs(g(r, a)) +
                             std::abs(u(r, a));
        const double tol = (4.0 * double(k) + 16.0) * eps * (scale + 1.0);
        ASSERT_NEAR(double(swiglu(r, a)), exact, tol) << "swiglu f " << f << " at " << r << ", " << a;
        ASSERT_NEAR(double(generic(r, a)), exact, tol) << "gated f " << f << " at " << r << ", " << a;
      }
    }
  }
}

// The fused SwiGLU gives bitwise the activations of the unfused path (product, then the block's
// activation pass) from the same products.
TEST(GemmPackedSwiGlu, FusedEqualsProductThenActivationPass) {
  std::mt19937_64 rng(16);
  const Index n = 19, k = 130, f = 75;
  const RowMatrix<float> x = moe::test::random_matrix<float>(n, k, rng);
  const RowMatrix<float> gate_up = moe::test::random_matrix<float>(2 * f, k, rng);
  Packed<float> plain = pack(gate_up);
  RowMatrix<float> hidden = packed_product(x, plain);
  RowMatrix<float> unfused(n, f);
  moe::detail::apply_activation_cols<moe::SwiGLU>(hidden.data(), 2 * f, n, f, 0, f,
                                                  unfused.data(), f);
  const Index cols = kernels::gemm_packed_gated_cols<float>(f);
  Buffer<float> panels(std::size_t(kernels::gemm_packed_size<float>(cols, k)));
  const auto w = kernels::pack_gated_nt(gate_up.data(), k, gate_up.data() + f * k, k, f, k,
                                        panels.data());
  RowMatrix<float> fused(n, f);
  kernels::gemm_packed_nt(x.data(), n, k, w, 0, cols,
                          kernels::SwiGluEpilogue<float>{fused.data(), f, f},
                          plain.scratch.data());
  EXPECT_TRUE(bitwise_equal(fused, unfused));
}

}  // namespace
