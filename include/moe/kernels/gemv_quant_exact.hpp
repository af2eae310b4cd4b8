// moe: the exact mode of the products on block-quantised weights (gemv_quant.hpp has the fast
// one): W in its stored layout (QuantView: ggml Q8_0 / Q4_0 blocks, gpt-oss MXFP4 blocks and
// scales), X in fp32, each weight decoded in registers to (u - offset) * dw, exact in fp32, and
// lane l of 16 accumulating fma(w[i], x[i], acc[l]) over i = l, l + 16, l + 32, ..., then the
// tree sum of gemv_quant.hpp: the order of gemm_small_nt, which the fp32 block runs, so (in being
// a multiple of 16) the result is bitwise the fp32 product on the dequantised weights
// (dequantize_row). An AVX-512 path and a portable one with the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "moe/error.hpp"
#include "moe/kernels/gemv_quant.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

namespace detail {

#if MOE_QUANT_AVX512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// [a x 8, b x 8] from two fp16 scales (b = 0 when only one block).
inline __m512 quant_fp16_pair(std::uint16_t a, std::uint16_t b) {
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(int(std::uint32_t(a) | (std::uint32_t(b) << 16))));
  return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                               _mm512_zextps128_ps512(f));
}

/// Loads chunk k (blocks 2k and, when kTwo, 2k + 1) of W row o: 64 unsigned codes in column order
/// and the lane scales [dw(2k) x 8, dw(2k + 1) x 8] (0 for a missing block).
template <class Format>
struct QuantSimd;

template <>
struct QuantSimd<Q8> {
  template <bool kTwo>
  static void load(const Q8View& w, Index o, Index k, __m512i& u, __m512& dw) {
    const BlockQ8* b = w.blocks + o * w.blocks_per_row() + 2 * k;
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[0].q));
    const __m256i hi =
        kTwo ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[1].q)) : _mm256_setzero_si256();
    u = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
                         _mm512_set1_epi8(char(0x80)));
    dw = quant_fp16_pair(b[0].d, kTwo ? b[1].d : std::uint16_t(0));
  }
};

template <>
struct QuantSimd<Q4> {
  template <bool kTwo>
  static void load(const Q4View& w, Index o, Index k, __m512i& u, __m512& dw) {
    const BlockQ4* b = w.blocks + o * w.blocks_per_row() + 2 * k;
    const __m256i lo =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[0].q)));
    const __m256i hi = kTwo ? _mm256_broadcastsi128_si256(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[1].q)))
                            : _mm256_setzero_si256();
    // [q0, q0, q1, q1]: the second copy of each block shifted down to its high nibbles.
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    z = _mm512_mask_srli_epi16(z, __mmask32(0xFF00FF00u), z, 4);
    u = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
    dw = quant_fp16_pair(b[0].d, kTwo ? b[1].d : std::uint16_t(0));
  }
};

template <>
struct QuantSimd<Mxfp4> {
  template <bool kTwo>
  static void load(const Mxfp4View& w, Index o, Index k, __m512i& u, __m512& dw) {
    const Index blk = o * w.blocks_per_row() + 2 * k;
    const std::uint8_t* c = w.codes + blk * 16;
    const __m256i raw = kTwo ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c))
                             : _mm256_zextsi128_si256(
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    // Byte b -> the two bytes (b & 15, b >> 4): column order (even element in the low nibble).
    const __m512i v = _mm512_cvtepu8_epi16(raw);
    const __m512i nib =
        _mm512_and_si512(_mm512_or_si512(v, _mm512_slli_epi16(v, 4)), _mm512_set1_epi16(0x0F0F));
    // e2m1 code -> 2 * value + 12.
    const __m512i lut = _mm512_broadcast_i32x4(
        _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    u = _mm512_shuffle_epi8(lut, nib);
    const std::uint32_t s =
        std::uint32_t(w.scales[blk]) | (kTwo ? std::uint32_t(w.scales[blk + 1]) << 8 : 0u);
    const __m512i e = _mm512_permutexvar_epi32(
        _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_cvtepu8_epi32(_mm_cvtsi32_si128(int(s))));
    // 2^(s - 128), exact (subnormal for s < 2); 0 for the missing block.
    dw = _mm512_maskz_scalef_ps(kTwo ? __mmask16(0xFFFF) : __mmask16(0x00FF), _mm512_set1_ps(1.0f),
                                _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(128))));
  }
};

