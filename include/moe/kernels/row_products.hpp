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
#include <cmath>

#include "moe/tensor.hpp"

namespace moe::kernels {

/// Rows of A and columns of Y one register tile covers (R x C accumulators; each W row segment
/// is loaded once per R rows).
inline constexpr Index row_products_row_tile = 4;
inline constexpr Index row_products_col_tile = 32;
/// Depth (inner index) per pass: a K x C block of w fits L1.
inline constexpr Index row_products_depth_block = 128;

namespace detail {

/// c + a * b, rounded the same way wherever the compiler inlines or vectorises it: one fused
/// multiply-add where the target has one (measured: left to contraction, the same row came out
/// 1 ulp apart alone and inside a batch once the compiler vectorised across rows), else a
/// multiply then an add (nothing to fuse).
template <class T>
inline T madd(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return c + a * b;
#endif
}

/// y[r][c0, c0 + C) = sum_i a[r][i] w[i][c0, c0 + C) for R rows and C <= col_tile columns, the
/// inner index ascending for every element; accumulators stay in registers.
template <int R, int C, class A, class T>
inline void row_products_tile(const A* a, Index lda, Index i0, Index i1, const T* w, Index ldw,
                              Index c0, T* y, Index ldy) {
  T acc[R][C] = {};
  if (i0 > 0) {  // continue the partial sums of the earlier depth blocks (stores are exact)
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = y[r * ldy + c0 + c];
    }
  }
  for (Index i = i0; i < i1; ++i) {
    const T* __restrict wi = w + i * ldw + c0;
    for (int r = 0; r < R; ++r) {
      const T s = static_cast<T>(a[r * lda + i]);
      for (int c = 0; c < C; ++c) acc[r][c] = madd(s, wi[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) y[r * ldy + c0 + c] = acc[r][c];
  }
}

/// The last columns (fewer than col_tile) of one row, one column at a time.
template <class A, class T>
inline void row_products_edge(const A* a, Index k, const T* w, Index ldw, Index c0, Index c1,
                              T* y) {
  for (Index c = c0; c < c1; ++c) {
    T acc = 0;
    for (Index i = 0; i < k; ++i) acc = madd(static_cast<T>(a[i]), w[i * ldw + c], acc);
    y[c] = acc;
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
  constexpr Index R = row_products_row_tile, C = row_products_col_tile;
  constexpr Index K = row_products_depth_block;
  // Depth blocks, then column strips, then rows: a block of a strip of w (K x C) stays in L1 for
  // all rows. Measured with Eigen's GEMM as the yardstick: docs/scale-out.md.
  const Index full_rows = n - n % R, full_cols = m - m % C;
  for (Index i0 = 0; i0 < k || i0 == 0; i0 += K) {
    const Index i1 = std::min(k, i0 + K);
    for (Index c0 = 0; c0 < full_cols; c0 += C) {
      for (Index r = 0; r < full_rows; r += R) {
        detail::row_products_tile<R, C>(a + r * lda, lda, i0, i1, w, ldw, c0, y + r * ldy, ldy);
      }
      for (Index r = full_rows; r < n; ++r) {
        detail::row_products_tile<1, C>(a + r * lda, lda, i0, i1, w, ldw, c0, y + r * ldy, ldy);
      }
    }
    if (i1 >= k) break;
  }
  for (Index r = 0; r < n; ++r) {
    detail::row_products_edge(a + r * lda, k, w, ldw, full_cols, m, y + r * ldy);
  }
}

}  // namespace moe::kernels
