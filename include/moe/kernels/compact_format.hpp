// moe: the compact weight formats (bf16, int8 with per-row scales, fp8 e4m3 with block scales):
// their tags, the decode of one code, and CompactView, the plain view every compact kernel reads.
//
// Decode is bandwidth bound (docs/compact.md): bytes per weight set the speed. The router, the
// routing weights, activations and accumulation stay fp32; only the expert weights are compact.
// A new format is a tag here (code_type, name, decode) plus its kernels; storage
// (moe/experts/compact_matrix.hpp) and the block take it from there.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moe/error.hpp"
#include "moe/kernels/float_formats.hpp"
#include "moe/tensor.hpp"

namespace moe {

namespace kernels::detail {

/// e4m3 code -> float for all 256 codes (exact; 0x7f / 0xff are NaN). Built once.
inline const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[std::size_t(c)] = e4m3_to_float(std::uint8_t(c));
    return t;
  }();
  return table;
}

}  // namespace kernels::detail

/// bfloat16 weights: the top half of an fp32 (1 sign, 8 exponent, 7 mantissa bits), quantised
/// with round to nearest even (NaN stays NaN). 2 bytes per weight, no scales. Checkpoint dtype
/// "BF16" (Mixtral, Qwen, OLMoE) is this layout.
struct Bf16 {
  using code_type = std::uint16_t;
  static constexpr const char* name = "bf16";
  /// The fp32 value of a code (exact; bf16 has no scale, `s` is ignored).
  static float decode(code_type code, float s) {
    (void)s;
    return kernels::bf16_to_float(code);
  }
};

/// Symmetric int8 weights with one fp32 scale per output row: w[o, i] = scale[o] * q[o, i],
/// q in [-127, 127], scale[o] = max_i |w[o, i]| / 127 (0 for an all-zero row). 1 byte per weight
/// plus 4 bytes per row.
struct Int8 {
  using code_type = std::int8_t;
  static constexpr const char* name = "int8";
  /// float(q) * s (one rounding).
  static float decode(code_type code, float s) { return float(code) * s; }
};

/// OCP FP8 E4M3 ("e4m3fn", torch.float8_e4m3fn, DeepSeek-V3): 1 sign, 4 exponent (bias 7),
/// 3 mantissa bits; largest finite 448, smallest subnormal 2^-9, no infinity, NaN 0x7f / 0xff.
/// One fp32 scale per block of [block_rows x block_cols] weights (DeepSeek-V3 weight_scale_inv:
/// 128 x 128, grid [ceil(rows / 128) x ceil(cols / 128)], row-major): w = fp8 * scale. A single
/// block covering the matrix is the per-tensor case. 1 byte per weight plus 4 per block.
struct Fp8E4M3 {
  using code_type = std::uint8_t;
  static constexpr const char* name = "fp8";
  /// e4m3_to_float(code) * s (exact decode, one rounding).
  static float decode(code_type code, float s) { return kernels::detail::e4m3_table()[code] * s; }
};

/// Side of DeepSeek-V3's square fp8 scale blocks.
inline constexpr Index fp8_block = 128;

namespace kernels {

/// A compact weight matrix as the kernels see it: [rows x cols] in nn.Linear orientation
/// [out x in], row-major codes with row stride cols. Plain data, passed by value; whoever made it
/// (CompactMatrix::kernel_view) keeps the arrays alive.
///
/// Scales: Bf16 none; Int8 scales[o], one per row; Fp8E4M3 a row-major grid
/// [ceil(rows / block_rows) x ceil(cols / block_cols)], the scale of w[o, i] being
/// scales[(o / block_rows) * grid_cols() + (i >> block_cols_shift)]. kernel_scales: Fp8E4M3 with
/// `simple` only, the grid times 2^8 (the SIMD decode's exponent rebias folded in; exact).
/// simple: no NaN code and every |scale| below 2^100 (always true for other formats).
template <class Format>
struct CompactView {
  using code_type = typename Format::code_type;
  const code_type* codes = nullptr;
  const float* scales = nullptr;
  const float* kernel_scales = nullptr;
  Index rows = 0, cols = 0;
  Index block_rows = 0, block_cols = 0;
  int block_cols_shift = 0;
  bool simple = true;

  Index grid_cols() const { return block_cols > 0 ? (cols + block_cols - 1) / block_cols : 0; }
  /// Scale of weight (o, i) (1 for Bf16).
  float scale(Index o, Index i) const {
    if constexpr (std::is_same_v<Format, Int8>) {
      (void)i;
      return scales[o];
    } else if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      return scales[(o / block_rows) * grid_cols() + i / block_cols];
    } else {
      (void)o, (void)i;
      return 1.0f;
    }
  }
};

/// out [row_end - row_begin x cols] row-major (row stride cols) = the fp32 weights of rows
/// [row_begin, row_end) of w. Cost: one pass over the rows' codes (auto-vectorised for bf16 and
/// int8, a 1 KiB table lookup for fp8). No allocation.
template <class Format>
void dequantize_rows(CompactView<Format> w, Index row_begin, Index row_end, float* out) {
  using Code = typename Format::code_type;
  MOE_ASSERT(0 <= row_begin && row_begin <= row_end && row_end <= w.rows);
  const Index c = w.cols;
  for (Index o = row_begin; o < row_end; ++o) {
    const Code* q = w.codes + o * c;
    float* dst = out + (o - row_begin) * c;
    if constexpr (std::is_same_v<Format, Bf16>) {
      for (Index i = 0; i < c; ++i) {
        const std::uint32_t u = std::uint32_t(q[i]) << 16;
        std::memcpy(dst + i, &u, sizeof u);
      }
    } else if constexpr (std::is_same_v<Format, Int8>) {
      const float s = w.scales[o];
      for (Index i = 0; i < c; ++i) dst[i] = float(q[i]) * s;
    } else {
      const float* table = detail::e4m3_table().data();
      const float* srow = w.scales + (o / w.block_rows) * w.grid_cols();
      for (Index b = 0; b * w.block_cols < c; ++b) {
        const float s = srow[b];
        const Index end = std::min(c, (b + 1) * w.block_cols);
        for (Index i = b * w.block_cols; i < end; ++i) dst[i] = table[q[i]] * s;
      }
    }
  }
}

}  // namespace kernels
}  // namespace moe