// Exact mode: Y[r, j] for RowsX rows of fp32 X (stride ldx) and RowsW rows of W from o0.
template <class Format, int RowsW, int RowsX>
EIGEN_DONT_INLINE void gemv_quant_exact_tile(const float* __restrict x, Index ldx,
                                             const QuantView<Format>& w, Index o0,
                                             float* __restrict y, Index ldy) {
  using Simd = QuantSimd<Format>;
  const Index nb = w.blocks_per_row();
  const Index full = nb / 2;
  const __m512i offset = _mm512_set1_epi32(quant_offset<Format>);
  __m512 acc[RowsW][RowsX];
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  // Quarter q (16 columns) of chunk k: decode, then one fma per X row.
  auto quarter = [&](Index k, int q, const __m512i* u, const __m512* dw) {
    __m512 xv[RowsX];
    for (int r = 0; r < RowsX; ++r) {
      xv[r] = _mm512_loadu_ps(x + r * ldx + 64 * k + 16 * q);
      quant_keep(xv[r]);
    }
    for (int j = 0; j < RowsW; ++j) {
      __m128i cq;
      switch (q) {
        case 0: cq = _mm512_extracti32x4_epi32(u[j], 0); break;
        case 1: cq = _mm512_extracti32x4_epi32(u[j], 1); break;
        case 2: cq = _mm512_extracti32x4_epi32(u[j], 2); break;
        default: cq = _mm512_extracti32x4_epi32(u[j], 3); break;
      }
      const __m512 d = q < 2 ? _mm512_shuffle_f32x4(dw[j], dw[j], 0x00)
                             : _mm512_shuffle_f32x4(dw[j], dw[j], 0xFF);
      __m512 wv = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(cq), offset)), d);
      quant_keep(wv);
      for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_fmadd_ps(wv, xv[r], acc[j][r]);
    }
  };
  for (Index k = 0; k < full; ++k) {
    __m512i u[RowsW];
    __m512 dw[RowsW];
    for (int j = 0; j < RowsW; ++j) Simd::template load<true>(w, o0 + j, k, u[j], dw[j]);
    quarter(k, 0, u, dw);
    quarter(k, 1, u, dw);
    quarter(k, 2, u, dw);
    quarter(k, 3, u, dw);
  }
  if (nb % 2) {
    __m512i u[RowsW];
    __m512 dw[RowsW];
    for (int j = 0; j < RowsW; ++j) Simd::template load<false>(w, o0 + j, full, u[j], dw[j]);
    quarter(full, 0, u, dw);
    quarter(full, 1, u, dw);
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

/// Portable version of gemv_quant_nt_exact (same arguments), bit-identical to it.
template <class Format>
void gemv_quant_nt_exact_scalar(const float* x, Index n, Index ldx, const QuantView<Format>& w,
                                Index out_begin, Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  constexpr int kOffset = quant_offset<Format>;
  for (Index o = out_begin; o < out_end; ++o) {
    for (Index r = 0; r < n; ++r) {
      float acc[16] = {};
      for (Index c = 0; c < w.cols; c += 16) {
        const float dw = quant_scale(w, o, c / 32);
        for (int l = 0; l < 16; ++l) {
          const float wv = float(quant_code(w, o, c + l) - kOffset) * dw;
          acc[l] = std::fma(wv, x[r * ldx + c + l], acc[l]);
        }
      }
      y[r * ldy + o] = detail::quant_tree_sum(acc);
    }
  }
}

/// The exact mode (file comment): Y[r, o] = sum_i X[r, i] * W[o, i] with X fp32 row-major
/// [n x in] (row stride ldx >= in), W dequantised in registers; bitwise equal to
/// gemm_small_nt(X, dequantised W) and to gemv_quant_nt_exact_scalar. Cost: streams W once;
/// about 5 vector operations per 16 weights of decode, then one fma per X row. No allocation.
template <class Format>
void gemv_quant_nt_exact(const float* x, Index n, Index ldx, const QuantView<Format>& w,
                         Index out_begin, Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  MOE_ASSERT(n == 0 || (ldx >= w.cols && ldy >= out_end));
  if (n == 0 || out_begin == out_end) return;
#if MOE_QUANT_AVX512
  detail::for_each_row_tile<4, 4>(
      out_begin, out_end, n, [&](Index o, Index r, auto rows_w, auto rows_x) {
        detail::gemv_quant_exact_tile<Format, decltype(rows_w)::value, decltype(rows_x)::value>(
            x + r * ldx, ldx, w, o, y + r * ldy + o, ldy);
      });
#else
  gemv_quant_nt_exact_scalar<Format>(x, n, ldx, w, out_begin, out_end, y, ldy);
#endif
}

/// Rows [o0, o1) of a stored-layout matrix -> fp32 (the dequantised weights, exact), out
/// row-major [(o1 - o0) x cols]; same values as dequantize_row. Cost: one pass over the rows'
/// bytes, about 4 vector operations per 16 weights (AVX-512).
template <class Format>
void dequantize_stored_rows(const QuantView<Format>& w, Index o0, Index o1, float* out) {
  MOE_ASSERT(0 <= o0 && o0 <= o1 && o1 <= w.rows);
#if MOE_QUANT_AVX512
  using Simd = detail::QuantSimd<Format>;
  const Index nb = w.blocks_per_row();
  const __m512i offset = _mm512_set1_epi32(quant_offset<Format>);
  auto store = [&](float* dst, const __m512i& u, const __m512& dw, int quarters) {
    for (int q = 0; q < quarters; ++q) {
      __m128i cq;
      switch (q) {
        case 0: cq = _mm512_extracti32x4_epi32(u, 0); break;
        case 1: cq = _mm512_extracti32x4_epi32(u, 1); break;
        case 2: cq = _mm512_extracti32x4_epi32(u, 2); break;
        default: cq = _mm512_extracti32x4_epi32(u, 3); break;
      }
      const __m512 d = q < 2 ? _mm512_shuffle_f32x4(dw, dw, 0x00) : _mm512_shuffle_f32x4(dw, dw, 0xFF);
      _mm512_storeu_ps(dst + 16 * q,
                       _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(cq), offset)), d));
    }
  };
  for (Index o = o0; o < o1; ++o) {
    float* row = out + (o - o0) * w.cols;
    for (Index k = 0; k < nb / 2; ++k) {
      __m512i u;
      __m512 dw;
      Simd::template load<true>(w, o, k, u, dw);
      store(row + 64 * k, u, dw, 4);
    }
    if (nb % 2) {
      __m512i u;
      __m512 dw;
      Simd::template load<false>(w, o, nb / 2, u, dw);
      store(row + 64 * (nb / 2), u, dw, 2);
    }
  }
#else
  for (Index o = o0; o < o1; ++o) dequantize_row(w, o, out + (o - o0) * w.cols);
#endif
}

}  // namespace moe::kernels
