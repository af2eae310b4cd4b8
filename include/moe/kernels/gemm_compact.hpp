// moe: Y = X * W^T with W stored compact (bf16, int8, fp8 e4m3; kernels/compact_format.hpp),
// X and Y fp32.
//
// Small batches (decode): gemm_compact_nt streams W once, decoding 16 weights at a time into fp32
// registers and multiplying them with all rows of X (the multi-row GEMV of gemm_small.hpp, with
// the decode inside the streaming loop). Large batches (prefill): gemm_compact_nt_prefill decodes
// a tile of W rows into caller scratch and runs Eigen's fp32 GEMM on it.
//
// Bit-exact SIMD == scalar: the result is defined on 16 "lanes" whatever the ISA. For each output
// (r, o), lane l accumulates, for chunks c = 0, 16, 32, ... (zero-padded past `in`),
//   acc[l] = fma(w(o, c + l), x(r, c + l), acc[l])
// in chunk order, where w is Format::decode (exact decode times the block scale, one
// rounding; the int8 row scale is not applied here). The 16 lanes are then summed as a tree:
// s8[l] = acc[l] + acc[l + 8], s4[l] = s8[l] + s8[l + 4], s2[l] = s4[l] + s4[l + 2],
// sum = s2[0] + s2[1]; int8 finally multiplies by its row scale: y = sum * scale[o].
// The AVX-512 path and the portable path (gemm_compact_nt_scalar) both compute exactly this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/kernels/compact_format.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(EIGEN_VECTORIZE_AVX512)
#define MOE_COMPACT_AVX512 1
#include <immintrin.h>
#else
#define MOE_COMPACT_AVX512 0
#endif

namespace moe::kernels {

/// Lanes of the canonical accumulation order (see the file comment), independent of the ISA.
inline constexpr Index gemm_compact_lanes = 16;
/// Rows of W one register tile covers: start parallel [out_begin, out_end) blocks on multiples.
inline constexpr Index gemm_compact_out_tile = 4;
/// Rows of X one register tile covers; more rows are processed in groups of this many, decoding
/// the tile's W rows again (from cache) for each group.
inline constexpr Index gemm_compact_row_tile = 4;
/// Rows of W decoded per tile by gemm_compact_nt_prefill when the scratch allows.
inline constexpr Index gemm_compact_prefill_tile = 256;

/// Floats of scratch gemm_compact_nt_prefill wants for rows of `in` weights (one full tile).
inline Index gemm_compact_scratch_floats(Index in) { return gemm_compact_prefill_tile * in; }

/// True when gemm_compact_nt runs the AVX-512 path in this translation unit.
inline constexpr bool gemm_compact_simd = MOE_COMPACT_AVX512 != 0;

namespace detail {

/// The tree sum of 16 lanes (file comment).
inline float compact_tree_sum(const float* acc) {
  float s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  const float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
  return s2a + s2b;
}

/// Scale used by decode for the weights of chunk starting at column i (Int8: 1, applied at the
/// end; Bf16: 1; Fp8: the block scale).
template <class Format>
inline float compact_chunk_scale(CompactView<Format> w, Index o, Index i) {
  if constexpr (std::is_same_v<Format, Fp8E4M3>) return w.scale(o, i);
  (void)w, (void)o, (void)i;
  return 1.0f;
}

#if MOE_COMPACT_AVX512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// See gemm_small.hpp: stops GCC from re-loading the operand once per FMA.
inline void compact_keep(__m512& p) {
#if defined(__GNUC__)
  __asm__("" : "+v"(p));
#else
  (void)p;
#endif
}

/// Decoders of 16 codes to 16 fp32 lanes (before the block scale). `mask` selects the lanes to
/// load (others read as code 0); kFull loads all 16 without a mask.
template <class Format, bool kSimple>
struct CompactSimd;

template <bool kSimple>
struct CompactSimd<Bf16, kSimple> {
  // Eigen 3.4's Bf16ToF32 is exactly the widening shift left by 16 (cvtepu16_epi32 + slli 16).
  static __m512 load(const std::uint16_t* p) {
    using Eigen::internal::Packet16bf;
    return Eigen::internal::Bf16ToF32(
        Eigen::internal::ploadu<Packet16bf>(reinterpret_cast<const Eigen::bfloat16*>(p)));
  }
  static __m512 load(const std::uint16_t* p, __mmask16 mask) {
    return Eigen::internal::Bf16ToF32(
        Eigen::internal::Packet16bf(_mm256_maskz_loadu_epi16(mask, p)));
  }
};

template <bool kSimple>
struct CompactSimd<Int8, kSimple> {
  // Eigen has no int8 -> float packet conversion: sign-extend to 32 bits, convert (exact).
  static __m512 load(const std::int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static __m512 load(const std::int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
  }
};

// E4M3 by bit manipulation into binary16, then the hardware half -> float conversion (the one
// Eigen's half2float uses): the sign at bit 15 and the 7 exponent+mantissa bits at bits 7..13
// make a half worth value * 2^-8, e4m3 subnormals becoming half subnormals, which vcvtph2ps
// converts exactly to normal floats. Measured alternative: the same bits placed straight into a
// float (value * 2^-120) turn e4m3 subnormals into float subnormals, and a multiply with a
// subnormal operand takes a microcode assist on Zen 5: 2x slower with 1/16 subnormal codes
// (about 5% of the codes of block-scaled Gaussian weights are subnormal), and wrong under DAZ.
// kSimple: the scale is pre-multiplied by 2^8 (exact for |scale| < 2^100; one rounding of
// value * scale, as the scalar decode) and there is no NaN code. Otherwise: times 2^8 (exact),
// NaN codes patched, then times the scale.
template <bool kSimple>
struct CompactSimd<Fp8E4M3, kSimple> {
  // c: 16 codes sign-extended to 16 bits (bits 7..15 = sign). Shifted left by 7 the sign lands
  // in bits 14..15 and exponent+mantissa in 7..13; keeping bits 15 and 7..13 gives the half.
  static __m512 decode(__m256i c) {
    const __m256i h =
        _mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16(std::int16_t(0xbf80u)));
    __m512 f = _mm512_cvtph_ps(h);
    if constexpr (!kSimple) {
      f = _mm512_mul_ps(f, _mm512_set1_ps(0x1p8f));
      const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(c, _mm256_set1_epi16(0x7f)),
                                                    _mm256_set1_epi16(0x7f));
      f = _mm512_mask_mov_ps(f, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    }
    return f;
  }
  static __m512 load(const std::uint8_t* p) {
    return decode(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static __m512 load(const std::uint8_t* p, __mmask16 mask) {
    return decode(_mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(mask, p)));
  }
};

/// The canonical tree sum (file comment) of one packet.
inline float compact_reduce(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));         // [s4_0+s4_2, s4_1+s4_3]
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55));  // s2_0 + s2_1
  return _mm_cvtss_f32(s1);
}

