// moe: Y = X * W^T for few rows of X with bf16 weights and bf16 activations (the fast decode
// product for bf16 experts; the exact one, fp32 activations, is gemm_compact_nt).
//
// X is converted once per call to bf16 (activations_to_bf16, quant_activations.hpp); then one
// AVX-512 BF16 vdpbf16ps per 32 weights and X row. Its arithmetic, as the instruction defines it
// (Intel SDM, VDPBF16PS): lane l of 16 takes the pairs (2l, 2l + 1) of each 32-column chunk,
//   acc[l] = ftz(acc[l] + x[2l + 1] * w[2l + 1]);  acc[l] = ftz(acc[l] + x[2l] * w[2l]),
// each product exact in fp32 (8-bit significands) and each sum rounded to nearest even; bf16
// subnormal inputs read as zero and subnormal results are flushed to zero (sign kept). The
// 16 lanes are then summed as a tree (s8 = acc[l] + acc[l + 8], s4 = s8[l] + s8[l + 4],
// (s4[0] + s4[2]) + (s4[1] + s4[3])). gemv_bf16_nt_scalar computes exactly this (tested bitwise).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe/error.hpp"
#include "moe/kernels/quant_activations.hpp"
#include "moe/kernels/row_tiles.hpp"
#include "moe/tensor.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define MOE_BF16_AVX512 1
#include <immintrin.h>
#else
#define MOE_BF16_AVX512 0
#endif

namespace moe::kernels {

/// True when gemv_bf16_nt runs its AVX-512 BF16 path.
inline constexpr bool gemv_bf16_simd = MOE_BF16_AVX512 != 0;

namespace detail {

inline float bf16_bits_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_tree_sum(const float* acc) {
  float s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Denormals (inputs and results) as vdpbf16ps treats them: zero with the sign kept.
inline float bf16_flush(float f) {
  return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.0f, f) : f;
}

#if MOE_BF16_AVX512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

template <class V>
inline void bf16_keep(V& v) {
#if defined(__GNUC__)
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

inline float bf16_reduce(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55)));
}

template <int RowsW, int RowsX>
EIGEN_DONT_INLINE void gemv_bf16_tile(const std::uint16_t* __restrict xb, Index ldxb,
                                      const std::uint16_t* __restrict w, Index ldw, Index in,
                                      float* __restrict y, Index ldy) {
  __m512 acc[RowsW][RowsX];
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  const Index full = in - in % 32;
  for (Index i = 0; i < full; i += 32) {
    __m512i xv[RowsX];
    for (int r = 0; r < RowsX; ++r) {
      xv[r] = _mm512_loadu_si512(xb + r * ldxb + i);
      bf16_keep(xv[r]);
    }
    for (int j = 0; j < RowsW; ++j) {
      __m512i wv = _mm512_loadu_si512(w + j * ldw + i);
      bf16_keep(wv);
      for (int r = 0; r < RowsX; ++r) {
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], __m512bh(xv[r]), __m512bh(wv));
      }
    }
  }
  if (full < in) {
    // X is zero-padded to 32 columns; W is not: masked load.
    const __mmask32 mask = __mmask32((std::uint64_t(1) << (in - full)) - 1u);
    for (int j = 0; j < RowsW; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + j * ldw + full);
      for (int r = 0; r < RowsX; ++r) {
        const __m512i xv = _mm512_loadu_si512(xb + r * ldxb + full);
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], __m512bh(xv), __m512bh(wv));
      }
    }
  }
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) y[r * ldy + j] = bf16_reduce(acc[j][r]);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MOE_BF16_AVX512

}  // namespace detail

/// Portable version of gemv_bf16_nt (same arguments), the arithmetic of the file comment.
inline void gemv_bf16_nt_scalar(const std::uint16_t* xb, Index n, Index ldxb,
                                const std::uint16_t* w, Index in, Index ldw, Index out_begin,
                                Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && in >= 0 && 0 <= out_begin && out_begin <= out_end);
  using detail::bf16_bits_to_float;
  using detail::bf16_flush;
  for (Index o = out_begin; o < out_end; ++o) {
    for (Index r = 0; r < n; ++r) {
      float acc[16] = {};
      for (Index c = 0; c < in; c += 32) {
        for (int l = 0; l < 16; ++l) {
          for (int h = 1; h >= 0; --h) {
            const Index i = c + 2 * Index(l) + h;  // past `in`: X's zero padding, W read as zero
            const float xv = bf16_flush(bf16_bits_to_float(xb[r * ldxb + i]));
            const float wv = i < in ? bf16_flush(bf16_bits_to_float(w[o * ldw + i])) : 0.0f;
            acc[l] = bf16_flush(std::fma(xv, wv, acc[l]));
          }
        }
      }
      y[r * ldy + o] = detail::bf16_tree_sum(acc);
    }
  }
}

/// Y[r, o] = sum_i X[r, i] * W[o, i] for r < n and o in [out_begin, out_end): X as bf16 rows
/// (activations_to_bf16; row stride ldxb >= bf16_padded_cols(in), zero padding read), W bf16
/// row-major [out x in] (row stride ldw >= in), Y row-major (row stride ldy >= out_end).
/// Cost: streams W's rows once (2 bytes per weight), one vdpbf16ps per 32 weights and X row.
/// No allocation. Bit-identical to gemv_bf16_nt_scalar, independent of the range split.
inline void gemv_bf16_nt(const std::uint16_t* xb, Index n, Index ldxb, const std::uint16_t* w,
                         Index in, Index ldw, Index out_begin, Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && in >= 0 && 0 <= out_begin && out_begin <= out_end);
  MOE_ASSERT(n == 0 || (ldxb >= bf16_padded_cols(in) && ldy >= out_end && ldw >= in));
  if (n == 0 || out_begin == out_end) return;
#if MOE_BF16_AVX512
  detail::for_each_row_tile<4, 4>(
      out_begin, out_end, n, [&](Index o, Index r, auto rows_w, auto rows_x) {
        detail::gemv_bf16_tile<decltype(rows_w)::value, decltype(rows_x)::value>(
            xb + r * ldxb, ldxb, w + o * ldw, ldw, in, y + r * ldy + o, ldy);
      });
#else
  gemv_bf16_nt_scalar(xb, n, ldxb, w, in, ldw, out_begin, out_end, y, ldy);
#endif
}

}  // namespace moe::kernels
