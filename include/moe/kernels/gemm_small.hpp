// moe: the small-batch product Y = X * W^T for experts that received few rows.
//
// With n (rows of X) small, the product is bound by reading W from memory: Eigen's and BLAS's GEMM
// pack W on every call, which costs as much as the product itself (docs/benchmarks.md). These kernels
// instead stream every row of W once and, while it is in registers, take its dot product with all
// n rows of X (a multi-row GEMV).
#pragma once

#include <algorithm>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Rows at or below which a product runs on a streaming kernel (gemm_small_nt, gemm_compact_nt:
/// each weight is read once for all rows) rather than through a GEMM that packs (fp32) or first
/// decodes (compact) the weights: the one "few rows" threshold of the library. Measured on Zen 5
/// with the Mixtral-quarter and OLMoE shapes (benchmarks/moe_bench.cpp, kind `sparse`; and
/// benchmarks/compact_bench.cpp): see docs/benchmarks.md. Override with -DMOE_SMALL_BATCH_ROWS=n.
#ifndef MOE_SMALL_BATCH_ROWS
#define MOE_SMALL_BATCH_ROWS 16
#endif
inline constexpr Index small_batch_rows = MOE_SMALL_BATCH_ROWS;

/// Rows of W (columns of Y) one register tile covers. Give parallel tasks [out_begin, out_end)
/// blocks that start on a multiple of this (see moe::block_range) so that only the last block has
/// a partial tile.
inline constexpr Index gemm_small_nt_out_tile = 4;

/// Rows of X one register tile covers; n above this is processed in groups of this many rows,
/// re-reading the tile's W rows from L1/L2 (not from DRAM) for each further group.
inline constexpr Index gemm_small_nt_row_tile = 4;

namespace detail {

// GCC 12 reports the deliberately undefined upper half in its own _mm512_extractf64x4_pd (used by
// Eigen's AVX-512 predux) as uninitialized once inlined here; the value is never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Without this GCC 12 folds the loads into the FMAs as memory operands, loading each X (or W)
// packet once per FMA instead of once per step (20 loads per 16 FMAs in a 4 x 4 tile instead of
// 8): load-bound at half the speed clang reaches with the same source.
template <class Packet>
inline void keep_in_register(Packet& p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(p));
#else
  (void)p;
#endif
}

// Y[r0 + r, o0 + j] = X[r0 + r, :] . W[o0 + j, :] for r < RowsX, j < RowsW: RowsW x RowsX packet
// accumulators, one load per W row and per X row per step, RowsW * RowsX FMAs per step.
// Not inlined: inlined into a larger loop nest, GCC 12 keeps the accumulator array in memory and
// stores it on every step (half the speed); as a function of its own the array lives in registers.
template <class T, int RowsW, int RowsX>
EIGEN_DONT_INLINE void gemm_small_nt_tile(const T* __restrict x, Index ldx, const T* __restrict w,
                                          Index in, Index ldw, T* __restrict y, Index ldy) {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr Index kLanes = Eigen::internal::packet_traits<T>::size;
  Packet acc[RowsW][RowsX];
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) acc[j][r] = Eigen::internal::pset1<Packet>(T(0));
  }
  const Index in_vec = in - in % kLanes;
  for (Index i = 0; i < in_vec; i += kLanes) {
    Packet xv[RowsX];
    for (int r = 0; r < RowsX; ++r) {
      xv[r] = Eigen::internal::ploadu<Packet>(x + r * ldx + i);
      keep_in_register(xv[r]);
    }
    for (int j = 0; j < RowsW; ++j) {
      Packet wv = Eigen::internal::ploadu<Packet>(w + j * ldw + i);
      keep_in_register(wv);
      for (int r = 0; r < RowsX; ++r) acc[j][r] = Eigen::internal::pmadd(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) {
      T sum = Eigen::internal::predux(acc[j][r]);
      for (Index i = in_vec; i < in; ++i) sum += x[r * ldx + i] * w[j * ldw + i];
      y[r * ldy + j] = sum;
    }
  }
}

