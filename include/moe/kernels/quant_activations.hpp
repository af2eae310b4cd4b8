// moe: activations quantised once per call for the fast products on compact weights.
//
// Fp32 activations stay the interface; the fast kernels of gemv_quant.hpp (int8 x Q8/Q4/Mxfp4)
// and gemv_bf16.hpp (bf16 x bf16) first convert each activation row once, here, and then every
// weight row of the product meets the converted row. What is lost is documented per format:
//
// Int8 (ActivationsI8): per block of 32 activations one fp32 scale dx = max|x| / 127 and codes
// q = round-half-even(x * (127 / max|x|)) in [-127, 127] (ggml's Q8_0 choice for activations;
// error per activation at most dx / 2). Stored in the step order of the weight panels
// (quant_panels.hpp), 16 blocks (a super-chunk, 512 columns) at a time: element e of block b at
//   (b / 16) * 512 + (e / 4) * 64 + 4 (b % 16) + e % 4,
// with, per block, corr[b] = -offset * sum_e q[e] (the kernels multiply unsigned weight codes
// u = w / scale + offset with q, and u.q + corr = w.q / scale) and scale[b] = dx. Blocks are
// padded to a multiple of 16 with q = corr = scale = 0. A block with a non-finite activation gets
// dx = NaN and q = 0, so every output that reads it is NaN.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moe::kernels {

/// Blocks of 32 activations padded to a multiple of 16 (one super-chunk = 512 columns).
inline Index quant_padded_blocks(Index cols) { return (cols / 32 + 15) / 16 * 16; }

/// Int8 activations [rows x cols] (file comment), a view over caller scratch. Stored row s:
/// codes q + s * 32 * padded_blocks, corr + s * padded_blocks, scale + s * padded_blocks.
/// Products read row r from stored row row(r): r itself, or row_index[r] when set (the rows of
/// one expert picked out of the quantised tokens, without a copy).
struct ActivationsI8 {
  std::int8_t* q = nullptr;
  std::int32_t* corr = nullptr;
  float* scale = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index padded_blocks = 0;
  const Index* row_index = nullptr;
  Index row(Index r) const { return row_index ? row_index[r] : r; }
};

/// The rows row_index[0 .. n) of `a` as an ActivationsI8 of n rows (no copy).
inline ActivationsI8 select_rows(const ActivationsI8& a, const Index* row_index, Index n) {
  MOE_ASSERT(a.row_index == nullptr);
  ActivationsI8 s = a;
  s.rows = n;
  s.row_index = row_index;
  return s;
}

/// Bytes of scratch make_activations_i8 needs for `rows` rows of `cols` columns (40 per padded
/// block of 32 columns).
inline std::size_t activations_i8_bytes(Index rows, Index cols) {
  return std::size_t(rows) * std::size_t(quant_padded_blocks(cols)) * 40;
}

/// Carves an ActivationsI8 out of `scratch` (at least activations_i8_bytes(rows, cols) bytes,
/// aligned to 4; 64 makes every step load aligned).
inline ActivationsI8 make_activations_i8(void* scratch, Index rows, Index cols) {
  ActivationsI8 a;
  a.rows = rows;
  a.cols = cols;
  a.padded_blocks = quant_padded_blocks(cols);
  auto* base = static_cast<unsigned char*>(scratch);
  const std::size_t blocks = std::size_t(rows) * std::size_t(a.padded_blocks);
  a.q = reinterpret_cast<std::int8_t*>(base);
  a.corr = reinterpret_cast<std::int32_t*>(base + 32 * blocks);
  a.scale = reinterpret_cast<float*>(base + 36 * blocks);
  return a;
}

/// Offset of element e (< 32) of block b in a row of ActivationsI8::q.
inline Index activation_offset(Index b, Index e) {
  return (b / 16) * 512 + (e / 4) * 64 + 4 * (b % 16) + e % 4;
}

namespace detail {

// Codes and scale of one block of 32 activations (file comment); returns dx.
inline float quantize_block_i8_scalar(const float* xb, std::int8_t* code) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < 32; ++i) {
    const float m = std::fabs(xb[i]);
    finite = finite && m <= std::numeric_limits<float>::max();
    amax = std::max(amax, m);
  }
  if (!finite) {
    std::memset(code, 0, 32);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int i = 0; i < 32; ++i) code[i] = std::int8_t(std::nearbyint(xb[i] * inv));
  return amax / 127.0f;
}

