// moe: activations quantised once per call for the fast products on compact weights.
//
// Fp32 activations stay the interface; the fast kernels of gemv_quant.hpp (int8 x Q8/Q4/Mxfp4)
// and gemv_bf16.hpp (bf16 x bf16) first convert each activation row once, here, and then every
// weight row of the product meets the converted row. What is lost is documented per format:
//
// Int8 (ActivationsI8): per block of 32 activations one fp32 scale dx = max|x| / 127 and codes
// q = round-half-even(x * (127 / max|x|)) in [-127, 127] (ggml's Q8_0 choice for activations;
// relative error per activation below 1/254 of the block's largest one). Stored with two
// helpers the integer kernels want, so that their inner step is one vpdpbusd:
//   corr[l] = -offset * (q[4l] + q[4l+1] + q[4l+2] + q[4l+3]): the kernels multiply unsigned
//     weight codes u = w / scale + offset (quant_formats.hpp) with q, and u.q + corr = w.q / scale;
//   scale16[16k + l] = dx of block 2k + l / 8: the scale of int32 lane l of 64-column chunk k.
// Columns are padded to a multiple of 64 (two blocks) with q = corr = scale16 = 0. A block with a
// non-finite activation gets dx = NaN and q = 0, so every output that reads it is NaN.
//
// Bf16 (activations_to_bf16): round to nearest even, NaN stays NaN; rows padded with zeros to a
// multiple of 32 columns.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Columns of one int8 activation chunk (two blocks of 32): the unit of the integer kernels.
inline constexpr Index quant_chunk = 64;

/// `cols` rounded up to a multiple of quant_chunk.
inline Index quant_padded_cols(Index cols) {
  return (cols + quant_chunk - 1) / quant_chunk * quant_chunk;
}

/// Int8 activations [rows x cols] (file comment), a view over caller scratch. Row r: codes
/// q + r * padded (padded bytes), corr + r * padded / 4 and scale16 + r * padded / 4.
struct ActivationsI8 {
  std::int8_t* q = nullptr;
  std::int32_t* corr = nullptr;
  float* scale16 = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index padded = 0;
};

/// Bytes of scratch make_activations_i8 needs for `rows` rows of `cols` columns (3 per padded
/// column).
inline std::size_t activations_i8_bytes(Index rows, Index cols) {
  return std::size_t(rows) * std::size_t(quant_padded_cols(cols)) * 3;
}

/// Carves an ActivationsI8 out of `scratch` (at least activations_i8_bytes(rows, cols) bytes,
/// aligned to 4; 64 makes every chunk load aligned).
inline ActivationsI8 make_activations_i8(void* scratch, Index rows, Index cols) {
  ActivationsI8 a;
  a.rows = rows;
  a.cols = cols;
  a.padded = quant_padded_cols(cols);
  auto* base = static_cast<unsigned char*>(scratch);
  const std::size_t plane = std::size_t(rows) * std::size_t(a.padded);
  a.q = reinterpret_cast<std::int8_t*>(base);
  a.corr = reinterpret_cast<std::int32_t*>(base + plane);
  a.scale16 = reinterpret_cast<float*>(base + 2 * plane);
  return a;
}

/// Quantises X (row-major [a.rows x a.cols], row stride ldx) into `a` for weights whose unsigned
/// codes have offset `offset` (quant_offset<Format>). Cost: a few passes over X, no allocation.
inline void quantize_activations_i8(const float* x, Index ldx, int offset, ActivationsI8& a) {
  const Index nb = a.cols / 32;
  MOE_ASSERT(a.cols % 32 == 0 && ldx >= a.cols);
  const Index pb = a.padded / 32;
  for (Index r = 0; r < a.rows; ++r) {
    const float* xr = x + r * ldx;
    std::int8_t* q = a.q + r * a.padded;
    std::int32_t* corr = a.corr + r * (a.padded / 4);
    float* s16 = a.scale16 + r * (a.padded / 4);
    for (Index b = 0; b < pb; ++b) {
      float dx = 0.0f;
      std::int8_t* qb = q + b * 32;
      if (b < nb) {
        const float* xb = xr + b * 32;
        float amax = 0.0f;
        bool finite = true;
        for (int i = 0; i < 32; ++i) {
          const float m = std::fabs(xb[i]);
          finite = finite && m <= std::numeric_limits<float>::max();
          amax = std::max(amax, m);
        }
        if (!finite) {
          dx = std::numeric_limits<float>::quiet_NaN();
          std::memset(qb, 0, 32);
        } else {
          dx = amax / 127.0f;
          const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
          for (int i = 0; i < 32; ++i) qb[i] = std::int8_t(std::nearbyint(xb[i] * inv));
        }
      } else {
        std::memset(qb, 0, 32);
      }
      for (int l = 0; l < 8; ++l) {
        const int sum = qb[4 * l] + qb[4 * l + 1] + qb[4 * l + 2] + qb[4 * l + 3];
        corr[b * 8 + l] = -offset * sum;
        s16[(b / 2) * 16 + (b % 2) * 8 + l] = dx;
      }
    }
  }
}

/// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16_rne(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
  return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/// `cols` rounded up to a multiple of 32: the row stride of bf16 activations.
inline Index bf16_padded_cols(Index cols) { return (cols + 31) / 32 * 32; }

/// X (row-major [rows x cols], stride ldx) -> bf16 rows of stride ld_out >= bf16_padded_cols(cols),
/// columns [cols, ld_out) set to zero.
inline void activations_to_bf16(const float* x, Index rows, Index cols, Index ldx,
                                std::uint16_t* out, Index ld_out) {
  MOE_ASSERT(ld_out >= bf16_padded_cols(cols) && ldx >= cols);
  for (Index r = 0; r < rows; ++r) {
    for (Index i = 0; i < cols; ++i) out[r * ld_out + i] = float_to_bf16_rne(x[r * ldx + i]);
    for (Index i = cols; i < ld_out; ++i) out[r * ld_out + i] = 0;
  }
}

}  // namespace moe::kernels
