// moe: the scale choices of the block-quantised formats (kernels/quant_formats.hpp), searched for
// up to 16 blocks of 32 weights at once: the weights of the blocks are transposed so that lane l
// of every loop is block l (xt[i * kSearchLanes + l] = weight i of block l). The inner loops then
// run across blocks with no reduction and vectorise (GCC's loop vectoriser at -O3; one AVX-512
// register of 16 floats), and every block still sums its weights in the order i = 0, 1, ..., 31,
// as a plain loop over one block does.
//
// Exactness (why the lane order cannot change a result):
//  - Q8 / Q4: for codes q of one trial scale, s1 = sum(w q) is accumulated in double and is exact:
//    a weight with a nonzero code is within a factor 2^9 of the block's largest (its code is at
//    least 1/2 of at most 127.9), so every product w q (24 x 8 bits) is a multiple of
//    ulp(max|w|) / 2^9 and the sum (< 2^12 max|w|) needs at most 45 bits. s2 = sum(q^2) is an
//    integer below 2^24, exact in float. The choice therefore does not depend on the order of the
//    sums, nor on whether the compiler fuses a multiply-add.
//  - Mxfp4: r = |w| - v 2^e (v the e2m1 value |w| rounds to) is exact in float (|w| lies within a
//    factor 2 of v 2^e, or v = 0), so r^2 is exact in double and a fused multiply-add gives the
//    same sum; the sum itself is taken in the order of the plain loop.
// Measured on the 2-core Xeon (AVX-512), rows of 4096 Gaussian weights (benchmarks/quant_bench.cpp
// quantize/<format>/in:4096, CPU time): q8 / q4 / mxfp4 150 / 145 / 158 M weights/s, against
// 11 / 10 / 9.5 M for the one-block-at-a-time search in double before (docs/io.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/tensor.hpp"

namespace moe::kernels::detail {

/// Blocks searched together (lanes of the loops below).
inline constexpr int kSearchLanes = 16;

/// Weights [n blocks x 32] (n <= kSearchLanes, contiguous) -> xt[32 x kSearchLanes] with
/// xt[i * kSearchLanes + l] = x[l * 32 + i] (lanes l >= n are left as they are). Every function
/// below reads and writes lanes [0, n) only. Loop shape: the lane loop (run-time count n) outside,
/// the 32 weights of a block inside, unrolled by `#pragma GCC unroll`, so that the lane loop is
/// the innermost loop GCC's loop vectoriser sees and every block's sums stay in registers. (A
/// compile-time lane count of 16 got the lane loop unrolled instead, and GCC 12 here has no SLP
/// vectoriser to fall back on: -fno-tree-slp-vectorize, CMakeLists.txt.)
inline void transpose_blocks(const float* x, int n, float* xt) {
  for (int l = 0; l < n; ++l) {
    for (int i = 0; i < 32; ++i) xt[i * kSearchLanes + l] = x[l * 32 + i];
  }
}

/// max |w| of every lane's block.
inline void lane_max_magnitude(const float* xt, int n, float* amax) {
  for (int l = 0; l < n; ++l) {
    float m = 0.0f;
#pragma GCC unroll 32
    for (int i = 0; i < 32; ++i) {
      const float a = std::fabs(xt[i * kSearchLanes + l]);
      m = a > m ? a : m;
    }
    amax[l] = m;
  }
}

/// The weight of largest magnitude of every lane's block, signed (the first one on ties).
inline void lane_signed_max(const float* xt, int n, float* m) {
  for (int l = 0; l < n; ++l) {
    float r = 0.0f;
#pragma GCC unroll 32
    for (int i = 0; i < 32; ++i) {
      const float v = xt[i * kSearchLanes + l];
      r = std::fabs(v) > std::fabs(r) ? v : r;
    }
    m[l] = r;
  }
}

/// The 19 trial numerators of the Q8 / Q4 search: qref + 0.1 t (towards larger |qref| for t > 0),
/// t = -9 .. 9, in float as the trial inverse scales are computed.
inline float trial_numerator(float qref, int t) {
  return qref + 0.1f * float(t) * (qref < 0 ? -1.0f : 1.0f);
}

/// The scale of every lane's block for integer codes in [qmin, qmax], chosen for the least squared
/// error (the idea of llama.cpp's make_qx_quants): for the 19 trial inverse scales
/// trial_numerator(qref, t) / ref (ref = the weight that should get code ~qref), codes
/// q = clamp(round(w * inv)), then the least-squares scale of those codes d = s1 / s2 (s1 =
/// sum(w q), s2 = sum(q^2)), whose squared error is sum(w^2) - s1^2 / s2: the trial with the
/// largest s1^2 / s2 (the first on ties) wins. A block with ref = 0 gets 0; one whose largest
/// trial inverse scale overflows float (|ref| below ~1e-37) gets ref / qref (no search: it rounds
/// to a zero fp16 scale anyway). Measured on Gaussian weights: 25% less squared error than the
/// plain absmax scale for Q4, 8% for Q8. Cost: 19 x 32 multiply-round-accumulate steps per block,
/// vectorised across lanes; the codes are clamped as integers (a float clamp let GCC duplicate
/// the conversion into branches, which its if-conversion then refused under -ftrapping-math).
inline void search_lane_scales(const float* xt, int n, const float* ref, float qref, int qmin,
                               int qmax, float* d) {
  float safe_ref[kSearchLanes];
  double best_score[kSearchLanes], best_s1[kSearchLanes], best_s2[kSearchLanes];
  bool searched[kSearchLanes];
  for (int l = 0; l < n; ++l) {
    searched[l] = ref[l] != 0.0f && std::isfinite(trial_numerator(qref, 9) / ref[l]);
    safe_ref[l] = searched[l] ? ref[l] : 1.0f;
    best_score[l] = -1.0;
    best_s1[l] = 0.0;
    best_s2[l] = 1.0;
  }
  double xd[32 * kSearchLanes];  // the weights in double, converted once for all 19 trials
  for (int l = 0; l < n; ++l) {
#pragma GCC unroll 32
    for (int i = 0; i < 32; ++i) xd[i * kSearchLanes + l] = double(xt[i * kSearchLanes + l]);
  }
  for (int t = -9; t <= 9; ++t) {
    const float num = trial_numerator(qref, t);
    for (int l = 0; l < n; ++l) {
      const float inv = num / safe_ref[l];
      double s1 = 0.0;
      float s2 = 0.0f;  // sums of squares of integers below 2^24: exact in float
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) {
        // |w * inv| <= |trial numerator| < 128: the conversion to int is exact.
        const int q = std::min(std::max(int(std::nearbyint(xt[i * kSearchLanes + l] * inv)), qmin),
                               qmax);
        s1 += xd[i * kSearchLanes + l] * double(q);
        s2 += float(q) * float(q);
      }
      // s2 > 0 in a searched block (its ref gets a code of magnitude >= 7); in the others
      // (overridden below) 0 / 0 gives a NaN score that never wins. No branch here: GCC sinks a
      // division or conversion used only under a condition into a branch, which its
      // if-conversion refuses (it could trap), and the loop stays scalar; hence also the
      // winner's d computed after the loop.
      const double s2d = double(s2);
      const double score = s1 * s1 / s2d;
      const bool better = score > best_score[l];
      best_score[l] = better ? score : best_score[l];
      best_s1[l] = better ? s1 : best_s1[l];
      best_s2[l] = better ? s2d : best_s2[l];
    }
  }
  for (int l = 0; l < n; ++l) {
    d[l] = ref[l] == 0.0f ? 0.0f : searched[l] ? float(best_s1[l] / best_s2[l]) : ref[l] / qref;
  }
}

