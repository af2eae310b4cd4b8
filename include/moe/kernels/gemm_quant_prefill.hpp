// moe: the product on block-quantised weights for many rows of X (prefill): decode tiles of W
// rows to fp32 into caller scratch, then Eigen's fp32 GEMM, as gemm_compact_nt_prefill does for
// the other compact formats. At hundreds of rows the product is bound by arithmetic, so fp32
// activations and Eigen's blocked GEMM are the fast choice; the decode is one pass over W.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/kernels/gemv_quant.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/kernels/quant_panels.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Rows of W decoded per tile by gemm_quant_nt_prefill when the scratch allows.
inline constexpr Index gemm_quant_prefill_tile = 256;

/// Floats of scratch gemm_quant_nt_prefill wants for rows of `in` weights (one full tile).
inline Index gemm_quant_scratch_floats(Index in) { return gemm_quant_prefill_tile * in; }

/// Rows [o0, o1) of panels -> fp32, natural column order, out row-major [(o1 - o0) x cols].
/// Portable version of dequantize_panel_rows (bit-identical: every decoded weight is exact).
template <class Format>
void dequantize_panel_rows_scalar(const QuantPanels<Format>& w, Index o0, Index o1, float* out) {
  constexpr int kOffset = quant_offset<Format>;
  const Index nb = w.blocks_per_row();
  for (Index o = o0; o < o1; ++o) {
    float* row = out + (o - o0) * w.cols;
    for (Index b = 0; b < nb; ++b) {
      const float d = panel_scale(w, o, b);
      for (int e = 0; e < 32; ++e) row[b * 32 + e] = float(panel_code(w, o, b, e) - kOffset) * d;
    }
  }
}

/// Rows [o0, o1) of panels -> fp32 (natural column order), out row-major [(o1 - o0) x cols]:
/// the dequantised weights, w = (u - offset) * scale, exact. Cost: one pass over the rows' bytes,
/// about 2 vector operations and 4 stores per 16 weights (AVX-512).
template <class Format>
void dequantize_panel_rows(const QuantPanels<Format>& w, Index o0, Index o1, float* out) {
  MOE_ASSERT(0 <= o0 && o0 <= o1 && o1 <= w.rows);
#if MOE_QUANT_AVX512
  constexpr Index kB = panel_block_bytes<Format>;
  const Index nb = w.blocks_per_row();
  const __m512i offset = _mm512_set1_epi32(quant_offset<Format>);
  for (Index o = o0; o < o1; ++o) {
    float* row = out + (o - o0) * w.cols;
    for (Index c = 0; c * 16 < nb; ++c) {
      const Index m = std::min<Index>(16, nb - 16 * c);
      const __mmask16 mask16 = __mmask16((1u << m) - 1u);
      __m512i ws[8];
      detail::panel_steps<Format>(w.codes + o * nb * kB + c * 16 * kB, m, mask16, ws);
      if constexpr (std::is_same_v<Format, Q4>) {
        for (int t = 4; t < 8; ++t) ws[t] = _mm512_srli_epi16(ws[t], 4);  // 16 u -> u
      }
      const __m512 dw = detail::panel_scales<Format>(w.scales + o * nb + 16 * c, mask16);
      // Lanes 4q .. 4q + 3 of a step (blocks 16c + 4q ..) hold 16 bytes: 4 per block.
      for (int q = 0; q < 4 && 4 * q < m; ++q) {
        const __m512 dq = _mm512_permutexvar_ps(
            _mm512_set_epi32(4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 2, 4 * q + 2,
                             4 * q + 2, 4 * q + 2, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q + 1,
                             4 * q, 4 * q, 4 * q, 4 * q),
            dw);
        for (int t = 0; t < 8; ++t) {
          __m128i bytes;
          switch (q) {
            case 0: bytes = _mm512_extracti32x4_epi32(ws[t], 0); break;
            case 1: bytes = _mm512_extracti32x4_epi32(ws[t], 1); break;
            case 2: bytes = _mm512_extracti32x4_epi32(ws[t], 2); break;
            default: bytes = _mm512_extracti32x4_epi32(ws[t], 3); break;
          }
          const __m512 v = _mm512_mul_ps(
              _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), offset)), dq);
          // Four elements 4t .. 4t + 3 of each of the four blocks.
          for (int k = 0; k < 4 && 4 * q + k < m; ++k) {
            float* dst = row + (16 * c + 4 * q + k) * 32 + 4 * t;
            switch (k) {
              case 0: _mm_storeu_ps(dst, _mm512_extractf32x4_ps(v, 0)); break;
              case 1: _mm_storeu_ps(dst, _mm512_extractf32x4_ps(v, 1)); break;
              case 2: _mm_storeu_ps(dst, _mm512_extractf32x4_ps(v, 2)); break;
              default: _mm_storeu_ps(dst, _mm512_extractf32x4_ps(v, 3)); break;
            }
          }
        }
      }
    }
  }
