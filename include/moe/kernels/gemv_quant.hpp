// moe: Y = X * W^T for few rows of X and W in a block-quantised format (Q8, Q4, Mxfp4;
// quant_formats.hpp): the decode products, bound by the bytes of W.
//
// Two modes, each with an AVX-512 path and a portable path that gives the same bits; the exact
// mode is in gemv_quant_exact.hpp.
//
// Fast (gemv_quant_nt): W in the panel layout (quant_panels.hpp), X quantised once per call to
// int8 per block of 32 (ActivationsI8, quant_activations.hpp). Per super-chunk of 16 blocks
// (512 columns), eight vpdpbusd per (W row, X row) leave in int32 lane l the exact sum
//   p[l] = corr[b] + sum_{e < 32} u(b, e) * q(b, e)  (= w.q / scale),  b = 16c + l,
// (whatever the ISA: integer sums are exact), then lane by lane, super-chunk after super-chunk,
//   acc[l] = fma(dw[b] * dx[b], float(p[l]), acc[l]),
// dw the weight block's scale (fp16 for Q8/Q4, 2^(s - 128) for Mxfp4's doubled codes), dx the
// activation block's; padding blocks (b >= cols / 32) have p = 0 and dw * dx = 0. The 16 lanes
// are then summed as a tree: s8[l] = acc[l] + acc[l + 8], s4[l] = s8[l] + s8[l + 4],
// (s4[0] + s4[2]) + (s4[1] + s4[3]). No vpdpbssd (signed x signed) is needed: the offset makes
// the weight operand unsigned and corr takes it out again.
//
// Tiles of 4 W rows in flight (several independent weight streams per thread) times up to 2 X
// rows; more X rows are taken in groups, re-reading the tile's W rows from cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moe/error.hpp"
#include "moe/kernels/quant_activations.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/kernels/quant_panels.hpp"
#include "moe/kernels/row_tiles.hpp"
#include "moe/tensor.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define MOE_QUANT_AVX512 1
#include <immintrin.h>
#else
#define MOE_QUANT_AVX512 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define MOE_QUANT_UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define MOE_QUANT_UNROLL _Pragma("unroll")
#else
#define MOE_QUANT_UNROLL
#endif

namespace moe::kernels {

/// True when gemv_quant_nt and gemv_quant_nt_exact run their AVX-512 (VNNI) paths.
inline constexpr bool gemv_quant_simd = MOE_QUANT_AVX512 != 0;

/// Rows of W one register tile covers: start parallel [out_begin, out_end) ranges on multiples.
inline constexpr Index gemv_quant_out_tile = 4;
/// Rows of X one register tile of the fast kernel covers (4 W x 2 X rows: 8 accumulators, the
/// 8 step vectors and temporaries fit the 32 registers; 4 x 4 spilled).
inline constexpr int gemv_quant_row_tile = 2;

namespace detail {

inline float quant_tree_sum(const float* acc) {
  float s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if MOE_QUANT_AVX512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Keeps a value in a register: GCC 12 otherwise folds loads into every use (see gemm_small.hpp).
template <class V>
inline void quant_keep(V& v) {
#if defined(__GNUC__)
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

inline float quant_reduce(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55)));
}

// Step vectors of super-chunk c of a panel row: ws[t] holds weights 4t..4t+3 of its m blocks
// (lanes past m zero), as unsigned codes, except Q4's high steps t >= 4, which hold 16 u (the
// high nibble left in place: one operation instead of two; the kernel divides their sums by 16).
// mask: the m dwords of each 64-byte step.
template <class Format>
inline void panel_steps(const std::uint8_t* chunk, Index m, __mmask16 mask, __m512i* ws) {
  if constexpr (std::is_same_v<Format, Q8>) {
    for (int t = 0; t < 8; ++t) ws[t] = _mm512_maskz_loadu_epi32(mask, chunk + t * 4 * m);
  } else if constexpr (std::is_same_v<Format, Q4>) {
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_maskz_loadu_epi32(mask, chunk + g * 4 * m);
      ws[g] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
      ws[g + 4] = _mm512_and_si512(v, _mm512_set1_epi8(char(0xF0)));
    }
  } else {
    // e2m1 code -> 2 * value + 12 by a table lookup on the nibble.
#if defined(__AVX512VBMI__)
    // vpermb reads 6 index bits: a 64-entry table that ignores bits 4-5 needs no masking, and
    // after a 16-bit shift by 4 the high nibble is in bits 0-3 with only table-ignored bits above.
    const __m512i lut = _mm512_broadcast_i32x4(
        _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_maskz_loadu_epi32(mask, chunk + g * 4 * m);
      ws[g] = _mm512_permutexvar_epi8(v, lut);
      ws[g + 4] = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
    }
#else
    const __m512i lut = _mm512_broadcast_i32x4(
        _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_maskz_loadu_epi32(mask, chunk + g * 4 * m);
      ws[g] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low));
      ws[g + 4] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
#endif
    // Padding lanes read code 0 (u = 12) but meet x = 0: p stays 0 there, as in the scalar path.
  }
}

// The 16 block scales of a super-chunk (lanes past m zero).
template <class Format>
inline __m512 panel_scales(const panel_scale_t<Format>* s, __mmask16 mask) {
  if constexpr (std::is_same_v<Format, Mxfp4>) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, s));
    return _mm512_maskz_scalef_ps(mask, _mm512_set1_ps(1.0f),
                                  _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(128))));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, s));
  }
}

