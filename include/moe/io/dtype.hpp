// moe/io: the element types of a safetensors file. The exact scalar conversions for the compact
// floating formats (IEEE binary16, bfloat16, OCP FP8 E4M3) live in moe/kernels/float_formats.hpp
// and are re-exported here as io::f16_to_float, io::float_to_bf16, ...
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#include "moe/kernels/float_formats.hpp"

namespace moe::io {

/// Element type of a stored tensor, spelled as in the safetensors header ("F32", "BF16", ...).
/// F8_E4M3 is the OCP "E4M3FN" format (torch.float8_e4m3fn): no infinities, one NaN pattern per
/// sign, largest finite value 448.
enum class Dtype { F64, F32, F16, BF16, F8_E4M3, I64, I32, I16, I8, U8, BOOL };

/// Bytes per element: 8, 4, 2, 2, 1, 8, 4, 2, 1, 1, 1.
inline std::size_t dtype_size(Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
    case Dtype::I64:
      return 8;
    case Dtype::F32:
    case Dtype::I32:
      return 4;
    case Dtype::F16:
    case Dtype::BF16:
    case Dtype::I16:
      return 2;
    case Dtype::F8_E4M3:
    case Dtype::I8:
    case Dtype::U8:
    case Dtype::BOOL:
      return 1;
  }
  return 0;  // unreachable for valid enumerators
}

/// The header spelling of a dtype ("F32", "F8_E4M3", "BOOL", ...); a static string.
inline const char* dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return "F64";
    case Dtype::F32:
      return "F32";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::F8_E4M3:
      return "F8_E4M3";
    case Dtype::I64:
      return "I64";
    case Dtype::I32:
      return "I32";
    case Dtype::I16:
      return "I16";
    case Dtype::I8:
      return "I8";
    case Dtype::U8:
      return "U8";
    case Dtype::BOOL:
      return "BOOL";
  }
  return "?";
}

/// Inverse of dtype_name (exact, case-sensitive match); nullopt for any other spelling, including
/// safetensors dtypes this library does not read (F8_E5M2, U16, U32, U64, ...).
inline std::optional<Dtype> dtype_from_name(std::string_view name) {
  constexpr Dtype all[] = {Dtype::F64,     Dtype::F32, Dtype::F16, Dtype::BF16,
                           Dtype::F8_E4M3, Dtype::I64, Dtype::I32, Dtype::I16,
                           Dtype::I8,      Dtype::U8,  Dtype::BOOL};
  for (Dtype d : all) {
    if (name == dtype_name(d)) return d;
  }
  return std::nullopt;
}

/// True for F64, F32, F16, BF16 and F8_E4M3.
inline bool dtype_is_floating(Dtype dtype) {
  return dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::F16 ||
         dtype == Dtype::BF16 || dtype == Dtype::F8_E4M3;
}

/// The scalar conversions of moe/kernels/float_formats.hpp, under their io names.
using kernels::bf16_to_float;
using kernels::double_to_bf16;
using kernels::double_to_e4m3;
using kernels::double_to_f16;
using kernels::e4m3_to_float;
using kernels::f16_to_float;
using kernels::float_to_bf16;
using kernels::float_to_e4m3;
using kernels::float_to_f16;

}  // namespace moe::io