#else
  dequantize_panel_rows_scalar(w, o0, o1, out);
#endif
}

namespace detail {

template <class Matrix, class Decode>
void gemm_quant_prefill_impl(const float* x, Index n, Index ldx, const Matrix& w, Index out_begin,
                             Index out_end, float* y, Index ldy, float* scratch,
                             Index scratch_floats, Decode&& decode) {
  const Index in = w.cols;
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  MOE_ASSERT(scratch_floats >= std::max<Index>(in, 1));
  if (n == 0 || out_begin == out_end) return;
  const Index tile = std::min(gemm_quant_prefill_tile, scratch_floats / std::max<Index>(in, 1));
  using Strided = Eigen::Map<const RowMatrix<float>, 0, Eigen::OuterStride<>>;
  using MutStrided = Eigen::Map<RowMatrix<float>, 0, Eigen::OuterStride<>>;
  const Strided xm(x, n, in, Eigen::OuterStride<>(ldx));
  for (Index o = out_begin; o < out_end; o += tile) {
    const Index rows = std::min(tile, out_end - o);
    decode(w, o, o + rows, scratch);
    const ConstMap<float> wm(scratch, rows, in);
    MutStrided ym(y + o, n, rows, Eigen::OuterStride<>(ldy));
    ym.noalias() = xm * wm.transpose();
  }
}

}  // namespace detail

/// Y[r, o] = sum_i X[r, i] * W[o, i] for r < n, o in [out_begin, out_end), W in panels: decodes
/// tiles of up to scratch_floats / in rows (at most gemm_quant_prefill_tile) into `scratch` and
/// multiplies with Eigen's fp32 GEMM. X row-major [n x in] (row stride ldx), Y row-major (row
/// stride ldy >= out_end). scratch_floats >= in. Results differ from the fp32 product on the
/// dequantised weights only by Eigen's summation order. Eigen may allocate its packing buffers.
template <class Format>
void gemm_quant_nt_prefill(const float* x, Index n, Index ldx, const QuantPanels<Format>& w,
                           Index out_begin, Index out_end, float* y, Index ldy, float* scratch,
                           Index scratch_floats) {
  detail::gemm_quant_prefill_impl(x, n, ldx, w, out_begin, out_end, y, ldy, scratch,
                                  scratch_floats, [](const QuantPanels<Format>& m, Index a,
                                                     Index b, float* out) {
                                    dequantize_panel_rows(m, a, b, out);
                                  });
}

/// The same on a matrix in its stored layout (the exact mode's storage): dequantize_stored_rows tiles.
template <class View, class = std::enable_if_t<!std::is_same_v<View, QuantPanels<Q8>> &&
                                                !std::is_same_v<View, QuantPanels<Q4>> &&
                                                !std::is_same_v<View, QuantPanels<Mxfp4>>>>
void gemm_quant_nt_prefill(const float* x, Index n, Index ldx, const View& w, Index out_begin,
                           Index out_end, float* y, Index ldy, float* scratch,
                           Index scratch_floats) {
  detail::gemm_quant_prefill_impl(
      x, n, ldx, w, out_begin, out_end, y, ldy, scratch, scratch_floats,
      [](const View& m, Index a, Index b, float* out) {
        if constexpr (std::is_same_v<View, Q8View>) dequantize_stored_rows<Q8>(m, a, b, out);
        if constexpr (std::is_same_v<View, Q4View>) dequantize_stored_rows<Q4>(m, a, b, out);
        if constexpr (std::is_same_v<View, Mxfp4View>) dequantize_stored_rows<Mxfp4>(m, a, b, out);
      });
}

}  // namespace moe::kernels