#if defined(__AVX512F__)
// The same with AVX-512, storing straight into the step order (dst: lane b % 16 of step 0; step t
// at dst + 64 t) and returning the code sum in *sum (bit-identical: the same products, rounded to
// nearest even by the conversion in the default rounding mode, as nearbyint does).
inline float quantize_block_i8_simd(const float* xb, std::int8_t* dst, int* sum) {
  const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
  const __m512 a0 = _mm512_abs_ps(x0), a1 = _mm512_abs_ps(x1);
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  const __mmask16 ok0 = _mm512_cmp_ps_mask(a0, big, _CMP_LE_OQ);
  const __mmask16 ok1 = _mm512_cmp_ps_mask(a1, big, _CMP_LE_OQ);
  const __m256i steps = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);  // dwords
  if ((ok0 & ok1) != 0xFFFF) {
    _mm256_i32scatter_epi32(dst, steps, _mm256_setzero_si256(), 4);
    *sum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  const __m256i codes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q0)),
                                                _mm512_cvtepi32_epi8(q1), 1);
  _mm256_i32scatter_epi32(dst, steps, codes, 4);
  return amax / 127.0f;
}
#endif

// Blocks [b0, b1) of every row (b1 == padded_blocks also writes the padding blocks).
template <bool kSimd>
void quantize_activations_i8_impl(const float* x, Index ldx, int offset, const ActivationsI8& a,
                                  Index b0, Index b1) {
  MOE_ASSERT(a.cols % 32 == 0 && ldx >= a.cols && a.row_index == nullptr);
  const Index nb = a.cols / 32;
  for (Index r = 0; r < a.rows; ++r) {
    const float* xr = x + r * ldx;
    std::int8_t* q = a.q + r * 32 * a.padded_blocks;
    std::int32_t* corr = a.corr + r * a.padded_blocks;
    float* scale = a.scale + r * a.padded_blocks;
    for (Index b = b0; b < b1; ++b) {
      // Step order: the 4-byte group t of the block goes to step t, lane b % 16.
      std::int8_t* dst = q + (b / 16) * 512 + 4 * (b % 16);
      float dx = 0.0f;
      int sum = 0;
#if defined(__AVX512F__)
      if (kSimd && b < nb) {
        dx = quantize_block_i8_simd(xr + b * 32, dst, &sum);
        corr[b] = -offset * sum;
        scale[b] = dx;
        continue;
      }
#endif
      std::int8_t code[32] = {};
      if (b < nb) dx = quantize_block_i8_scalar(xr + b * 32, code);
      for (int t = 0; t < 8; ++t) {
        const Index q = 4 * Index(t);
        std::memcpy(dst + 64 * Index(t), code + q, 4);
        sum += code[q] + code[q + 1] + code[q + 2] + code[q + 3];
      }
      corr[b] = -offset * sum;
      scale[b] = dx;
    }
  }
}

}  // namespace detail

/// Quantises X (row-major [a.rows x a.cols], row stride ldx, cols a multiple of 32) into `a` for
/// weights whose unsigned codes have offset `offset` (quant_offset<Format>). Cost: about 25
/// vector operations per 32 activations (AVX-512), no allocation.
inline void quantize_activations_i8(const float* x, Index ldx, int offset, const ActivationsI8& a) {
  detail::quantize_activations_i8_impl<true>(x, ldx, offset, a, 0, a.padded_blocks);
}

/// Portable version of quantize_activations_i8 (bit-identical).
inline void quantize_activations_i8_scalar(const float* x, Index ldx, int offset,
                                           const ActivationsI8& a) {
  detail::quantize_activations_i8_impl<false>(x, ldx, offset, a, 0, a.padded_blocks);
}

/// quantize_activations_i8 restricted to columns [col_begin, col_end) (multiples of 32; the end
/// may be cols): those blocks of every row, plus the padding blocks when col_end == cols. Tasks
/// may quantise disjoint column ranges of one ActivationsI8 concurrently.
inline void quantize_activations_i8_cols(const float* x, Index ldx, int offset,
                                         const ActivationsI8& a, Index col_begin, Index col_end) {
  MOE_ASSERT(col_begin % 32 == 0 && (col_end % 32 == 0 || col_end == a.cols));
  const Index b1 = col_end >= a.cols ? a.padded_blocks : col_end / 32;
  detail::quantize_activations_i8_impl<true>(x, ldx, offset, a, col_begin / 32, b1);
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
