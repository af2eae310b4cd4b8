// moe: the tile walk of the streaming decode kernels (gemv_bf16, gemv_quant, gemv_quant_exact):
// weight rows in tiles of RowsW then one at a time, and under each, the X rows in groups of
// MaxRowsX then the remainder. The register tiles (the inner loops) stay in each kernel; only this
// outer walk is shared, as templates that inline into the kernel's loop (no indirect calls).
#pragma once

#include <type_traits>

#include "moe/tensor.hpp"

namespace moe::kernels::detail {

/// Calls tile(r, rows) over all n X rows: groups of MaxRows rows from r = 0, then the remainder
/// (3, 2 or 1 rows) in one call; rows is a std::integral_constant<int, R>.
template <int MaxRows, class Tile>
inline void for_each_x_rows(Index n, Tile&& tile) {
  static_assert(MaxRows >= 1 && MaxRows <= 4, "moe: row groups of 1 to 4 X rows");
  Index r = 0;
  for (; r + MaxRows <= n; r += MaxRows) tile(r, std::integral_constant<int, MaxRows>{});
  const Index rest = n - r;
  if constexpr (MaxRows > 3) {
    if (rest == 3) tile(r, std::integral_constant<int, 3>{});
  }
  if constexpr (MaxRows > 2) {
    if (rest == 2) tile(r, std::integral_constant<int, 2>{});
  }
  if (rest == 1) tile(r, std::integral_constant<int, 1>{});
}

/// Calls tile(o, r, rows_w, rows_x) for every register tile of the product: weight rows
/// [out_begin, out_end) in tiles of RowsW rows, the last (out_end - out_begin) % RowsW one at a
/// time, and for each the n X rows as for_each_x_rows<MaxRowsX>; rows_w and rows_x are
/// std::integral_constant<int, R> (compile-time tile sizes).
template <int RowsW, int MaxRowsX, class Tile>
inline void for_each_row_tile(Index out_begin, Index out_end, Index n, Tile&& tile) {
  // Two loops with precomputed bounds: GCC 12 misreads "for (; o < out_end; ++o)" after the tiled
  // loop as overflowing (-Waggressive-loop-optimizations) when the sizes are constants.
  const Index tiled_end = out_begin + (out_end - out_begin) / RowsW * RowsW;
  for (Index o = out_begin; o < tiled_end; o += RowsW) {
    for_each_x_rows<MaxRowsX>(
        n, [&](Index r, auto rows_x) { tile(o, r, std::integral_constant<int, RowsW>{}, rows_x); });
  }
  for (Index o = tiled_end; o < out_end; ++o) {
    for_each_x_rows<MaxRowsX>(
        n, [&](Index r, auto rows_x) { tile(o, r, std::integral_constant<int, 1>{}, rows_x); });
  }
}

}  // namespace moe::kernels::detail
