// moe: block-quantised weight formats (Q8, Q4, Mxfp4): byte layouts, views, quantisation from
// fp32 and dequantisation. The products on them are in moe/kernels/gemv_quant.hpp.
//
// All three cut a weight row [in] into blocks of 32 consecutive weights along the input dimension,
// each with one scale, so a block of 32 activations meets exactly one weight scale:
//   Q8    ggml Q8_0 bytes: {fp16 d; int8 q[32]} (34 bytes), w = q * d.            8.5 bits/weight
//   Q4    ggml Q4_0 bytes: {fp16 d; uint8 q[16]} (18 bytes), element i in the low nibble of byte
//         i and element i + 16 in the high nibble, w = (q - 8) * d.                4.5 bits/weight
//   Mxfp4 OCP microscaling FP4 as gpt-oss stores it: `*_blocks` [rows x in/32 x 16] bytes, element
//         2i in the low nibble of byte i and 2i + 1 in the high nibble, e2m1 codes (1 sign, 2
//         exponent, 1 mantissa bit: +-{0, .5, 1, 1.5, 2, 3, 4, 6}), and `*_scales` [rows x in/32]
//         E8M0 bytes s, w = e2m1(code) * 2^(s - 127).                                4.25 bits/weight
// Every decoded weight is exact in fp32 (an fp16 times an integer below 2^8, or a power of two
// times a 3-bit significand), so "the dequantised matrix" is one well-defined fp32 matrix.
//
// Kernels see a weight row through its "unsigned codes" u in [0, 255] and an offset: w =
// (u - offset) * scale, with u = q + 128 for Q8, the nibble for Q4 (offset 8) and 2 * e2m1 + 12
// for Mxfp4 (offset 12, scale 2^(s - 128)). quant_code() gives u for the portable paths.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moe/error.hpp"
#include "moe/kernels/quant_block_search.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Weights in ggml's Q8_0 layout (tag of the format; byte layout kernels::BlockQ8).
struct Q8 {
  static constexpr const char* name = "q8";
};
/// Weights in ggml's Q4_0 layout (tag of the format; byte layout kernels::BlockQ4).
struct Q4 {
  static constexpr const char* name = "q4";
};
/// OCP MXFP4 weights, gpt-oss's split blocks/scales layout (tag of the format).
struct Mxfp4 {
  static constexpr const char* name = "mxfp4";
};

namespace kernels {

/// Weights per scale block of every format here.
inline constexpr Index quant_block = 32;

/// ggml block_q8_0: fp16 scale d, then 32 int8 codes; w[i] = q[i] * d.
struct BlockQ8 {
  std::uint16_t d;
  std::int8_t q[32];
};
/// ggml block_q4_0: fp16 scale d, then 16 bytes; w[i] = ((q[i] & 15) - 8) * d and
/// w[i + 16] = ((q[i] >> 4) - 8) * d for i < 16.
struct BlockQ4 {
  std::uint16_t d;
  std::uint8_t q[16];
};
static_assert(sizeof(BlockQ8) == 34 && sizeof(BlockQ4) == 18, "ggml block sizes");

/// A Q8 matrix [rows x cols], cols a multiple of 32: row o is blocks[o * cols / 32, ...].
/// Non-owning, trivially copyable; the blocks must outlive the view.
struct Q8View {
  const BlockQ8* blocks = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index blocks_per_row() const { return cols / quant_block; }
  /// Bytes of codes and scales (what a product reads).
  std::size_t bytes() const { return std::size_t(rows * blocks_per_row()) * sizeof(BlockQ8); }
};
/// A Q4 matrix [rows x cols] (same conventions as Q8View).
struct Q4View {
  const BlockQ4* blocks = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index blocks_per_row() const { return cols / quant_block; }
  std::size_t bytes() const { return std::size_t(rows * blocks_per_row()) * sizeof(BlockQ4); }
};
/// An Mxfp4 matrix [rows x cols] as gpt-oss stores it: codes [rows x cols/32 x 16] bytes (two
/// e2m1 codes per byte, the even element in the low nibble) and scales [rows x cols/32] E8M0
/// bytes. Scale byte 0xFF (NaN in E8M0) is refused by check_mxfp4_scales.
struct Mxfp4View {
  const std::uint8_t* codes = nullptr;
  const std::uint8_t* scales = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index blocks_per_row() const { return cols / quant_block; }
  std::size_t bytes() const { return std::size_t(rows * blocks_per_row()) * 17; }
};

/// Offsets of the unsigned codes (file comment): w = (u - offset) * scale.
template <class Format>
inline constexpr int quant_offset = 0;
template <>
inline constexpr int quant_offset<Q8> = 128;
template <>
inline constexpr int quant_offset<Q4> = 8;
template <>
inline constexpr int quant_offset<Mxfp4> = 12;

/// The view type of a format.
template <class Format>
struct QuantViewOf;
template <>
struct QuantViewOf<Q8> {
  using type = Q8View;
};
template <>
struct QuantViewOf<Q4> {
  using type = Q4View;
};
template <>
struct QuantViewOf<Mxfp4> {
  using type = Mxfp4View;
};
template <class Format>
using QuantView = typename QuantViewOf<Format>::type;

// ---- scalar conversions ----

/// IEEE binary16 bits -> float (exact; NaN payloads kept). The same value as vcvtph2ps.
inline float fp16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    const float v = float(mant) * 0x1p-24f;  // zero or subnormal: exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// float -> IEEE binary16 bits, round to nearest even; overflow gives infinity, NaN a quiet NaN.
inline std::uint16_t float_to_fp16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint16_t sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65536: inf
  if (ax < 0x38800000u) {
    // Below 2^-14: a subnormal half, units of 2^-24. |f| * 2^24 < 2^10 rounds once (RNE) in the
    // conversion to int, which is exact for the multiplied float.
    const float scaled = std::fabs(f) * 0x1p24f;
    return std::uint16_t(sign | std::uint16_t(std::nearbyint(scaled)));
  }
  // Normal: drop 13 mantissa bits with round to nearest even (a carry may bump the exponent).
  const std::uint32_t rebased = ax - (112u << 23);
  const std::uint32_t lsb = (rebased >> 13) & 1u;
  return std::uint16_t(sign | ((rebased + 0xfffu + lsb) >> 13));
}

