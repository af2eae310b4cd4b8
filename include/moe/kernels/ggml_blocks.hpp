// moe/kernels: ggml's K-quant codecs (decoding Q4_K, Q5_K, Q6_K to float; plain encoders for
// tests and conversion) and the repack of ggml MXFP4 blocks to and from Mxfp4's split
// codes/scales layout. Q8_0 and Q4_0 are the Q8 / Q4 blocks of kernels/quant_formats.hpp (same
// bytes), which decodes them; MXFP4 values decode there too once repacked.
//
// Layouts, from the format definitions in ggml-common.h (f16 = IEEE half, little-endian):
//   MXFP4 (32 values, 17 B):  u8 e (E8M0) | u8 qs[16]   x = e2m1(nibble) * 2^(e - 127); value l
//                             is the low nibble of qs[l], value 16 + l the high one
//   Q4_K (256 values, 144 B): f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
//        8 sub-blocks of 32, each with a 6-bit scale sc and a 6-bit min m:  x = d*sc*q - dmin*m.
//        64 values share 32 bytes of qs: low nibbles for sub-block 2c, high nibbles for 2c+1.
//        scales[12] packs the 16 six-bit numbers: for j < 4, sc_j = s[j] & 63, m_j = s[j+4] & 63;
//        for j >= 4, sc_j = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m_j = (s[j+4] >> 4) | (s[j] >> 6)
//        << 4.
//   Q5_K (256 values, 176 B): f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
//        as Q4_K with a fifth bit: for sub-block j, bit j of qh[l] is the high bit of value l of
//        it.
//   Q6_K (256 values, 210 B): u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d
//        16 sub-blocks of 16, x = d * scales[j] * (q - 32), q six bits. Each half of 128 values
//        uses 64 bytes of ql and 32 of qh: value 32*r + l of the half (r = 0..3, l < 32) takes the
//        low (r < 2) or high (r >= 2) nibble of ql[l + 32*(r & 1)] and bits 2r, 2r+1 of qh[l];
//        value v of the super-block uses scales[v / 16].
// Kernels: pointer + count loops, `count` a multiple of the block size (checked by the caller).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moe/kernels/float_formats.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Values per block of MXFP4; per super-block of the K-quants.
inline constexpr Index ggml_block = 32;
inline constexpr Index ggml_super_block = 256;
/// Bytes per block.
inline constexpr std::size_t ggml_mxfp4_bytes = 17, ggml_q4_k_bytes = 144, ggml_q5_k_bytes = 176,
                             ggml_q6_k_bytes = 210;

