// moe/io: a GGUF tensor decoded to float, whatever its ggml type among those moe reads.
//
// For inspection, tests and the K-quants (converted on load); weights in F16/BF16/Q8_0/Q4_0/MXFP4
// are meant to go into moe's compact formats without passing through float.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"
#include "moe/io/ggml_types.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/ggml_blocks.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// The ggml types gguf_to_float decodes, as they appear in its error message.
inline constexpr const char* kGgufFloatTypes =
    "F32, F16, BF16, F64, Q8_0, Q4_0, MXFP4, Q4_K, Q5_K, Q6_K";

/// True when gguf_to_float decodes `type`.
inline bool ggml_type_decodes_to_float(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::F64:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::MXFP4:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

namespace detail {

/// Decodes `count` values (a multiple of 32) of ggml Q8_0 / Q4_0 blocks (Format Q8 / Q4: the same
/// bytes) or MXFP4 blocks (Format Mxfp4) with the formats' own decoder (kernels/quant_formats.hpp),
/// 64 blocks at a time through a local buffer: a copy (file data need not be 2-byte aligned) or,
/// for MXFP4, the repack into the split layout.
// dequantize_stored_rows' AVX-512 intrinsics, inlined here, trip GCC 12's false -Wuninitialized
// on _mm512_undefined_* (as in the kernels that use them directly).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class Format>
void ggml_decode_quant(const unsigned char* bytes, Index count, float* out) {
  constexpr Index kChunk = 64;
  const Index blocks = count / kernels::quant_block;
  for (Index b0 = 0; b0 < blocks; b0 += kChunk) {
    const Index nb = std::min(kChunk, blocks - b0), n = nb * kernels::quant_block;
    float* dst = out + b0 * kernels::quant_block;
    if constexpr (std::is_same_v<Format, Mxfp4>) {
      std::uint8_t codes[kChunk * 16], scales[kChunk];
      kernels::repack_mxfp4_to_split(bytes + std::size_t(b0) * kernels::ggml_mxfp4_bytes, n, codes,
                                     scales);
      kernels::dequantize_stored_rows<Mxfp4>(kernels::Mxfp4View{codes, scales, 1, n}, 0, 1, dst);
    } else {
      using Block =
          std::conditional_t<std::is_same_v<Format, Q8>, kernels::BlockQ8, kernels::BlockQ4>;
      Block local[kChunk];
      std::memcpy(local, bytes + std::size_t(b0) * sizeof(Block), std::size_t(nb) * sizeof(Block));
      kernels::dequantize_stored_rows<Format>(kernels::QuantView<Format>{local, 1, n}, 0, 1, dst);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail

/// Decodes `count` values of `type` stored at `bytes` into `out` (count a multiple of the block
/// size; the caller has checked the byte range). Returns false for a type it does not decode.
inline bool ggml_decode_to_float(GgmlType type, const unsigned char* bytes, Index count,
                                 float* out) {
  auto each = [&](std::size_t size, auto decode) {
    for (Index i = 0; i < count; ++i) out[i] = decode(bytes + static_cast<std::size_t>(i) * size);
  };
  switch (type) {
    case GgmlType::F32:
      if (count > 0) std::memcpy(out, bytes, static_cast<std::size_t>(count) * sizeof(float));
      return true;
    case GgmlType::F16:
      each(2, [](const unsigned char* p) {
        std::uint16_t h;
        std::memcpy(&h, p, 2);
        return f16_to_float(h);
      });
      return true;
    case GgmlType::BF16:
      each(2, [](const unsigned char* p) {
        std::uint16_t h;
        std::memcpy(&h, p, 2);
        return bf16_to_float(h);
      });
      return true;
    case GgmlType::F64:
      each(8, [](const unsigned char* p) {
        double v;
        std::memcpy(&v, p, 8);
        return static_cast<float>(v);
      });
      return true;
    case GgmlType::Q8_0:
      detail::ggml_decode_quant<Q8>(bytes, count, out);
      return true;
    case GgmlType::Q4_0:
      detail::ggml_decode_quant<Q4>(bytes, count, out);
      return true;
    case GgmlType::MXFP4:
      detail::ggml_decode_quant<Mxfp4>(bytes, count, out);
      return true;
    case GgmlType::Q4_K:
      kernels::dequantize_q4_k(bytes, count, out);
      return true;
    case GgmlType::Q5_K:
      kernels::dequantize_q5_k(bytes, count, out);
      return true;
    case GgmlType::Q6_K:
      kernels::dequantize_q6_k(bytes, count, out);
      return true;
    default:
      return false;
  }
}

/// Tensor `name` of `file` decoded to a new row-major [rows x cols] float matrix: cols = dims[0],
/// rows = the product of the other dims (a stacked [E x out x in] expert tensor gives
/// [E*out x in]). Throws io_error for a missing tensor or a type it does not decode:
/// "moe: <file>: tensor 'x' has ggml type IQ2_XXS (16), which moe does not decode (it decodes
/// F32, ...)".
inline RowMatrix<float> gguf_to_float(const GgufFile& file, const std::string& name) {
  const GgufTensorInfo& t = file.tensor(name);
  if (!ggml_type_decodes_to_float(t.type)) {
    throw io_error(moe::detail::concat("moe: ", file.path(), ": tensor '", name, "' has ggml type ",
                                       ggml_type_label(static_cast<std::uint32_t>(t.type)),
                                       ", which moe does not decode (it ", "decodes ",
                                       kGgufFloatTypes, ")"));
  }
  RowMatrix<float> m(static_cast<Index>(t.rows()), static_cast<Index>(t.cols()));
  ggml_decode_to_float(t.type, file.data(t), static_cast<Index>(t.numel()), m.data());
  return m;
}

}  // namespace moe::io
