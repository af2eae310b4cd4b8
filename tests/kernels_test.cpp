#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moe/kernels/gemm_small.hpp"
#include "moe/threading.hpp"

namespace {

using moe::Index;

template <class T>
std::vector<T> random_values(std::size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<T> dist(T(-1), T(1));
  std::vector<T> v(count);
  for (T& e : v) e = dist(rng);
  return v;
}

// Sizes and strides of one product; strides larger than the widths catch indexing mistakes.
struct Problem {
  Index n, in, out;
  Index pad = 0;  // Extra elements per row of X, W and Y.
};

template <class T>
struct Data {
  Problem p;
  Index ldx, ldw, ldy;
  std::vector<T> x, w, y, y_ref;
  std::vector<T> bound;  // Per element of Y: sum_i |x * w|, for the error bound.

  Data(Problem problem, std::uint32_t seed)
      : p(problem), ldx(p.in + p.pad), ldw(p.in + p.pad), ldy(p.out + p.pad) {
    std::mt19937 rng(seed);
    x = random_values<T>(std::size_t(std::max<Index>(p.n * ldx, 1)), rng);
    w = random_values<T>(std::size_t(std::max<Index>(p.out * ldw, 1)), rng);
    // Sentinel everywhere: columns outside the computed range and padding must stay untouched.
    y.assign(std::size_t(std::max<Index>(p.n * ldy, 1)), T(12345));
    y_ref = y;
    bound.assign(y.size(), T(0));
    for (Index r = 0; r < p.n; ++r) {
      for (Index o = 0; o < p.out; ++o) {
        T s = 0;
        for (Index i = 0; i < p.in; ++i) s += std::abs(x[r * ldx + i] * w[o * ldw + i]);
        bound[r * ldy + o] = s;
      }
    }
  }
};

// Reordered sums of `in` products differ from in-order ones by at most about 2 * in * eps times
// sum |x * w| (Higham, Accuracy and Stability, 3.1); one more unit for the final rounding.
template <class T>
void expect_close(const Data<T>& d, const std::string& where) {
  const T eps = std::numeric_limits<T>::epsilon();
  for (std::size_t k = 0; k < d.y.size(); ++k) {
    const T tol = T(2 * (d.p.in + 1)) * eps * d.bound[k];
    ASSERT_LE(std::abs(d.y[k] - d.y_ref[k]), tol)
        << where << " at flat index " << k << ": " << d.y[k] << " vs " << d.y_ref[k];
  }
}

template <class T>
class GemmSmallNt : public testing::Test {};
using Scalars = testing::Types<float, double>;
struct ScalarName {
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(GemmSmallNt, Scalars, ScalarName);

TYPED_TEST(GemmSmallNt, MatchesScalarOverAwkwardSizes) {
  using T = TypeParam;
  std::uint32_t seed = 1;
  for (Index n = 1; n <= 17; ++n) {
    for (Index in : {1, 7, 15, 16, 17, 31, 129}) {
      for (Index out : {1, 3, 5, 33}) {
        for (Index pad : {0, 3}) {
          Data<T> d({n, in, out, pad}, seed++);
          moe::kernels::gemm_small_nt(d.x.data(), n, d.ldx, d.w.data(), in, d.ldw, 0, out,
                                      d.y.data(), d.ldy);
          moe::kernels::gemm_small_nt_scalar(d.x.data(), n, d.ldx, d.w.data(), in, d.ldw, 0, out,
                                             d.y_ref.data(), d.ldy);
          expect_close(d, testing::PrintToString(std::vector<Index>{n, in, out, pad}));
          if (testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

TYPED_TEST(GemmSmallNt, ModelSizes) {
  using T = TypeParam;
  for (Index n : {1, 2, 8, 16}) {
    Data<T> d({n, 1024, 37, 0}, 7);
    moe::kernels::gemm_small_nt(d.x.data(), n, d.ldx, d.w.data(), d.p.in, d.ldw, 0, d.p.out,
                                d.y.data(), d.ldy);
    moe::kernels::gemm_small_nt_scalar(d.x.data(), n, d.ldx, d.w.data(), d.p.in, d.ldw, 0, d.p.out,
                                       d.y_ref.data(), d.ldy);
    expect_close(d, "n " + std::to_string(n));
  }
}

TYPED_TEST(GemmSmallNt, LongRowsManyRowsAndSeveralPasses) {
  // Long rows with more than one row group are cut into L1-sized chunks; more than
  // gemm_small_nt_max_rows rows take several passes over W.
  using T = TypeParam;
  std::uint32_t seed = 100;
  for (Index n : {5, 8, 13, 16, 17, 32, 33, 40}) {
    for (Index in : {1000, 2049}) {
      for (Index out : {5, 9}) {
        Data<T> d({n, in, out, 1}, seed++);
        moe::kernels::gemm_small_nt(d.x.data(), n, d.ldx, d.w.data(), in, d.ldw, 0, out, d.y.data(),
                                    d.ldy);
        moe::kernels::gemm_small_nt_scalar(d.x.data(), n, d.ldx, d.w.data(), in, d.ldw, 0, out,
                                           d.y_ref.data(), d.ldy);
        expect_close(d, testing::PrintToString(std::vector<Index>{n, in, out}));
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

TYPED_TEST(GemmSmallNt, SubRangeWritesOnlyItsColumns) {
  using T = TypeParam;
  for (auto [begin, end] : {std::pair<Index, Index>{0, 0},
                            {5, 5},
                            {0, 4},
                            {4, 33},
                            {3, 10},
                            {32, 33},
                            {1, 2},
                            {8, 31}}) {
    Data<T> d({6, 19, 33, 2}, 11);
    moe::kernels::gemm_small_nt(d.x.data(), d.p.n, d.ldx, d.w.data(), d.p.in, d.ldw, begin, end,
                                d.y.data(), d.ldy);
    moe::kernels::gemm_small_nt_scalar(d.x.data(), d.p.n, d.ldx, d.w.data(), d.p.in, d.ldw, begin,
                                       end, d.y_ref.data(), d.ldy);
    expect_close(d, "range " + std::to_string(begin) + ".." + std::to_string(end));
    for (Index r = 0; r < d.p.n; ++r) {
      for (Index o = 0; o < d.ldy; ++o) {
        if (o < begin || o >= end) {
          ASSERT_EQ(d.y[r * d.ldy + o], T(12345)) << r << ", " << o;
        }
      }
    }
  }
}

TYPED_TEST(GemmSmallNt, EmptyInputsWriteZerosOrNothing) {
  using T = TypeParam;
  std::vector<T> x(4, T(1)), w(12, T(1)), y(6, T(7));
  // n = 0: nothing written. in = 0: empty sums are zero.
  moe::kernels::gemm_small_nt<T>(x.data(), 0, 4, w.data(), 4, 4, 0, 3, y.data(), 3);
  EXPECT_EQ(y, std::vector<T>(6, T(7)));
  moe::kernels::gemm_small_nt<T>(x.data(), 2, 0, w.data(), 0, 0, 0, 3, y.data(), 3);
  EXPECT_EQ(y, std::vector<T>(6, T(0)));
}

TYPED_TEST(GemmSmallNt, SplitAcrossThreadsIsBitwiseIdentical) {
  using T = TypeParam;
  Data<T> whole({9, 129, 71, 1}, 21);
  Data<T> split({9, 129, 71, 1}, 21);
  moe::kernels::gemm_small_nt(whole.x.data(), 9, whole.ldx, whole.w.data(), 129, whole.ldw, 0, 71,
                              whole.y.data(), whole.ldy);
  moe::ThreadPool pool(2);
  for (Index parts : {2, 3, 7}) {
    pool.run(parts, [&](Index task, Index) {
      const auto [b, e] = moe::block_range(71, parts, task, moe::kernels::gemm_small_nt_out_tile);
      moe::kernels::gemm_small_nt(split.x.data(), 9, split.ldx, split.w.data(), 129, split.ldw, b,
                                  e, split.y.data(), split.ldy);
    });
    EXPECT_EQ(split.y, whole.y) << parts << " parts";
  }
  // Unaligned splits give the same bits too: each output is summed the same way in any tile.
  for (Index mid : {1, 2, 3, 5, 70}) {
    std::fill(split.y.begin(), split.y.end(), T(0));
    moe::kernels::gemm_small_nt(split.x.data(), 9, split.ldx, split.w.data(), 129, split.ldw, 0,
                                mid, split.y.data(), split.ldy);
    moe::kernels::gemm_small_nt(split.x.data(), 9, split.ldx, split.w.data(), 129, split.ldw, mid,
                                71, split.y.data(), split.ldy);
    for (Index r = 0; r < 9; ++r) {
      for (Index o = 0; o < 71; ++o) {
        ASSERT_EQ(split.y[r * split.ldy + o], whole.y[r * whole.ldy + o]) << mid;
      }
    }
  }
}

TYPED_TEST(GemmSmallNt, UnalignedPointers) {
  using T = TypeParam;
  // Offsets of one element from an aligned allocation: loads must be unaligned-safe.
  Data<T> d({5, 40, 9, 1}, 5);
  std::vector<T> x(d.x.size() + 1), w(d.w.size() + 1), y(d.y.size() + 1, T(12345));
  std::copy(d.x.begin(), d.x.end(), x.begin() + 1);
  std::copy(d.w.begin(), d.w.end(), w.begin() + 1);
  moe::kernels::gemm_small_nt(x.data() + 1, 5, d.ldx, w.data() + 1, 40, d.ldw, 0, 9, y.data() + 1,
                              d.ldy);
  moe::kernels::gemm_small_nt_scalar(d.x.data(), 5, d.ldx, d.w.data(), 40, d.ldw, 0, 9,
                                     d.y_ref.data(), d.ldy);
  std::copy(y.begin() + 1, y.end(), d.y.begin());
  expect_close(d, "unaligned");
}

}  // namespace
