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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moe/error.hpp"
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
inline void check_finite_row(const char* format, const float* w, Index cols, Index row) {
  for (Index i = 0; i < cols; ++i) {
    if (!std::isfinite(w[i])) {
      throw value_error(moe::detail::concat("moe: cannot quantise to ", format,
                                            ": non-finite weight at row ", row, ", column ", i));
    }
  }
}
}  // namespace detail

namespace detail {

// The scale of one block of 32 weights for integer codes in [qmin, qmax], chosen for the least
// squared error (the idea of llama.cpp's make_qx_quants): for 19 trial inverse scales around
// `base` (qref / ref, ref the weight of largest magnitude, qref the code it should get), round
// to codes, take the least-squares scale sum(w q) / sum(q^2) of those codes, keep the one with
// the smallest error. Measured on Gaussian weights: 25% less squared error than the plain
// absmax scale for Q4, 8% for Q8. Returns 0 for an all-zero block.
inline float search_block_scale(const float* x, float ref, float qref, int qmin, int qmax) {
  if (ref == 0.0f) return 0.0f;
  float best_d = ref / qref;
  double best_err = -1.0;
  for (int t = -9; t <= 9; ++t) {
    const float inv = (qref + 0.1f * float(t) * (qref < 0 ? -1.0f : 1.0f)) / ref;
    double sum_wq = 0.0, sum_qq = 0.0;
    float q[32];
    for (int i = 0; i < 32; ++i) {
      q[i] = std::clamp(std::nearbyint(x[i] * inv), float(qmin), float(qmax));
      sum_wq += double(x[i]) * q[i];
      sum_qq += double(q[i]) * q[i];
    }
    if (sum_qq == 0.0) continue;
    const float d = float(sum_wq / sum_qq);
    double err = 0.0;
    for (int i = 0; i < 32; ++i) err += (double(x[i]) - double(d) * q[i]) * (double(x[i]) - double(d) * q[i]);
    if (best_err < 0.0 || err < best_err) {
      best_err = err;
      best_d = d;
    }
  }
  return best_d;
}

}  // namespace detail

/// One row of `cols` fp32 weights (a multiple of 32) -> cols / 32 Q8 blocks.
/// Scale d per block: detail::search_block_scale around max|w| / 127 (ggml's choice), rounded to
/// fp16; codes q = round(w / d) with the rounded d actually stored, clamped to [-127, 127].
/// `row` only names the row in errors. Throws value_error on a non-finite weight or a scale that
/// overflows fp16 (|w| > ~8.3e6).
inline void quantize_q8_row(const float* w, Index cols, BlockQ8* out, Index row = 0) {
  detail::check_finite_row("q8", w, cols, row);
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const std::uint16_t d16 = float_to_fp16(detail::search_block_scale(x, amax, 127.0f, -127, 127));
    const float d = fp16_to_float(d16);
    if (!std::isfinite(d)) {
      throw value_error(moe::detail::concat("moe: cannot quantise to q8: the scale of row ", row,
                                            ", block ", b, " overflows fp16 (max |w| = ", amax,
                                            ")"));
    }
    out[b].d = d16;
    for (int i = 0; i < 32; ++i) {
      const float q = d != 0.0f ? std::nearbyint(x[i] / d) : 0.0f;
      out[b].q[i] = std::int8_t(std::clamp(q, -127.0f, 127.0f));
    }
  }
}