// Y[r, j] for r < RowsX, j < RowsW: W rows o0 .. o0 + RowsW - 1 of w against X rows x (stride
// ldx). One flat loop over 16-lane chunks: in a loop nest (or with a block-change branch inside)
// GCC 12 keeps the accumulators in memory and stores them on every step, 2-3x slower. Fp8 reads
// its block scale per chunk and row as a broadcast memory operand of the multiply (chunk i is in
// scale block i >> block_cols_shift). Not inlined (see gemm_small_nt_tile).
template <class Format, bool kSimple, int RowsW, int RowsX>
EIGEN_DONT_INLINE void gemm_compact_tile(const float* __restrict x, Index ldx,
                                         CompactView<Format> w, Index o0, float* __restrict y,
                                         Index ldy) {
  using Simd = CompactSimd<Format, kSimple>;
  using Code = typename Format::code_type;
  constexpr bool kBlocked = std::is_same_v<Format, Fp8E4M3>;
  const Index in = w.cols;
  const Code* code[RowsW];
  for (int j = 0; j < RowsW; ++j) code[j] = w.codes + (o0 + j) * in;
  const float* srow[RowsW] = {};
  int shift = 0;
  if constexpr (kBlocked) {
    // kSimple: the scales pre-multiplied by 2^8 (CompactView::kernel_scales).
    const float* grid = kSimple ? w.kernel_scales : w.scales;
    for (int j = 0; j < RowsW; ++j) {
      srow[j] = grid + ((o0 + j) / w.block_rows) * w.grid_cols();
    }
    shift = w.block_cols_shift;
  }
  __m512 acc[RowsW][RowsX];
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  const Index full = in - in % 16;
  for (Index i = 0; i < full; i += 16) {
    __m512 xv[RowsX];
    for (int r = 0; r < RowsX; ++r) {
      xv[r] = _mm512_loadu_ps(x + r * ldx + i);
      compact_keep(xv[r]);
    }
    const Index b = i >> shift;
    for (int j = 0; j < RowsW; ++j) {
      __m512 wv = Simd::load(code[j] + i);
      if constexpr (kBlocked) wv = _mm512_mul_ps(wv, _mm512_set1_ps(srow[j][b]));
      compact_keep(wv);
      for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_fmadd_ps(wv, xv[r], acc[j][r]);
    }
  }
  if (full < in) {
    const __mmask16 mask = __mmask16((1u << (in - full)) - 1u);
    __m512 xv[RowsX];
    for (int r = 0; r < RowsX; ++r) xv[r] = _mm512_maskz_loadu_ps(mask, x + r * ldx + full);
    const Index b = full >> shift;
    for (int j = 0; j < RowsW; ++j) {
      __m512 wv = Simd::load(code[j] + full, mask);
      if constexpr (kBlocked) wv = _mm512_mul_ps(wv, _mm512_set1_ps(srow[j][b]));
      for (int r = 0; r < RowsX; ++r) acc[j][r] = _mm512_fmadd_ps(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < RowsW; ++j) {
    for (int r = 0; r < RowsX; ++r) {
      float sum = compact_reduce(acc[j][r]);
      if constexpr (std::is_same_v<Format, Int8>) sum *= w.scales[o0 + j];
      y[r * ldy + j] = sum;
    }
  }
}

template <class Format, bool kSimple, int RowsW>
inline void gemm_compact_rows(const float* x, Index n, Index ldx, CompactView<Format> w, Index o0,
                              float* y, Index ldy) {
  constexpr Index kRowTile = gemm_compact_row_tile;
  Index r = 0;
  for (; r + kRowTile <= n; r += kRowTile) {
    gemm_compact_tile<Format, kSimple, RowsW, kRowTile>(x + r * ldx, ldx, w, o0, y + r * ldy, ldy);
  }
  switch (n - r) {
    case 3:
      gemm_compact_tile<Format, kSimple, RowsW, 3>(x + r * ldx, ldx, w, o0, y + r * ldy, ldy);
      break;
    case 2:
      gemm_compact_tile<Format, kSimple, RowsW, 2>(x + r * ldx, ldx, w, o0, y + r * ldy, ldy);
      break;
    case 1:
      gemm_compact_tile<Format, kSimple, RowsW, 1>(x + r * ldx, ldx, w, o0, y + r * ldy, ldy);
      break;
    default:
      break;
  }
}

template <class Format, bool kSimple>
inline void gemm_compact_simd(const float* x, Index n, Index ldx, CompactView<Format> w,
                              Index out_begin, Index out_end, float* y, Index ldy) {
  constexpr Index kOutTile = gemm_compact_out_tile;
  // Two loops with precomputed bounds: GCC 12 misreads "for (; o < out_end; ++o)" after the tiled
  // loop as overflowing (-Waggressive-loop-optimizations) when the sizes are constants.
  const Index tiled_end = out_begin + (out_end - out_begin) / kOutTile * kOutTile;
  for (Index o = out_begin; o < tiled_end; o += kOutTile) {
    gemm_compact_rows<Format, kSimple, kOutTile>(x, n, ldx, w, o, y + o, ldy);
  }
  for (Index o = tiled_end; o < out_end; ++o) {
    gemm_compact_rows<Format, kSimple, 1>(x, n, ldx, w, o, y + o, ldy);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MOE_COMPACT_AVX512

}  // namespace detail

/// Portable version of gemm_compact_nt (same arguments), computing the canonical 16-lane order
/// of the file comment with scalar std::fma: bit-identical to the SIMD path. Used when the
/// compiled ISA lacks AVX-512 (F, BW, VL); slow (a software fma without hardware FMA).
template <class Format>
void gemm_compact_nt_scalar(const float* x, Index n, Index ldx, CompactView<Format> w,
                            Index out_begin, Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  using Code = typename Format::code_type;
  constexpr Index kLanes = gemm_compact_lanes;
  const Index in = w.cols;
  for (Index o = out_begin; o < out_end; ++o) {
    const Code* code = w.codes + o * in;
    for (Index r = 0; r < n; ++r) {
      const float* xr = x + r * ldx;
      float acc[kLanes] = {};
      for (Index c = 0; c < in; c += kLanes) {
        const float s = detail::compact_chunk_scale(w, o, c);
        for (Index l = 0; l < kLanes; ++l) {
          const bool inside = c + l < in;
          const float wv = Format::decode(inside ? code[c + l] : Code(0), s);
          const float xv = inside ? xr[c + l] : 0.0f;
          acc[l] = std::fma(wv, xv, acc[l]);
        }
      }
      float sum = detail::compact_tree_sum(acc);
      if constexpr (std::is_same_v<Format, Int8>) sum *= w.scales[o];
      y[r * ldy + o] = sum;
    }
  }
}

/// Y[r, o] = sum_i X[r, i] * W[o, i] for r in [0, n), o in [out_begin, out_end): columns
/// [out_begin, out_end) of Y = X * W^T, W compact [out x in] (CompactView, row stride in).
/// X row-major [n x in] (row stride ldx >= in), Y row-major (row stride ldy >= out_end); no
/// overlap, no alignment needed. Other columns of Y are untouched.
///
/// Cost: streams the rows [out_begin, out_end) of W's codes once (bytes: 2 per weight for bf16,
/// 1 for int8/fp8), decoding 16 weights at a time into registers, and does 2 n in FLOPs per W
/// row; meant for n up to about 16 (above, gemm_compact_nt_prefill). No allocation.
///
/// Accumulation in fp32 in the canonical order of the file comment: bit-identical to
/// gemm_compact_nt_scalar and independent of the [out_begin, out_end) split and of threads.
/// Tasks may call it concurrently on disjoint column ranges of one Y (start ranges on
/// multiples of gemm_compact_out_tile).
template <class Format>
void gemm_compact_nt(const float* x, Index n, Index ldx, CompactView<Format> w, Index out_begin,
                     Index out_end, float* y, Index ldy) {
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  MOE_ASSERT(n == 0 || (ldx >= w.cols && ldy >= out_end));
  if (n == 0 || out_begin == out_end) return;
#if MOE_COMPACT_AVX512
  if (w.simple) {
    detail::gemm_compact_simd<Format, true>(x, n, ldx, w, out_begin, out_end, y, ldy);
  } else {
    detail::gemm_compact_simd<Format, false>(x, n, ldx, w, out_begin, out_end, y, ldy);
  }
#else
  gemm_compact_nt_scalar(x, n, ldx, w, out_begin, out_end, y, ldy);
#endif
}

/// The same product for large n (prefill): decodes tiles of up to scratch_floats / in rows of W
/// (at most gemm_compact_prefill_tile; dequantize_rows) into `scratch` and
/// multiplies with Eigen's fp32 GEMM. scratch: caller-owned, scratch_floats >= in (one row);
/// gemm_compact_scratch_floats(in) gives a full tile. Same layout rules as gemm_compact_nt.
///
/// Cost: Eigen's GEMM on [n x in] * [in x tile] per tile, plus one decode pass over the codes;
/// Eigen may allocate its packing buffers. Results differ from gemm_compact_nt by fp32 rounding
/// (Eigen's summation order; int8's row scale folded into the decoded weights).
template <class Format>
void gemm_compact_nt_prefill(const float* x, Index n, Index ldx, CompactView<Format> w,
                             Index out_begin, Index out_end, float* y, Index ldy, float* scratch,
                             Index scratch_floats) {
  const Index in = w.cols;
  MOE_ASSERT(n >= 0 && 0 <= out_begin && out_begin <= out_end && out_end <= w.rows);
  MOE_ASSERT(scratch_floats >= std::max<Index>(in, 1));
  if (n == 0 || out_begin == out_end) return;
  const Index tile = std::min(gemm_compact_prefill_tile, scratch_floats / std::max<Index>(in, 1));
  using Strided = Eigen::Map<const RowMatrix<float>, 0, Eigen::OuterStride<>>;
  using MutStrided = Eigen::Map<RowMatrix<float>, 0, Eigen::OuterStride<>>;
  const Strided xm(x, n, in, Eigen::OuterStride<>(ldx));
  for (Index o = out_begin; o < out_end; o += tile) {
    const Index rows = std::min(tile, out_end - o);
    dequantize_rows(w, o, o + rows, scratch);
    const ConstMap<float> wm(scratch, rows, in);
    MutStrided ym(y + o, n, rows, Eigen::OuterStride<>(ldy));
    ym.noalias() = xm * wm.transpose();
  }
}

/// gemm_compact_nt for n <= small_batch_rows, else gemm_compact_nt_prefill (which needs
/// the scratch; the small path ignores it). What an expert loop calls per (expert, column block).
template <class Format>
void gemm_compact_nt_auto(const float* x, Index n, Index ldx, CompactView<Format> w,
                          Index out_begin, Index out_end, float* y, Index ldy, float* scratch,
                          Index scratch_floats) {
  if (n <= small_batch_rows) {
    gemm_compact_nt(x, n, ldx, w, out_begin, out_end, y, ldy);
  } else {
    gemm_compact_nt_prefill(x, n, ldx, w, out_begin, out_end, y, ldy, scratch, scratch_floats);
  }
}

}  // namespace moe::kernels
