// moe/io: one metadata value of a GGUF file (a scalar, a string or an array, arrays nesting).
//
// GGUF stores each value with a u32 type tag (GgufValueType). Values are read by exact type:
// get<std::uint32_t>() of an INT32 value is nullopt, never a conversion; GgufFile's accessors
// turn that into an io_error naming the key and both types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe::io {

/// The type tag of a GGUF metadata value (gguf.h numbering).
enum class GgufValueType : std::uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};

/// Number of value types (tags 0 .. kGgufValueTypeCount - 1 are valid).
inline constexpr std::uint32_t kGgufValueTypeCount = 13;

/// "UINT32", "ARRAY", ...; "?" for a tag out of range.
inline const char* gguf_value_type_name(GgufValueType type) {
  static const char* const names[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                      "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                      "UINT64", "INT64",   "FLOAT64"};
  const auto i = static_cast<std::uint32_t>(type);
  return i < kGgufValueTypeCount ? names[i] : "?";
}

/// Bytes of one stored value of a fixed-size type (1, 2, 4 or 8); 0 for STRING and ARRAY.
inline std::size_t gguf_value_type_size(GgufValueType type) {
  switch (type) {
    case GgufValueType::UINT8:
    case GgufValueType::INT8:
    case GgufValueType::BOOL:
      return 1;
    case GgufValueType::UINT16:
    case GgufValueType::INT16:
      return 2;
    case GgufValueType::UINT32:
    case GgufValueType::INT32:
    case GgufValueType::FLOAT32:
      return 4;
    case GgufValueType::UINT64:
    case GgufValueType::INT64:
    case GgufValueType::FLOAT64:
      return 8;
    case GgufValueType::STRING:
    case GgufValueType::ARRAY:
      return 0;
  }
  return 0;
}

/// The value type a C++ type reads and writes: std::uint8_t .. double, bool, std::string.
template <class T>
constexpr GgufValueType gguf_value_type_of() {
  if constexpr (std::is_same_v<T, std::uint8_t>)
    return GgufValueType::UINT8;
  else if constexpr (std::is_same_v<T, std::int8_t>)
    return GgufValueType::INT8;
  else if constexpr (std::is_same_v<T, std::uint16_t>)
    return GgufValueType::UINT16;
  else if constexpr (std::is_same_v<T, std::int16_t>)
    return GgufValueType::INT16;
  else if constexpr (std::is_same_v<T, std::uint32_t>)
    return GgufValueType::UINT32;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return GgufValueType::INT32;
  else if constexpr (std::is_same_v<T, float>)
    return GgufValueType::FLOAT32;
  else if constexpr (std::is_same_v<T, bool>)
    return GgufValueType::BOOL;
  else if constexpr (std::is_same_v<T, std::string>)
    return GgufValueType::STRING;
  else if constexpr (std::is_same_v<T, std::uint64_t>)
    return GgufValueType::UINT64;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return GgufValueType::INT64;
  else if constexpr (std::is_same_v<T, double>)
    return GgufValueType::FLOAT64;
  else
    static_assert(sizeof(T) == 0, "moe::io: no GGUF value type for this C++ type");
}

/// A metadata value. Scalars keep their stored bytes; an array keeps its element type and either
/// the packed elements (fixed-size types), the strings, or the nested arrays.
class GgufValue {
 public:
  /// A scalar or a string.
  template <class T>
  static GgufValue of(const T& v) {
    GgufValue out;
    out.type_ = gguf_value_type_of<T>();
    if constexpr (std::is_same_v<T, std::string>) {
      out.string_ = v;
    } else if constexpr (std::is_same_v<T, bool>) {
      out.bits_ = v ? 1 : 0;
    } else {
      std::memcpy(&out.bits_, &v, sizeof v);
    }
    return out;
  }
  static GgufValue of(const char* s) { return of(std::string(s)); }

  /// An array of scalars or strings (possibly empty).
  template <class T>
  static GgufValue array(const std::vector<T>& items) {
    GgufValue out;
    out.type_ = GgufValueType::ARRAY;
    out.elem_type_ = gguf_value_type_of<T>();
    out.count_ = items.size();
    if constexpr (std::is_same_v<T, std::string>) {
      out.strings_ = items;
    } else {
      for (const T& v : items) {
        if constexpr (std::is_same_v<T, bool>) {
          out.raw_.push_back(v ? 1 : 0);
        } else {
          const auto* p = reinterpret_cast<const unsigned char*>(&v);
          out.raw_.insert(out.raw_.end(), p, p + sizeof v);
        }
      }
    }
    return out;
  }

  /// An array whose elements are arrays (each may have its own element type).
  static GgufValue array_of_arrays(std::vector<GgufValue> items) {
    GgufValue out;
    out.type_ = GgufValueType::ARRAY;
    out.elem_type_ = GgufValueType::ARRAY;
    out.count_ = items.size();
    out.items_ = std::move(items);
    return out;
  }

  GgufValueType type() const { return type_; }
  /// Element type of an array (meaningless for other types).
  GgufValueType array_type() const { return elem_type_; }
  /// Element count of an array; 0 for other types.
  std::size_t array_size() const { return count_; }

  /// The value when it is a scalar of exactly T's type (or a string for T = std::string).
  template <class T>
  std::optional<T> get() const {
    if (type_ != gguf_value_type_of<T>()) return std::nullopt;
    if constexpr (std::is_same_v<T, std::string>) {
      return string_;
    } else if constexpr (std::is_same_v<T, bool>) {
      return bits_ != 0;
    } else {
      T v;
      std::memcpy(&v, &bits_, sizeof v);
      return v;
    }
  }

  /// The elements when this is an array of exactly T's type.
  template <class T>
  std::optional<std::vector<T>> get_array() const {
    if (type_ != GgufValueType::ARRAY || elem_type_ != gguf_value_type_of<T>()) return std::nullopt;
    if constexpr (std::is_same_v<T, std::string>) {
      return strings_;
    } else {
      std::vector<T> out(count_);
      for (std::size_t i = 0; i < count_; ++i) {
        if constexpr (std::is_same_v<T, bool>) {
          out[i] = raw_[i] != 0;
        } else {
          std::memcpy(&out[i], raw_.data() + i * sizeof(T), sizeof(T));
        }
      }
      return out;
    }
  }

  /// The elements of an array of arrays (empty for any other value).
  const std::vector<GgufValue>& nested() const { return items_; }

  /// The integer value of any integer type (UINT8 .. INT64) when it is >= 0; nullopt for other
  /// types and negative values. For counts that writers store with varying widths.
  std::optional<std::uint64_t> get_unsigned() const {
    switch (type_) {
      case GgufValueType::UINT8:
      case GgufValueType::UINT16:
      case GgufValueType::UINT32:
      case GgufValueType::UINT64:
        return bits_;  // zero-extended on read
      case GgufValueType::INT8:
        return signed_or_none(static_cast<std::int8_t>(bits_));
      case GgufValueType::INT16:
        return signed_or_none(static_cast<std::int16_t>(bits_));
      case GgufValueType::INT32:
        return signed_or_none(static_cast<std::int32_t>(bits_));
      case GgufValueType::INT64:
        return signed_or_none(static_cast<std::int64_t>(bits_));
      default:
        return std::nullopt;
    }
  }

  // ---- used by the reader: raw construction from validated bytes ----

  /// A scalar of a fixed-size type from its `gguf_value_type_size(type)` little-endian bytes.
  static GgufValue from_bytes(GgufValueType type, const unsigned char* p) {
    GgufValue out;
    out.type_ = type;
    std::memcpy(&out.bits_, p, gguf_value_type_size(type));  // bits_ starts at 0: zero-extends
    return out;
  }
  /// A string value.
  static GgufValue from_string(std::string s) {
    GgufValue out;
    out.type_ = GgufValueType::STRING;
    out.string_ = std::move(s);
    return out;
  }
  /// An array of `count` fixed-size elements packed in `bytes`.
  static GgufValue from_packed(GgufValueType elem, std::size_t count,
                               std::vector<unsigned char> bytes) {
    GgufValue out;
    out.type_ = GgufValueType::ARRAY;
    out.elem_type_ = elem;
    out.count_ = count;
    out.raw_ = std::move(bytes);
    return out;
  }
  /// An array of strings.
  static GgufValue from_strings(std::vector<std::string> strings) {
    GgufValue out;
    out.type_ = GgufValueType::ARRAY;
    out.elem_type_ = GgufValueType::STRING;
    out.count_ = strings.size();
    out.strings_ = std::move(strings);
    return out;
  }

  /// Packed little-endian elements of a fixed-size array (writer, tests).
  const std::vector<unsigned char>& packed() const { return raw_; }
  /// Strings of a string array (writer).
  const std::vector<std::string>& strings() const { return strings_; }
  /// Stored bytes of a fixed-size scalar, zero-extended to 64 bits (writer).
  std::uint64_t scalar_bits() const { return bits_; }
  /// The string of a STRING value (writer).
  const std::string& string_value() const { return string_; }

 private:
  template <class S>
  static std::optional<std::uint64_t> signed_or_none(S v) {
    if (v < 0) return std::nullopt;
    return static_cast<std::uint64_t>(v);
  }

  GgufValueType type_ = GgufValueType::UINT8;
  GgufValueType elem_type_ = GgufValueType::UINT8;
  std::size_t count_ = 0;
  std::uint64_t bits_ = 0;
  std::string string_;
  std::vector<unsigned char> raw_;
  std::vector<std::string> strings_;
  std::vector<GgufValue> items_;
};

}  // namespace moe::io