// Fast mode: Y[r, j] for RowsX rows of `a` from row r0 and RowsW panel rows of W from o0.
template <class Format, int RowsW, int RowsX>
EIGEN_DONT_INLINE void gemv_quant_tile(const ActivationsI8& a, Index r0,
                                       const QuantPanels<Format>& w, Index o0,
                                       float* __restrict y, Index ldy) {
  constexpr Index kB = panel_block_bytes<Format>;
  const Index nb = w.blocks_per_row();
  const Index pb = a.padded_blocks;
  const std::uint8_t* wrow = w.codes + o0 * nb * kB;
  const panel_scale_t<Format>* srow = w.scales + o0 * nb;
  const std::int8_t* xq[RowsX];
  const std::int32_t* corr[RowsX];
  const float* sx[RowsX];
  for (int r = 0; r < RowsX; ++r) {
    const Index row = a.row(r0 + r);
    xq[r] = a.q + row * 32 * pb;
    corr[r] = a.corr + row * pb;
    sx[r] = a.scale + row * pb;
  }
  __m512 acc[RowsW][RowsX];
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  for (Index c = 0; c * 16 < nb; ++c) {
    const Index m = std::min<Index>(16, nb - 16 * c);
    const __mmask16 mask16 = __mmask16((1u << m) - 1u);
    // Fully unrolled (GCC 12 otherwise keeps a loop over j and the accumulators in memory).
    MOE_QUANT_UNROLL
    for (int j = 0; j < RowsW; ++j) {
      __m512i ws[8];
      panel_steps<Format>(wrow + j * nb * kB + c * 16 * kB, m, mask16, ws);
      for (int t = 0; t < 8; ++t) quant_keep(ws[t]);
      const __m512 dw = panel_scales<Format>(srow + j * nb + 16 * c, mask16);
      MOE_QUANT_UNROLL
      for (int r = 0; r < RowsX; ++r) {
        const std::int8_t* xs = xq[r] + c * 512;
        // Two chains of four vpdpbusd (latency), joined by an exact integer add.
        __m512i p0 = _mm512_loadu_si512(corr[r] + 16 * c);
        __m512i p1 = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          p0 = _mm512_dpbusd_epi32(p0, ws[t], _mm512_loadu_si512(xs + 64 * t));
          p1 = _mm512_dpbusd_epi32(p1, ws[t + 4], _mm512_loadu_si512(xs + 64 * (t + 4)));
        }
        if constexpr (std::is_same_v<Format, Q4>) p1 = _mm512_srai_epi32(p1, 4);  // exact: 16 | p1
        const __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(sx[r] + 16 * c));
        acc[j][r] =
            _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) y[r * ldy + j] = quant_reduce(acc[j][r]);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MOE_QUANT_AVX512

}  // namespace detail

/// Portable version of gemv_quant_nt (same arguments): the lane order of the file comment in
/// scalar code, bit-identical to the AVX-512 path.
template <class Format>
void gemv_quant_nt_scalar(const ActivationsI8& a, const QuantPanels<Format>& w, Index out_begin,
                          Index out_end, float* y, Index ldy) {
  MOE_ASSERT(a.cols == w.cols && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  const Index nb = w.blocks_per_row();
  const Index pb = a.padded_blocks;
  for (Index o = out_begin; o < out_end; ++o) {
    for (Index r = 0; r < a.rows; ++r) {
      const Index row = a.row(r);
      const std::int8_t* xq = a.q + row * 32 * pb;
      float acc[16] = {};
      for (Index b = 0; b < (nb + 15) / 16 * 16; ++b) {
        std::int32_t p = 0;
        float s = 0.0f;
        if (b < nb) {
          p = a.corr[row * pb + b];
          for (int e = 0; e < 32; ++e) {
            p += panel_code(w, o, b, e) * std::int32_t(xq[activation_offset(b, e)]);
          }
          s = panel_scale(w, o, b) * a.scale[row * pb + b];
        }
        acc[b % 16] = std::fma(s, float(p), acc[b % 16]);
      }
      y[r * ldy + o] = detail::quant_tree_sum(acc);
    }
  }
}

/// Y[r, o] = sum_i X[r, i] * W[o, i] for the a.rows rows of X (row r: stored row a.row(r)),
/// quantised to int8 by
/// quantize_activations_i8 (with offset quant_offset<Format>), and o in [out_begin, out_end).
/// W: panels [out x in] (pack_panels), in = a.cols; Y row-major, row stride ldy >= out_end; other
/// columns of Y untouched.
///
/// Cost: streams W's rows [out_begin, out_end) once (32 + 2, 16 + 2 or 16 + 1 bytes per 32
/// weights) and does eight vpdpbusd per 512 weights and X row. No allocation. Bit-identical to
/// gemv_quant_nt_scalar and independent of the [out_begin, out_end) split (start ranges on
/// multiples of gemv_quant_out_tile for speed); tasks may write disjoint column ranges of one Y.
template <class Format>
void gemv_quant_nt(const ActivationsI8& a, const QuantPanels<Format>& w, Index out_begin,
                   Index out_end, float* y, Index ldy) {
  MOE_ASSERT(a.cols == w.cols && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  MOE_ASSERT(a.rows == 0 || ldy >= out_end);
  if (a.rows == 0 || out_begin == out_end) return;
#if MOE_QUANT_AVX512
  detail::for_each_row_tile<4, gemv_quant_row_tile>(
      out_begin, out_end, a.rows, [&](Index o, Index r, auto rows_w, auto rows_x) {
        detail::gemv_quant_tile<Format, decltype(rows_w)::value, decltype(rows_x)::value>(
            a, r, w, o, y + r * ldy + o, ldy);
      });
#else
  gemv_quant_nt_scalar<Format>(a, w, out_begin, out_end, y, ldy);
#endif
}

}  // namespace moe::kernels
