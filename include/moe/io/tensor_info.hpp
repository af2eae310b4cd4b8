// moe/io: what a safetensors header says about one tensor (TensorInfo), and the element loop that
// decodes stored bytes of any dtype: shared by the reader and the writer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"

namespace moe::io {

/// One tensor of a validated file. `offset` and `nbytes` are relative to the data section;
/// nbytes == numel() * dtype_size(dtype) and the range lies inside the file.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;  ///< Row-major; empty for a scalar.
  std::size_t offset = 0;           ///< First byte, relative to the start of the data section.
  std::size_t nbytes = 0;           ///< Byte count: numel() * dtype_size(dtype).

  /// Product of the shape (1 for a scalar). Validation guarantees it does not overflow.
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) {
      if (d == 0) return 0;  // checked first: the other dims may multiply past 2^63
    }
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

/// A tensor shape for messages: "[2 x 3 x 4]"; "[]" for a scalar.
inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += " x ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace detail {
using io::shape_str;  // the name callers used before it was public

template <class T>
inline constexpr bool always_false_v = false;

/// The stored dtype a C++ scalar maps to without conversion (map_matrix, default of make_tensor).
template <class T>
constexpr Dtype native_dtype() {
  if constexpr (std::is_same_v<T, double>) {
    return Dtype::F64;
  } else if constexpr (std::is_same_v<T, float>) {
    return Dtype::F32;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return Dtype::I64;
  } else if constexpr (std::is_same_v<T, std::int32_t>) {
    return Dtype::I32;
  } else if constexpr (std::is_same_v<T, std::int16_t>) {
    return Dtype::I16;
  } else if constexpr (std::is_same_v<T, std::int8_t>) {
    return Dtype::I8;
  } else if constexpr (std::is_same_v<T, std::uint8_t>) {
    return Dtype::U8;
  } else {
    static_assert(always_false_v<T>, "moe::io: no safetensors dtype for this scalar type");
    return Dtype::F32;
  }
}

template <class S>
inline S load(const unsigned char* p) {  // unaligned, host (little-endian) order
  S v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Calls f(i, value) for the n elements at p, with value of the stored C++ type (double, float,
/// std::int64_t, ...; F16/BF16/F8_E4M3 decoded to float; BOOL as 0/1 std::uint8_t). The switch
/// runs once per tensor, not per element.
template <class F>
void for_each_element(Dtype dtype, const unsigned char* p, std::size_t n, F&& f) {
  switch (dtype) {
    case Dtype::F64:
      for (std::size_t i = 0; i < n; ++i) f(i, load<double>(p + 8 * i));
      return;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) f(i, load<float>(p + 4 * i));
      return;
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i) f(i, f16_to_float(load<std::uint16_t>(p + 2 * i)));
      return;
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i) f(i, bf16_to_float(load<std::uint16_t>(p + 2 * i)));
      return;
    case Dtype::F8_E4M3:
      for (std::size_t i = 0; i < n; ++i) f(i, e4m3_to_float(p[i]));
      return;
    case Dtype::I64:
      for (std::size_t i = 0; i < n; ++i) f(i, load<std::int64_t>(p + 8 * i));
      return;
    case Dtype::I32:
      for (std::size_t i = 0; i < n; ++i) f(i, load<std::int32_t>(p + 4 * i));
      return;
    case Dtype::I16:
      for (std::size_t i = 0; i < n; ++i) f(i, load<std::int16_t>(p + 2 * i));
      return;
    case Dtype::I8:
      for (std::size_t i = 0; i < n; ++i) f(i, load<std::int8_t>(p + i));
      return;
    case Dtype::U8:
      for (std::size_t i = 0; i < n; ++i) f(i, p[i]);
      return;
    case Dtype::BOOL:
      for (std::size_t i = 0; i < n; ++i) f(i, static_cast<std::uint8_t>(p[i] != 0));
      return;
  }
}

inline void check_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  if (first != 1) throw io_error("moe: safetensors needs a little-endian host");
}

}  // namespace detail
}  // namespace moe::io
