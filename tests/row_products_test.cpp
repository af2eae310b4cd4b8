// kernels::rows_times_matrix against a plain double-precision product, and its one promise: a
// row's result does not depend on the other rows (the same bits alone, in any batch, at any
// position), across the register tile, the edge columns and the depth blocks.
#include "moe/kernels/row_products.hpp"

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "moe/error.hpp"

namespace moe {
namespace {

template <class T>
RowMatrix<T> random(Index rows, Index cols, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

template <class T>
void check(Index n, Index k, Index m, std::uint32_t seed) {
  const std::string what = detail::concat("n ", n, " k ", k, " m ", m);
  std::mt19937 rng(seed);
  const RowMatrix<T> a = random<T>(n, k, rng), w = random<T>(k, m, rng);
  RowMatrix<T> y(n, m);
  kernels::rows_times_matrix(a.data(), n, k, k, w.data(), m, m, y.data(), m);
  const Eigen::MatrixXd want = a.template cast<double>() * w.template cast<double>();
  const double tol = (sizeof(T) == 4 ? 1e-5 : 1e-13) * std::sqrt(static_cast<double>(k));
  EXPECT_LE((y.template cast<double>() - want).cwiseAbs().maxCoeff(), tol * (1 + want.norm()))
      << what;
  // Every row alone, from a copy at another address: the same bits.
  for (Index r = 0; r < n; ++r) {
    RowMatrix<T> one_a(2, k), one_y(1, m);
    one_a.row(1) = a.row(r);  // row 1: a different offset than in a
    kernels::rows_times_matrix(one_a.data() + k, 1, k, k, w.data(), m, m, one_y.data(), m);
    EXPECT_EQ(std::memcmp(one_y.data(), y.data() + r * m, sizeof(T) * std::size_t(m)), 0)
        << what << ", row " << r;
  }
}

TEST(RowProducts, MatchesAPlainProductAndEveryRowStandsAlone) {
  std::uint32_t seed = 1;
  for (Index n : {1, 4, 7, 31}) {
    for (Index k : {1, 7, 129, 300}) {
      for (Index m : {1, 7, 31, 32, 65}) {
        check<float>(n, k, m, seed++);
        check<double>(n, k, m, seed++);
      }
    }
  }
}

TEST(RowProducts, ConvertsTheLeftScalar) {
  const RowMatrix<float> w = RowMatrix<float>::Constant(3, 5, 2.0f);
  const double a[3] = {1.0, 0.5, 0.25};
  RowMatrix<float> y(1, 5);
  kernels::rows_times_matrix(a, 1, 3, 3, w.data(), 5, 5, y.data(), 5);
  EXPECT_TRUE(y.isConstant(3.5f));
}

}  // namespace
}  // namespace moe