// All n rows of X against RowsW rows of W, in groups of gemm_small_nt_row_tile rows.
template <class T, int RowsW>
inline void gemm_small_nt_rows(const T* __restrict x, Index n, Index ldx, const T* __restrict w,
                               Index in, Index ldw, T* __restrict y, Index ldy) {
  constexpr Index kRowTile = gemm_small_nt_row_tile;
  Index r = 0;
  for (; r + kRowTile <= n; r += kRowTile) {
    gemm_small_nt_tile<T, RowsW, kRowTile>(x + r * ldx, ldx, w, in, ldw, y + r * ldy, ldy);
  }
  switch (n - r) {
    case 3:
      gemm_small_nt_tile<T, RowsW, 3>(x + r * ldx, ldx, w, in, ldw, y + r * ldy, ldy);
      break;
    case 2:
      gemm_small_nt_tile<T, RowsW, 2>(x + r * ldx, ldx, w, in, ldw, y + r * ldy, ldy);
      break;
    case 1:
      gemm_small_nt_tile<T, RowsW, 1>(x + r * ldx, ldx, w, in, ldw, y + r * ldy, ldy);
      break;
    default:
      break;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail

/// Y[r, o] = sum_i X[r, i] * W[o, i] for r in [0, n) and o in [out_begin, out_end): the columns
/// [out_begin, out_end) of Y = X * W^T. Other columns of Y are not touched.
///
/// Layout: X row-major [n x in] with row stride ldx >= in; W row-major [out x in] (the nn.Linear
/// layout) with row stride ldw >= in, of which rows [out_begin, out_end) are read; Y row-major with
/// row stride ldy >= out_end. X, W and Y must not overlap. No alignment is required.
///
/// Cost: reads each of the (out_end - out_begin) rows of W once from memory, whatever n, and does
/// 2 * n * in FLOPs per row; meant for n up to about 16, beyond which a blocked GEMM (Eigen) is
/// faster. Vectorised with Eigen's packets of the compiled ISA (AVX-512: 16 floats).
///
/// Threading: none inside. Tasks that call it on disjoint [out_begin, out_end) ranges of the same
/// Y may run concurrently; start the ranges on multiples of gemm_small_nt_out_tile.
/// The summation order differs from gemm_small_nt_scalar (lanes, then a horizontal reduction) but
/// is fixed: results do not depend on the range split or on the number of threads.
template <class T>
void gemm_small_nt(const T* __restrict x, Index n, Index ldx, const T* __restrict w, Index in,
                   Index ldw, Index out_begin, Index out_end, T* __restrict y, Index ldy) {
  MOE_ASSERT(n >= 0 && in >= 0 && 0 <= out_begin && out_begin <= out_end);
  MOE_ASSERT(n == 0 || (ldx >= in && ldy >= out_end));
  MOE_ASSERT(ldw >= in);
  if (n == 0) return;
  constexpr Index kOutTile = gemm_small_nt_out_tile;
  Index o = out_begin;
  for (; o + kOutTile <= out_end; o += kOutTile) {
    detail::gemm_small_nt_rows<T, kOutTile>(x, n, ldx, w + o * ldw, in, ldw, y + o, ldy);
  }
  for (; o < out_end; ++o) {
    detail::gemm_small_nt_rows<T, 1>(x, n, ldx, w + o * ldw, in, ldw, y + o, ldy);
  }
}

/// Portable scalar version of gemm_small_nt (same arguments and layout), summing i in order. The
/// reference the optimised kernel is tested against; slow.
template <class T>
void gemm_small_nt_scalar(const T* x, Index n, Index ldx, const T* w, Index in, Index ldw,
                          Index out_begin, Index out_end, T* y, Index ldy) {
  MOE_ASSERT(n >= 0 && in >= 0 && 0 <= out_begin && out_begin <= out_end);
  for (Index r = 0; r < n; ++r) {
    for (Index o = out_begin; o < out_end; ++o) {
      T sum = T(0);
      for (Index i = 0; i < in; ++i) sum += x[r * ldx + i] * w[o * ldw + i];
      y[r * ldy + o] = sum;
    }
  }
}

}  // namespace moe::kernels