/// The e2m1 value (0, .5, 1, 1.5, 2, 3, 4, 6) nearest to v >= 0, ties to the even code, saturating
/// at 6; written as a sum of steps at the midpoints (no table, no branch) so that it vectorises.
/// The code of that value is e2m1_code_steps(v).
inline float e2m1_value_steps(float v) {
  return 0.5f * float(v > 0.25f) + 0.5f * float(v >= 0.75f) + 0.5f * float(v > 1.25f) +
         0.5f * float(v >= 1.75f) + float(v > 2.5f) + float(v >= 3.5f) + 2.0f * float(v > 5.0f);
}
/// The e2m1 code (0..7) of e2m1_value_steps(v): the number of midpoints v is past (ties to even:
/// the midpoints below the even codes 2, 4, 6 count when reached, the others when passed).
inline unsigned e2m1_code_steps(float v) {
  return unsigned(v > 0.25f) + unsigned(v >= 0.75f) + unsigned(v > 1.25f) + unsigned(v >= 1.75f) +
         unsigned(v > 2.5f) + unsigned(v >= 3.5f) + unsigned(v > 5.0f);
}

/// The E8M0 exponent e of every lane's Mxfp4 block (kernels::quantize_mxfp4_row says which):
/// of e0, the smallest with max|w| <= 6 * 2^e0, and e0 - 1, both kept in [-125, 127], the one
/// whose codes have the smaller squared error sum((|w| - v 2^e)^2) (e0 on ties); 0 for an
/// all-zero block.
inline void search_lane_exponents(const float* xt, int n, int* e) {
  float amax[kSearchLanes];
  lane_max_magnitude(xt, n, amax);
  int cand[2][kSearchLanes];
  float down[2][kSearchLanes];  // 2^-c as float (exact: c <= 127 gives at least 2^-127)
  double up[2][kSearchLanes];   // 2^c
  for (int l = 0; l < n; ++l) {
    int e0 = 0;
    if (amax[l] > 0.0f) {
      int exp2 = 0;
      std::frexp(amax[l] / 6.0f, &exp2);  // amax / 6 in [2^(exp2 - 1), 2^exp2)
      e0 = exp2;
      if (std::ldexp(1.0f, e0 - 1) * 6.0f >= amax[l]) e0 -= 1;  // exact power of two case
    }
    for (int k = 0; k < 2; ++k) {
      cand[k][l] = amax[l] > 0.0f ? std::clamp(e0 - k, -125, 127) : 0;
      down[k][l] = std::ldexp(1.0f, -cand[k][l]);
      up[k][l] = std::ldexp(1.0, cand[k][l]);
    }
  }
  for (int l = 0; l < n; ++l) {
    double err[2];
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k) {
      double sum = 0.0;
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) {
        const float a = std::fabs(xt[i * kSearchLanes + l]);
        const double r = double(a) - double(e2m1_value_steps(a * down[k][l])) * up[k][l];
        sum += r * r;
      }
      err[k] = sum;
    }
    e[l] = err[1] < err[0] ? cand[1][l] : cand[0][l];
  }
}

}  // namespace moe::kernels::detail
