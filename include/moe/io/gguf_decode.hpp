// moe/io: a GGUF tensor decoded to float, whatever its ggml type among those moe reads.
//
// For inspection, tests and the K-quants (converted on load); weights in F16/BF16/Q8_0/Q4_0/MXFP4
// are meant to go into moe's compact formats without passing through float.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"
#include "moe/io/ggml_types.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/kernels/ggml_blocks.hpp"
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
      kernels::dequantize_q8_0(bytes, count, out);
      return true;
    case GgmlType::Q4_0:
      kernels::dequantize_q4_0(bytes, count, out);
      return true;
    case GgmlType::MXFP4:
      kernels::dequantize_mxfp4(bytes, count, out);
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
