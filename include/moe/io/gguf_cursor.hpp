// moe/io: the byte-level parsing of GGUF (internal to gguf_reader.hpp): a cursor that never reads
// past the end, metadata values read recursively with every count checked against the bytes left,
// and the spellings of types and dims in messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/gguf_value.hpp"

namespace moe::io {

/// Alignment of the data section and of tensor offsets when general.alignment is absent.
inline constexpr std::uint32_t kGgufDefaultAlignment = 32;
/// Most dimensions a ggml tensor has (GGML_MAX_DIMS).
inline constexpr std::uint32_t kGgufMaxDims = 4;
/// Deepest nesting of arrays accepted (ggml itself writes none; the limit bounds recursion).
inline constexpr int kGgufMaxArrayDepth = 8;
/// Most arrays nested inside arrays in one file: each costs ~12 bytes of file and ~130 bytes of
/// memory, so the cap bounds what a small hostile file can make the reader allocate.
inline constexpr std::size_t kGgufMaxNestedArrays = std::size_t{1} << 20;

namespace detail {

/// "[4096, 14336, 8]": dims in file (ggml) order.
inline std::string gguf_dims_str(const std::vector<std::int64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

/// "UINT32", or "ARRAY of UINT32" for an array: the spelling of a value's type in messages.
inline std::string gguf_type_label(const GgufValue& v) {
  if (v.type() != GgufValueType::ARRAY) return gguf_value_type_name(v.type());
  return std::string("ARRAY of ") + gguf_value_type_name(v.array_type());
}

/// Reads little-endian fields from the validated front of a byte range, refusing to pass its end.
class GgufCursor {
 public:
  GgufCursor(const unsigned char* bytes, std::size_t size, std::string where)
      : bytes_(bytes), size_(size), where_(std::move(where)) {}

  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return size_ - pos_; }
  const std::string& where() const { return where_; }

  [[noreturn]] void fail(const std::string& context, const std::string& what) const {
    throw io_error(moe::detail::concat(where_, ": ", context, what));
  }

  /// The next n bytes. `what` names the field for the message ("the value type", ...).
  const unsigned char* take(std::size_t n, const std::string& context, const char* what) {
    if (n > remaining()) {
      fail(context, moe::detail::concat(what, " needs ", n, " bytes at offset ", pos_, ", only ",
                                        remaining(), " remain"));
    }
    const unsigned char* p = bytes_ + pos_;
    pos_ += n;
    return p;
  }

  template <class S>
  S read(const std::string& context, const char* what) {
    S v;
    std::memcpy(&v, take(sizeof v, context, what), sizeof v);
    return v;
  }

  std::string read_string(const std::string& context, const char* what) {
    const auto n = read<std::uint64_t>(context, what);
    if (n > remaining()) {
      fail(context, moe::detail::concat(what, " length ", n, " runs past the end of the file (",
                                        remaining(), " bytes remain at offset ", pos_, ")"));
    }
    const auto* p = reinterpret_cast<const char*>(bytes_ + pos_);
    pos_ += static_cast<std::size_t>(n);
    return std::string(p, static_cast<std::size_t>(n));
  }

  /// Counts `n` more arrays nested in arrays; throws past kGgufMaxNestedArrays.
  void count_nested(std::size_t n, const std::string& context) {
    nested_ += n;
    if (nested_ > kGgufMaxNestedArrays) {
      fail(context, moe::detail::concat("the file nests more than ", kGgufMaxNestedArrays,
                                        " arrays in arrays"));
    }
  }

 private:
  const unsigned char* bytes_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::size_t nested_ = 0;
  std::string where_;
};

/// Reads one value of type `type` (whose tag was validated) at the cursor. `context` names the
/// key ("metadata key 'x': "); `depth` counts enclosing arrays.
inline GgufValue read_gguf_value(GgufCursor& in, GgufValueType type, const std::string& context,
                                 int depth) {
  if (type == GgufValueType::STRING) {
    return GgufValue::from_string(in.read_string(context, "string"));
  }
  if (type != GgufValueType::ARRAY) {
    const std::size_t size = gguf_value_type_size(type);
    const unsigned char* p = in.take(size, context, gguf_value_type_name(type));
    if (type == GgufValueType::BOOL && *p > 1) {
      in.fail(context, moe::detail::concat("BOOL value ", int(*p), " is neither 0 nor 1"));
    }
    return GgufValue::from_bytes(type, p);
  }
  if (depth >= kGgufMaxArrayDepth) {
    in.fail(context,
            moe::detail::concat("arrays nest deeper than ", kGgufMaxArrayDepth, " levels"));
  }
  const auto elem_tag = in.read<std::uint32_t>(context, "the array element type");
  if (elem_tag >= kGgufValueTypeCount) {
    in.fail(context, moe::detail::concat("array has unknown element type ", elem_tag));
  }
  const auto elem = static_cast<GgufValueType>(elem_tag);
  const auto count = in.read<std::uint64_t>(context, "the array count");
  // Smallest stored element: a fixed-size value, an empty string (u64), an empty array (u32 + u64).
  const std::size_t min_elem = elem == GgufValueType::STRING  ? 8
                               : elem == GgufValueType::ARRAY ? 12
                                                              : gguf_value_type_size(elem);
  if (count > in.remaining() / min_elem) {
    in.fail(context, moe::detail::concat("array of ", count, ' ', gguf_value_type_name(elem),
                                         " values cannot fit in the ", in.remaining(),
                                         " bytes that remain"));
  }
  const auto n = static_cast<std::size_t>(count);
  if (elem == GgufValueType::STRING) {
    std::vector<std::string> strings;
    strings.reserve(n);
    for (std::size_t i = 0; i < n; ++i) strings.push_back(in.read_string(context, "string"));
    return GgufValue::from_strings(std::move(strings));
  }
  if (elem == GgufValueType::ARRAY) {
    in.count_nested(n, context);
    std::vector<GgufValue> items;
    items.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      items.push_back(read_gguf_value(in, GgufValueType::ARRAY, context, depth + 1));
    }
    return GgufValue::array_of_arrays(std::move(items));
  }
  const unsigned char* p = in.take(n * min_elem, context, "the array elements");
  if (elem == GgufValueType::BOOL) {
    for (std::size_t i = 0; i < n; ++i) {
      if (p[i] > 1) {
        in.fail(context, moe::detail::concat("BOOL array element ", i, " = ", int(p[i]),
                                             " is neither 0 nor 1"));
      }
    }
  }
  return GgufValue::from_packed(elem, n, std::vector<unsigned char>(p, p + n * min_elem));
}

/// a * b, or false when it exceeds `limit`.
inline bool gguf_mul_within(std::uint64_t a, std::uint64_t b, std::uint64_t limit,
                            std::uint64_t& out) {
  if (a != 0 && b > limit / a) return false;
  out = a * b;
  return true;
}

}  // namespace detail

}  // namespace moe::io