/// e2m1 code (4 bits) -> twice its value, a signed integer in [-12, 12].
inline int e2m1_doubled(unsigned code) {
  static constexpr int kMagnitude[8] = {0, 1, 2, 3, 4, 6, 8, 12};
  const int m = kMagnitude[code & 7u];
  return (code & 8u) ? -m : m;
}

/// 2^(s - 128) for an E8M0 byte s in [0, 254]: the scale of Mxfp4's doubled codes (exact).
inline float e8m0_half_scale(std::uint8_t s) { return std::ldexp(1.0f, int(s) - 128); }

/// Unsigned code u of weight (o, i) (file comment) and the block scale it is multiplied with.
inline int quant_code(const Q8View& w, Index o, Index i) {
  return int(w.blocks[o * w.blocks_per_row() + i / 32].q[i % 32]) + 128;
}
inline int quant_code(const Q4View& w, Index o, Index i) {
  const std::uint8_t b = w.blocks[o * w.blocks_per_row() + i / 32].q[i % 16];
  return (i % 32) < 16 ? (b & 15) : (b >> 4);
}
inline int quant_code(const Mxfp4View& w, Index o, Index i) {
  const std::uint8_t b = w.codes[(o * w.blocks_per_row() + i / 32) * 16 + (i % 32) / 2];
  return e2m1_doubled((i % 2) ? unsigned(b >> 4) : unsigned(b & 15)) + 12;
}
inline float quant_scale(const Q8View& w, Index o, Index b) {
  return fp16_to_float(w.blocks[o * w.blocks_per_row() + b].d);
}
inline float quant_scale(const Q4View& w, Index o, Index b) {
  return fp16_to_float(w.blocks[o * w.blocks_per_row() + b].d);
}
inline float quant_scale(const Mxfp4View& w, Index o, Index b) {
  return e8m0_half_scale(w.scales[o * w.blocks_per_row() + b]);
}

/// Throws shape_error unless `cols` is a positive multiple of 32 (the block of every format).
inline void check_quant_cols(const char* format, const char* what, Index cols) {
  if (cols <= 0 || cols % quant_block != 0) {
    throw shape_error(moe::detail::concat("moe: ", format, " ", what, " has ", cols,
                                     " columns, expected a positive multiple of 32"));
  }
}

/// Throws value_error at the first E8M0 scale byte 0xFF (NaN) of an Mxfp4 matrix.
inline void check_mxfp4_scales(const Mxfp4View& w, const char* what) {
  const Index nb = w.blocks_per_row();
  for (Index k = 0; k < w.rows * nb; ++k) {
    if (w.scales[k] == 0xff) {
      throw value_error(moe::detail::concat("moe: mxfp4 ", what, " has a NaN scale (0xFF) at row ",
                                       k / nb, ", block ", k % nb));
    }
  }
}

