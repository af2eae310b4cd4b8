// moe: the "panel" layout the fast integer kernels read (gemv_quant.hpp), repacked once at load
// from the stored Q8 / Q4 / Mxfp4 layouts (quant_formats.hpp), lossless and without requantising.
//
// Why: the stored layouts put a block's 32 weights side by side, so a 64-byte vector holds one or
// two blocks and every vector needs its own scales, and the per-block sums need horizontal adds.
// In the panel layout 16 consecutive blocks of a row ("a super-chunk", 512 weights) are
// interleaved 4 bytes at a time: one 64-byte vector holds weights 4t..4t+3 of each of the 16
// blocks ("step" t), so vpdpbusd over the 8 steps leaves block l's exact integer sum in int32
// lane l, and one vector of 16 scales, one conversion and one fma finish 512 weights. Measured on
// this machine (one thread, weights in cache, n = 1): Q4 11.6 GB/s with two blocks per vector and
// per-chunk scales, XX GB/s in panels.
//
// Row o has nb = cols / 32 blocks; codes of row o start at o * nb * B (B = bytes per block: 32 for
// Q8, 16 for Q4 and Mxfp4); super-chunk c covers blocks [16c, 16c + m), m = min(16, nb - 16c),
// and starts at 16c * B. Inside it, with lane l = block - 16c and j < 4:
//   Q8:         byte t * 4m + 4l + j           = q(element 4t + j) + 128          (t < 8)
//   Q4, Mxfp4:  byte g * 4m + 4l + j, low nibble = code(4g + j), high = code(16 + 4g + j) (g < 4)
// (ggml Q4_0 pairs elements i and i + 16 in a byte already; gpt-oss's i, i + 1 are re-paired.)
// Scales: one per block, row-major [rows x nb]: fp16 bits (Q8, Q4) or E8M0 bytes (Mxfp4).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "moe/error.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Blocks per super-chunk (lanes of one int32 vector).
inline constexpr Index panel_blocks = 16;

/// Code bytes per block in panels: 32 for Q8, 16 for Q4 and Mxfp4.
template <class Format>
inline constexpr Index panel_block_bytes = std::is_same_v<Format, Q8> ? 32 : 16;

/// Scale element of a format's panels: fp16 bits (Q8, Q4) or an E8M0 byte (Mxfp4).
template <class Format>
using panel_scale_t = std::conditional_t<std::is_same_v<Format, Mxfp4>, std::uint8_t, std::uint16_t>;

/// A matrix [rows x cols] (cols a multiple of 32) in the panel layout (file comment). Non-owning.
template <class Format>
struct QuantPanels {
  const std::uint8_t* codes = nullptr;
  const panel_scale_t<Format>* scales = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index blocks_per_row() const { return cols / quant_block; }
  /// Bytes a product reads: codes and scales.
  std::size_t bytes() const {
    return std::size_t(rows * blocks_per_row()) *
           std::size_t(panel_block_bytes<Format> + Index(sizeof(panel_scale_t<Format>)));
  }
};

/// Bytes of panel codes, and number of scales, for a [rows x cols] matrix.
template <class Format>
std::size_t panel_code_bytes(Index rows, Index cols) {
  return std::size_t(rows * (cols / quant_block) * panel_block_bytes<Format>);
}
inline std::size_t panel_scale_count(Index rows, Index cols) {
  return std::size_t(rows * (cols / quant_block));
}

namespace detail {

// Offset in a row's panel codes of the byte holding element e (< 32) of block b, and (Q4/Mxfp4)
// whether it is the high nibble.
template <class Format>
inline Index panel_offset(Index nb, Index b, int e, bool* high) {
  const Index c = b / panel_blocks, l = b % panel_blocks;
  const Index m = std::min(panel_blocks, nb - c * panel_blocks);
  const Index base = c * panel_blocks * panel_block_bytes<Format>;
  if constexpr (std::is_same_v<Format, Q8>) {
    *high = false;
    return base + Index(e / 4) * 4 * m + 4 * Index(l) + e % 4;
  } else {
    *high = e >= 16;
    return base + Index((e % 16) / 4) * 4 * m + 4 * Index(l) + e % 4;
  }
}

}  // namespace detail

/// Unsigned code u of weight (o, 32 b + e) in panels (w = (u - quant_offset) * scale).
template <class Format>
int panel_code(const QuantPanels<Format>& p, Index o, Index b, int e) {
  const Index nb = p.blocks_per_row();
  bool high = false;
  const Index off = detail::panel_offset<Format>(nb, b, e, &high);
  const std::uint8_t byte = p.codes[o * nb * panel_block_bytes<Format> + off];
  if constexpr (std::is_same_v<Format, Q8>) return byte;
  const unsigned nibble = high ? unsigned(byte >> 4) : unsigned(byte & 15);
  if constexpr (std::is_same_v<Format, Q4>) return int(nibble);
  return e2m1_doubled(nibble) + 12;
}

/// Scale of block b of row o in panels (fp16 value, or 2^(s - 128) for Mxfp4's doubled codes).
template <class Format>
float panel_scale(const QuantPanels<Format>& p, Index o, Index b) {
  const auto s = p.scales[o * p.blocks_per_row() + b];
  if constexpr (std::is_same_v<Format, Mxfp4>) {
    return e8m0_half_scale(s);
  } else {
    return fp16_to_float(s);
  }
}

/// Repacks rows [row_begin, row_end) of a stored matrix into panels: `codes` and `scales` point
/// at the panel arrays of the whole matrix (panel_code_bytes, panel_scale_count); rows outside
/// the range are not touched, so tasks may repack disjoint ranges concurrently. Lossless.
template <class Format>
void pack_panels(const QuantView<Format>& w, Index row_begin, Index row_end, std::uint8_t* codes,
                 panel_scale_t<Format>* scales) {
  MOE_ASSERT(0 <= row_begin && row_begin <= row_end && row_end <= w.rows);
  const Index nb = w.blocks_per_row();
  constexpr Index kB = panel_block_bytes<Format>;
  for (Index o = row_begin; o < row_end; ++o) {
    std::uint8_t* row = codes + o * nb * kB;
    for (Index b = 0; b < nb; ++b) {
      if constexpr (std::is_same_v<Format, Mxfp4>) {
        scales[o * nb + b] = w.scales[o * nb + b];
      } else {
        scales[o * nb + b] = w.blocks[o * nb + b].d;
      }
      for (int e = 0; e < 32; ++e) {
        bool high = false;
        const Index off = detail::panel_offset<Format>(nb, b, e, &high);
        if constexpr (std::is_same_v<Format, Q8>) {
          row[off] = std::uint8_t(int(w.blocks[o * nb + b].q[e]) + 128);
        } else {
          unsigned nibble;
          if constexpr (std::is_same_v<Format, Q4>) {
            const std::uint8_t byte = w.blocks[o * nb + b].q[e % 16];
            nibble = e < 16 ? unsigned(byte & 15) : unsigned(byte >> 4);
          } else {
            const std::uint8_t byte = w.codes[(o * nb + b) * 16 + e / 2];
            nibble = (e % 2) ? unsigned(byte >> 4) : unsigned(byte & 15);
          }
          row[off] = high ? std::uint8_t((row[off] & 0x0f) | (nibble << 4))
                          : std::uint8_t((row[off] & 0xf0) | nibble);
        }
      }
    }
  }
}

}  // namespace moe::kernels