/// One row -> cols / 32 Q4 blocks. Scale: ggml Q4_0's starting point, m = the weight of largest
/// magnitude (signed) mapped to code 0 (value -8 d, d = m / -8, using the asymmetric range
/// [-8, 7] in full), refined by detail::search_block_scale, rounded to fp16; codes
/// q = round(w / d) + 8 clamped to [0, 15]. Throws value_error like quantize_q8_row.
inline void quantize_q4_row(const float* w, Index cols, BlockQ4* out, Index row = 0) {
  detail::check_finite_row("q4", w, cols, row);
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) {
      if (std::fabs(x[i]) > std::fabs(m)) m = x[i];
    }
    const std::uint16_t d16 = float_to_fp16(detail::search_block_scale(x, m, -8.0f, -8, 7));
    const float d = fp16_to_float(d16);
    if (!std::isfinite(d)) {
      throw value_error(moe::detail::concat("moe: cannot quantise to q4: the scale of row ", row,
                                            ", block ", b, " overflows fp16 (max |w| = ",
                                            std::fabs(m), ")"));
    }
    out[b].d = d16;
    std::uint8_t code[32];
    for (int i = 0; i < 32; ++i) {
      const float q = d != 0.0f ? std::nearbyint(x[i] / d) + 8.0f : 8.0f;
      code[i] = std::uint8_t(std::clamp(q, 0.0f, 15.0f));
    }
    for (int i = 0; i < 16; ++i) out[b].q[i] = std::uint8_t(code[i] | (code[i + 16] << 4));
  }
}

/// e2m1 code nearest to v >= 0 (ties to the even code), saturating at 6.
inline unsigned e2m1_round(float v) {
  static constexpr float kValue[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  unsigned code = 0;
  for (unsigned k = 0; k < 7; ++k) {
    const float mid = 0.5f * (kValue[k] + kValue[k + 1]);
    if (v > mid || (v == mid && (k + 1) % 2 == 0)) code = k + 1;
  }
  return code;
}

/// One row -> cols / 32 Mxfp4 blocks (16 code bytes each) and cols / 32 E8M0 scales.
/// Scale 2^e: of e0, the smallest exponent with max|w| <= 6 * 2^e0 (no weight saturates), and
/// e0 - 1 (OCP's floor(log2 max) - 2 when max/2^e0 > 4: the largest weights clip to 6 * 2^e but
/// all others get twice the resolution), the one with the smaller squared error (measured on
/// Gaussian weights: 22% less than e0 alone); e is kept in [-125, 127] (bytes 2..254; all-zero
/// blocks get e = 0). Codes round w / 2^e to the nearest e2m1 value, ties to even. Throws
/// value_error on a non-finite weight.
inline void quantize_mxfp4_row(const float* w, Index cols, std::uint8_t* codes,
                               std::uint8_t* scales, Index row = 0) {
  detail::check_finite_row("mxfp4", w, cols, row);
  static constexpr float kValue[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (Index b = 0; b < cols / 32; ++b) {
    const float* x = w + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    int e = 0;
    if (amax > 0.0f) {
      int exp2 = 0;
      std::frexp(amax / 6.0f, &exp2);  // amax / 6 in [2^(exp2 - 1), 2^exp2)
      int e0 = exp2;
      if (std::ldexp(1.0f, e0 - 1) * 6.0f >= amax) e0 -= 1;  // exact power of two case
      double best = -1.0;
      for (int cand : {e0, e0 - 1}) {
        const int c = std::clamp(cand, -125, 127);
        double err = 0.0;
        for (int i = 0; i < 32; ++i) {
          const float v = std::ldexp(std::fabs(x[i]), -c);
          const double r = std::fabs(double(x[i])) - std::ldexp(double(kValue[e2m1_round(v)]), c);
          err += r * r;
        }
        if (best < 0.0 || err < best) {
          best = err;
          e = c;
        }
      }
    }
    scales[b] = std::uint8_t(e + 127);
    std::uint8_t* q = codes + b * 16;
    for (int i = 0; i < 16; ++i) {
      unsigned c[2];
      for (int h = 0; h < 2; ++h) {
        const float v = x[2 * i + h];
        const unsigned m = e2m1_round(std::ldexp(std::fabs(v), -e));
        c[h] = (v < 0.0f && m != 0) ? (m | 8u) : m;
      }
      q[i] = std::uint8_t(c[0] | (c[1] << 4));
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