// ---- quantisation from fp32 (at construction; round to nearest even everywhere) ----

namespace detail {
// Throws value_error naming the first non-finite weight of a row. The common case (all finite)
// is one vectorised pass: an and-reduction of |w| <= FLT_MAX.
inline void check_finite_row(const char* format, const float* w, Index cols, Index row) {
  int all_finite = 1;
  for (Index i = 0; i < cols; ++i) all_finite &= int(std::fabs(w[i]) <= FLT_MAX);
  if (all_finite) return;
  for (Index i = 0; i < cols; ++i) {
    if (!std::isfinite(w[i])) {
      throw value_error(moe::detail::concat("moe: cannot quantise to ", format,
                                            ": non-finite weight at row ", row, ", column ", i));
    }
  }
}

// Integer codes of lanes [0, n) (quant_block_search.hpp's transposed layout) for the stored
// scales d: qt = clamp(round(w / d), qmin, qmax), 0 where d = 0.
inline void lane_codes(const float* xt, int n, const float* d, float qmin, float qmax, float* qt) {
  float divisor[kSearchLanes], keep[kSearchLanes];
  for (int l = 0; l < n; ++l) {
    divisor[l] = d[l] != 0.0f ? d[l] : 1.0f;
    keep[l] = d[l] != 0.0f ? 1.0f : 0.0f;
  }
  for (int l = 0; l < n; ++l) {
#pragma GCC unroll 32
    for (int i = 0; i < 32; ++i) {
      float q = std::nearbyint(xt[i * kSearchLanes + l] / divisor[l]) * keep[l];
      q = q < qmin ? qmin : q;
      qt[i * kSearchLanes + l] = q > qmax ? qmax : q;
    }
  }
}

// The fp16 scales of n lanes (rounded from d, which then holds the rounded values), or
// value_error when one overflows fp16 (row, block b0 + l and its max |w| named).
inline void store_fp16_scales(const char* format, float* d, const float* max_abs, int n,
                              Index row, Index b0, std::uint16_t* d16) {
  for (int l = 0; l < n; ++l) {
    d16[l] = float_to_fp16(d[l]);
    d[l] = fp16_to_float(d16[l]);
    if (!std::isfinite(d[l])) {
      throw value_error(moe::detail::concat("moe: cannot quantise to ", format,
                                            ": the scale of row ", row, ", block ", b0 + l,
                                            " overflows fp16 (max |w| = ", max_abs[l], ")"));
    }
  }
}
}  // namespace detail

/// One row of `cols` fp32 weights (a multiple of 32) -> cols / 32 Q8 blocks.
/// Scale d per block: detail::search_lane_scales around max|w| / 127 (ggml's choice), rounded to
/// fp16; codes q = round(w / d) with the rounded d actually stored, clamped to [-127, 127].
/// `row` only names the row in errors. Throws value_error on a non-finite weight or a scale that
/// overflows fp16 (|w| > ~8.3e6). Cost: about 7 ns per weight (quant_block_search.hpp).
inline void quantize_q8_row(const float* w, Index cols, BlockQ8* out, Index row = 0) {
  detail::check_finite_row("q8", w, cols, row);
  constexpr int L = detail::kSearchLanes;
  float xt[32 * L], qt[32 * L], amax[L], d[L];
  std::uint16_t d16[L];
  for (Index b0 = 0; b0 < cols / 32; b0 += L) {
    const int n = int(std::min<Index>(L, cols / 32 - b0));
    detail::transpose_blocks(w + b0 * 32, n, xt);
    detail::lane_max_magnitude(xt, n, amax);
    detail::search_lane_scales(xt, n, amax, 127.0f, -127, 127, d);
    detail::store_fp16_scales("q8", d, amax, n, row, b0, d16);
    detail::lane_codes(xt, n, d, -127.0f, 127.0f, qt);
    for (int l = 0; l < n; ++l) {
      out[b0 + l].d = d16[l];
      for (int i = 0; i < 32; ++i) out[b0 + l].q[i] = std::int8_t(qt[i * L + l]);
    }
  }
}