namespace ggml_detail {

/// The f16 at p (unaligned), as float.
inline float load_half(const unsigned char* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_float(h);
}

/// v rounded to f16 (nearest even), stored at p.
inline void store_half(unsigned char* p, float v) {
  const std::uint16_t h = float_to_f16(v);
  std::memcpy(p, &h, 2);
}

/// Scale and min of sub-block j (0..7) from the 12 packed bytes of Q4_K/Q5_K.
inline void k_scale_min(int j, const unsigned char* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

/// Inverse of k_scale_min: packs 8 scales and 8 mins (each 0..63) into 12 bytes.
inline void k_pack_scale_min(const int* sc, const int* m, unsigned char* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<unsigned char>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<unsigned char>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<unsigned char>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
}

}  // namespace ggml_detail

// The codecs below multiply small integer codes (at most 8 bits, exactly representable in float)
// by float scales, and index within 256-value super-blocks with int arithmetic that cannot
// overflow: the narrowing and widening clang-tidy reports here are exact by the formats' definition.
// NOLINTBEGIN(bugprone-narrowing-conversions, bugprone-implicit-widening-of-multiplication-result)

/// Decodes `count` values (a multiple of 256) of Q4_K super-blocks.
inline void dequantize_q4_k(const unsigned char* in, Index count, float* out) {
  for (Index b = 0; b < count / ggml_super_block; ++b, in += ggml_q4_k_bytes) {
    const float d = ggml_detail::load_half(in);
    const float dmin = ggml_detail::load_half(in + 2);
    const unsigned char* scales = in + 4;
    const unsigned char* qs = in + 16;
    for (int c = 0; c < 4; ++c, qs += 32, out += 64) {
      int sc0, m0, sc1, m1;
      ggml_detail::k_scale_min(2 * c, scales, sc0, m0);
      ggml_detail::k_scale_min(2 * c + 1, scales, sc1, m1);
      const float d0 = d * sc0, min0 = dmin * m0, d1 = d * sc1, min1 = dmin * m1;
      for (int l = 0; l < 32; ++l) {
        out[l] = d0 * (qs[l] & 15) - min0;
        out[l + 32] = d1 * (qs[l] >> 4) - min1;
      }
    }
  }
}

/// Decodes `count` values (a multiple of 256) of Q5_K super-blocks.
inline void dequantize_q5_k(const unsigned char* in, Index count, float* out) {
  for (Index b = 0; b < count / ggml_super_block; ++b, in += ggml_q5_k_bytes) {
    const float d = ggml_detail::load_half(in);
    const float dmin = ggml_detail::load_half(in + 2);
    const unsigned char* scales = in + 4;
    const unsigned char* qh = in + 16;
    const unsigned char* qs = in + 48;
    for (int c = 0; c < 4; ++c, qs += 32, out += 64) {
      int sc0, m0, sc1, m1;
      ggml_detail::k_scale_min(2 * c, scales, sc0, m0);
      ggml_detail::k_scale_min(2 * c + 1, scales, sc1, m1);
      const float d0 = d * sc0, min0 = dmin * m0, d1 = d * sc1, min1 = dmin * m1;
      const int bit0 = 1 << (2 * c), bit1 = 1 << (2 * c + 1);
      for (int l = 0; l < 32; ++l) {
        out[l] = d0 * ((qs[l] & 15) + ((qh[l] & bit0) ? 16 : 0)) - min0;
        out[l + 32] = d1 * ((qs[l] >> 4) + ((qh[l] & bit1) ? 16 : 0)) - min1;
      }
    }
  }
}

/// Decodes `count` values (a multiple of 256) of Q6_K super-blocks.
inline void dequantize_q6_k(const unsigned char* in, Index count, float* out) {
  for (Index b = 0; b < count / ggml_super_block; ++b, in += ggml_q6_k_bytes) {
    const float d = ggml_detail::load_half(in + 208);
    // Local copies (stores to `out` cannot alias them) and one scale per run of 16 values: the
    // inner loop vectorises (0.14 -> 1.9 G values/s measured, AVX-512, -O3).
    unsigned char block[208];
    std::memcpy(block, in, 208);
    for (int h = 0; h < 2; ++h, out += 128) {
      const unsigned char* ql = block + 64 * h;
      const unsigned char* qh = block + 128 + 32 * h;
      const auto* sc = reinterpret_cast<const std::int8_t*>(block + 192 + 8 * h);
      for (int half = 0; half < 2; ++half) {
        const float s0 = d * sc[half], s1 = d * sc[half + 2], s2 = d * sc[half + 4],
                    s3 = d * sc[half + 6];
        for (int l = 16 * half; l < 16 * half + 16; ++l) {
          out[l] = s0 * (((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
          out[l + 32] = s1 * (((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
          out[l + 64] = s2 * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          out[l + 96] = s3 * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
    }
  }
}

/// Repacks `count` values (a multiple of 32) of ggml MXFP4 blocks into the split layout gpt-oss
/// checkpoints use (codes: 16 bytes per block, element 2i in the low nibble of byte i and 2i + 1
/// in the high one; scales: one E8M0 byte per block). A byte shuffle: lossless, no float.
inline void repack_mxfp4_to_split(const unsigned char* in, Index count, std::uint8_t* codes,
                                  std::uint8_t* scales) {
  for (Index b = 0; b < count / ggml_block; ++b, in += ggml_mxfp4_bytes, codes += 16) {
    scales[b] = in[0];
    const unsigned char* qs = in + 1;
    for (int i = 0; i < 16; ++i) {
      const int j0 = 2 * i, j1 = 2 * i + 1;  // element j is qs[j] low (j < 16), qs[j-16] high
      const int lo = j0 < 16 ? qs[j0] & 15 : qs[j0 - 16] >> 4;
      const int hi = j1 < 16 ? qs[j1] & 15 : qs[j1 - 16] >> 4;
      codes[i] = static_cast<std::uint8_t>(lo | (hi << 4));
    }
  }
}

/// The inverse of repack_mxfp4_to_split: `count` values (a multiple of 32) in the split layout
/// (codes, scales) written as ggml MXFP4 blocks at `out` (17 bytes each). Lossless, no float.
inline void repack_split_to_mxfp4(const std::uint8_t* codes, const std::uint8_t* scales,
                                  Index count, unsigned char* out) {
  for (Index b = 0; b < count / ggml_block; ++b, out += ggml_mxfp4_bytes, codes += 16) {
    out[0] = scales[b];
    unsigned char* qs = out + 1;
    for (int l = 0; l < 16; ++l) {
      // element l (low nibble of qs[l]) and element l + 16 (high nibble) of the block
      const int lo = (codes[l / 2] >> (4 * (l % 2))) & 15;
      const int hi = (codes[(l + 16) / 2] >> (4 * (l % 2))) & 15;
      qs[l] = static_cast<unsigned char>(lo | (hi << 4));
    }
  }
}

// ---- encoders: plain round-to-nearest, min/max based (not llama.cpp's searched scales) ----

namespace ggml_detail {

/// Shared by Q4_K (levels = 15) and Q5_K (levels = 31): per sub-block of 32 an affine grid from
/// min(0, min x) to max x, scales (rounded up) and mins (to nearest) quantised to 6 bits against
/// the super-block's d, dmin; then each value to the nearest level. |error| <= (d*sc + dmin) / 2.
/// Writes d, dmin, the 12 scale bytes, and q (0..levels) for each of the 256 values.
inline void k_affine_encode(const float* x, int levels, unsigned char* head, int* q) {
  float scale[8], min[8];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    float lo = 0, hi = 0;
    for (int l = 0; l < 32; ++l) {
      lo = std::min(lo, x[32 * j + l]);
      hi = std::max(hi, x[32 * j + l]);
    }
    scale[j] = (hi - lo) / levels;
    min[j] = -lo;
    max_scale = std::max(max_scale, scale[j]);
    max_min = std::max(max_min, min[j]);
  }
  store_half(head, max_scale / 63);
  store_half(head + 2, max_min / 63);
  const float d = load_half(head), dmin = load_half(head + 2);
  int sc[8], m[8];
  for (int j = 0; j < 8; ++j) {
    // Rounded up, so that the grid covers the sub-block's range (no clipping at the top).
    sc[j] = d == 0 ? 0 : std::min(63, static_cast<int>(std::ceil(scale[j] / d)));
    m[j] = dmin == 0 ? 0 : std::min(63, static_cast<int>(std::nearbyint(min[j] / dmin)));
  }
  k_pack_scale_min(sc, m, head + 4);
  for (int j = 0; j < 8; ++j) {
    const float step = d * sc[j], offset = dmin * m[j];
    for (int l = 0; l < 32; ++l) {
      const float v = step == 0 ? 0.0f : std::nearbyint((x[32 * j + l] + offset) / step);
      q[32 * j + l] = static_cast<int>(std::clamp(v, 0.0f, static_cast<float>(levels)));
    }
  }
}

}  // namespace ggml_detail

/// Encodes `count` values (a multiple of 256) as Q4_K.
inline void quantize_q4_k(const float* in, Index count, unsigned char* out) {
  int q[256];
  for (Index b = 0; b < count / ggml_super_block; ++b, in += 256, out += ggml_q4_k_bytes) {
    ggml_detail::k_affine_encode(in, 15, out, q);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        out[16 + 32 * c + l] =
            static_cast<unsigned char>(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
      }
    }
  }
}

/// Encodes `count` values (a multiple of 256) as Q5_K.
inline void quantize_q5_k(const float* in, Index count, unsigned char* out) {
  int q[256];
  for (Index b = 0; b < count / ggml_super_block; ++b, in += 256, out += ggml_q5_k_bytes) {
    ggml_detail::k_affine_encode(in, 31, out, q);
    unsigned char* qh = out + 16;
    std::fill(qh, qh + 32, static_cast<unsigned char>(0));
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        const int lo = q[64 * c + l], hi = q[64 * c + 32 + l];
        out[48 + 32 * c + l] = static_cast<unsigned char>((lo & 15) | ((hi & 15) << 4));
        qh[l] |= static_cast<unsigned char>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
      }
    }
  }
}

/// Encodes `count` values (a multiple of 256) as Q6_K: per sub-block of 16 a scale max|x| / 31,
/// quantised (rounded up) to int8 against d = max scale / 127, q = round(x / (d * scale)).
inline void quantize_q6_k(const float* in, Index count, unsigned char* out) {
  for (Index b = 0; b < count / ggml_super_block; ++b, in += 256, out += ggml_q6_k_bytes) {
    float scale[16], max_scale = 0;
    for (int j = 0; j < 16; ++j) {
      float amax = 0;
      for (int l = 0; l < 16; ++l) amax = std::max(amax, std::fabs(in[16 * j + l]));
      scale[j] = amax / 31;
      max_scale = std::max(max_scale, scale[j]);
    }
    ggml_detail::store_half(out + 208, max_scale / 127);
    const float d = ggml_detail::load_half(out + 208);
    int q[256];
    for (int j = 0; j < 16; ++j) {
      const int sc = d == 0 ? 0 : std::min(127, static_cast<int>(std::ceil(scale[j] / d)));
      out[192 + j] = static_cast<unsigned char>(static_cast<std::int8_t>(sc));
      const float step = d * sc;
      for (int l = 0; l < 16; ++l) {
        const float v = step == 0 ? 0.0f : std::nearbyint(in[16 * j + l] / step);
        q[16 * j + l] = static_cast<int>(std::clamp(v, -32.0f, 31.0f)) + 32;
      }
    }
    std::fill(out, out + 192, static_cast<unsigned char>(0));
    for (int h = 0; h < 2; ++h) {
      unsigned char* ql = out + 64 * h;
      unsigned char* qh = out + 128 + 32 * h;
      const int* qq = q + 128 * h;
      for (int l = 0; l < 32; ++l) {
        ql[l] = static_cast<unsigned char>((qq[l] & 15) | ((qq[l + 64] & 15) << 4));
        ql[l + 32] = static_cast<unsigned char>((qq[l + 32] & 15) | ((qq[l + 96] & 15) << 4));
        qh[l] = static_cast<unsigned char>((qq[l] >> 4) | ((qq[l + 32] >> 4) << 2) |
                                           ((qq[l + 64] >> 4) << 4) | ((qq[l + 96] >> 4) << 6));
      }
    }
  }
}

// NOLINTEND(bugprone-narrowing-conversions, bugprone-implicit-widening-of-multiplication-result)

}  // namespace moe::kernels
