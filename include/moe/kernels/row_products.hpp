// moe: Y = A * W row by row, with every row's result independent of the other rows.
//
// Eigen's GEMM rounds a row differently depending on where it sits in the batch (its register
// tiles and remainder paths sum the inner dimension in different orders), so a product over one
// rank's slice of a batch does not give the bits of the same rows inside the whole batch. The
// backward's input-gradient products that must match across slicings (router logits -> x; the
// shared expert while the batch is small) use this kernel instead: each output element is summed
// over the inner index in ascending order by the same code, whatever the number of rows.
#pragma once

#include <algorithm>

#include "moe/tensor.hpp"

namespace moe::kernels {

/// Rows of A processed together (each W row is read once per tile) and columns per block (a
/// tile's output block stays in L1 while W streams).
inline constexpr Index row_products_row_tile = 4;
inline constexpr Index row_products_col_block = 256;

namespace detail {

/// y[r][c0, c1) = sum_i a[r][i] w[i][c0, c1) for R rows; the inner index ascends for every row.
template <int R, class A, class T>
inline void row_products_tile(const A* a, Index lda, Index k, const T* w, Index ldw, Index c0,
                              Index c1, T* y, Index ldy) {
  T* __restrict yr[R];
  for (int r = 0; r < R; ++r) {
    yr[r] = y + r * ldy;
    std::fill(yr[r] + c0, yr[r] + c1, T(0));
  }
  for (Index i = 0; i < k; ++i) {
    const T* __restrict wi = w + i * ldw;
    for (int r = 0; r < R; ++r) {
      const T s = static_cast<T>(a[r * lda + i]);
      T* __restrict out = yr[r];
      for (Index c = c0; c < c1; ++c) out[c] += s * wi[c];
    }
  }
}

}  // namespace detail

/// Y = A * W: a [n x k] (row stride lda, scalar A, converted to T per value), w [k x m] row-major
/// (row stride ldw), y [n x m] (row stride ldy), overwritten. Row r of y depends only on row r of
/// a and on w: bitwise the same for any n and any position of the row (the property Eigen's GEMM
/// lacks). Cost n k m multiply-adds; w is read once per row_products_row_tile rows. Allocates
/// nothing; y must not alias a or w.
template <class A, class T>
void rows_times_matrix(const A* a, Index n, Index k, Index lda, const T* w, Index m, Index ldw,
                       T* y, Index ldy) {
  constexpr Index tile = row_products_row_tile;
  for (Index c0 = 0; c0 < m; c0 += row_products_col_block) {
    const Index c1 = std::min(m, c0 + row_products_col_block);
    Index r = 0;
    for (; r + tile <= n; r += tile) {
      detail::row_products_tile<tile>(a + r * lda, lda, k, w, ldw, c0, c1, y + r * ldy, ldy);
    }
    for (; r < n; ++r) {
      detail::row_products_tile<1>(a + r * lda, lda, k, w, ldw, c0, c1, y + r * ldy, ldy);
    }
  }
}

}  // namespace moe::kernels