/// One row -> cols / 32 Q4 blocks. Scale: ggml Q4_0's starting point, m = the weight of largest
/// magnitude (signed) mapped to code 0 (value -8 d, d = m / -8, using the asymmetric range
/// [-8, 7] in full), refined by detail::search_lane_scales, rounded to fp16; codes
/// q = round(w / d) + 8 clamped to [0, 15]. Throws value_error like quantize_q8_row.
inline void quantize_q4_row(const float* w, Index cols, BlockQ4* out, Index row = 0) {
  detail::check_finite_row("q4", w, cols, row);
  constexpr int L = detail::kSearchLanes;
  float xt[32 * L], qt[32 * L], m[L], amax[L], d[L];
  std::uint16_t d16[L];
  for (Index b0 = 0; b0 < cols / 32; b0 += L) {
    const int n = int(std::min<Index>(L, cols / 32 - b0));
    detail::transpose_blocks(w + b0 * 32, n, xt);
    detail::lane_signed_max(xt, n, m);
    for (int l = 0; l < n; ++l) amax[l] = std::fabs(m[l]);
    detail::search_lane_scales(xt, n, m, -8.0f, -8, 7, d);
    detail::store_fp16_scales("q4", d, amax, n, row, b0, d16);
    detail::lane_codes(xt, n, d, -8.0f, 7.0f, qt);
    for (int l = 0; l < n; ++l) {
      out[b0 + l].d = d16[l];
      for (int i = 0; i < 16; ++i) {
        out[b0 + l].q[i] =
            std::uint8_t((int(qt[i * L + l]) + 8) | ((int(qt[(i + 16) * L + l]) + 8) << 4));
      }
    }
  }
}

/// e2m1 code nearest to v >= 0 (ties to the even code), saturating at 6.
inline unsigned e2m1_round(float v) { return detail::e2m1_code_steps(v); }

/// One row -> cols / 32 Mxfp4 blocks (16 code bytes each) and cols / 32 E8M0 scales.
/// Scale 2^e: of e0, the smallest exponent with max|w| <= 6 * 2^e0 (no weight saturates), and
/// e0 - 1 (OCP's floor(log2 max) - 2 when max/2^e0 > 4: the largest weights clip to 6 * 2^e but
/// all others get twice the resolution), the one with the smaller squared error (measured on
/// Gaussian weights: 22% less than e0 alone; detail::search_lane_exponents); e is kept in
/// [-125, 127] (bytes 2..254; all-zero blocks get e = 0). Codes round w / 2^e to the nearest
/// e2m1 value, ties to even. Throws value_error on a non-finite weight.
inline void quantize_mxfp4_row(const float* w, Index cols, std::uint8_t* codes,
                               std::uint8_t* scales, Index row = 0) {
  detail::check_finite_row("mxfp4", w, cols, row);
  constexpr int L = detail::kSearchLanes;
  float xt[32 * L], down[L];
  int e[L];
  std::uint8_t ct[32 * L];
  for (Index b0 = 0; b0 < cols / 32; b0 += L) {
    const int n = int(std::min<Index>(L, cols / 32 - b0));
    detail::transpose_blocks(w + b0 * 32, n, xt);
    detail::search_lane_exponents(xt, n, e);
    for (int l = 0; l < n; ++l) down[l] = std::ldexp(1.0f, -e[l]);
    for (int l = 0; l < n; ++l) {
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) {
        const float x = xt[i * L + l];
        const unsigned m = detail::e2m1_code_steps(std::fabs(x) * down[l]);
        ct[i * L + l] = std::uint8_t((x < 0.0f && m != 0) ? (m | 8u) : m);
      }
    }
    for (int l = 0; l < n; ++l) {
      scales[b0 + l] = std::uint8_t(e[l] + 127);
      std::uint8_t* q = codes + (b0 + l) * 16;
      for (int i = 0; i < 16; ++i) {
        q[i] = std::uint8_t(ct[2 * i * L + l] | (ct[(2 * i + 1) * L + l] << 4));
      }
    }
  }
}

/// Row o of a quantised matrix -> fp32 (exact, see the file comment): out[i] = (u - offset) *
/// scale, so Mxfp4's negative-zero code decodes to +0 as in the kernels.
template <class View>
void dequantize_row(const View& w, Index o, float* out) {
  constexpr int kOffset = std::is_same_v<View, Q8View>   ? 128
                          : std::is_same_v<View, Q4View> ? 8
                                                         : 12;
  for (Index i = 0; i < w.cols; ++i) {
    out[i] = float(quant_code(w, o, i) - kOffset) * quant_scale(w, o, i / 32);
  }
}

}  // namespace kernels
}  // namespace moe
