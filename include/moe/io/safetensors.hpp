// moe/io: a validating, memory-mapping reader and a writer for the safetensors format.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, N bytes of
// JSON header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"key": "value"}}, then the data section; offsets are relative to its start,
// tensors are row-major and little-endian.
//
// The file is untrusted input: every byte of the header is validated before a tensor is touched,
// and every failure is a moe::io_error naming the file, the tensor and what is wrong.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"
#include "moe/tensor.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe::io {

/// Largest header accepted, in bytes (the reference implementation uses the same 100 MB limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

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

namespace detail {

/// "[2 x 3 x 4]"; "[]" for a scalar.
inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += " x ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// "a JSON number", "a JSON array", ... for messages about a value of the wrong type.
inline std::string json_kind(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return "JSON null";
    case nlohmann::json::value_t::object:
      return "a JSON object";
    case nlohmann::json::value_t::array:
      return "a JSON array";
    case nlohmann::json::value_t::string:
      return "a JSON string";
    case nlohmann::json::value_t::boolean:
      return "a JSON boolean";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return "a JSON number";
    default:
      return "an unexpected JSON value";
  }
}

/// A scalar for a message: its JSON text; a container only by its kind (a dump of a deeply
/// nested untrusted value could be huge).
inline std::string json_brief(const nlohmann::json& j) {
  if (j.is_number() || j.is_boolean() || j.is_null()) return j.dump();
  if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    return s.size() <= 64 ? j.dump() : "a long JSON string";
  }
  return json_kind(j);
}

/// The value of a JSON integer >= 0 (not a float, even an integral one), else nullopt.
inline std::optional<std::uint64_t> json_non_negative_integer(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v >= 0) return static_cast<std::uint64_t>(v);
  }
  return std::nullopt;
}

/// Parses untrusted JSON text with nlohmann-json, rejecting what nlohmann would silently accept:
/// a key repeated in one object (nlohmann keeps the last) and nesting deeper than `max_depth`.
/// `where` starts every message ("moe: file: header"); `top_level_noun` names a top-level key
/// in them ("tensor" for a safetensors header). Throws io_error.
inline nlohmann::json parse_untrusted_json(const char* begin, const char* end,
                                           const std::string& where, int max_depth,
                                           const char* top_level_noun) {
  // Keys seen in each open object, innermost last (hashed: a weight_map may hold 10^5 names);
  // the current top-level key names the entry in messages.
  std::vector<std::unordered_set<std::string>> open_keys;
  std::string top_key;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (depth > max_depth) {
      throw io_error(moe::detail::concat(where, " nests deeper than ", max_depth, " levels"));
    }
    if (event == E::object_start) {
      open_keys.emplace_back();
    } else if (event == E::object_end) {
      if (!open_keys.empty()) open_keys.pop_back();
    } else if (event == E::key && !open_keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_keys.back().insert(key).second) {
        if (open_keys.size() == 1) {
          throw io_error(
              moe::detail::concat(where, ": ", top_level_noun, " '", key, "' appears twice"));
        }
        throw io_error(
            moe::detail::concat(where, ": key '", key, "' appears twice in '", top_key, "'"));
      }
      if (open_keys.size() == 1) top_key = key;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(begin, end, callback, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::exception& e) {
    throw io_error(moe::detail::concat(where, " is not valid JSON: ", e.what()));
  }
}

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

/// A validated safetensors file, memory-mapped read-only (or held in memory by from_buffer).
/// Immutable after construction: every const member may be called from many threads.
/// Move-only; the mapping lives as long as the object, so pointers and maps returned by
/// data()/map_matrix() are valid until it is destroyed. If another process truncates the file
/// while it is mapped, reads fault (SIGBUS): treat checkpoint files as read-only.
class SafetensorsFile {
 public:
  /// Maps `path` and validates its header (see the header comment of this file).
  /// Throws io_error when the file cannot be opened or mapped, or is malformed.
  static SafetensorsFile open(const std::string& path) {
    SafetensorsFile f;
    f.path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      throw io_error(moe::detail::concat("moe: ", path, ": cannot open: ", std::strerror(errno)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(moe::detail::concat("moe: ", path, ": not a regular file"));
    }
    f.size_ = static_cast<std::size_t>(st.st_size);
    if (f.size_ > 0) {
      void* p = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw io_error(moe::detail::concat("moe: ", path, ": cannot map ", f.size_,
                                           " bytes: ", std::strerror(err)));
      }
      f.mapping_ = p;
      f.bytes_ = static_cast<const unsigned char*>(p);
    }
    ::close(fd);  // the mapping keeps the file alive
    f.parse();
    return f;
  }

  /// Takes ownership of an in-memory file (tests, fuzzing). `name` stands for the path in
  /// messages. Same validation as open(); throws io_error.
  static SafetensorsFile from_buffer(std::vector<unsigned char> bytes, std::string name) {
    SafetensorsFile f;
    f.path_ = std::move(name);
    f.buffer_ = std::move(bytes);
    f.bytes_ = f.buffer_.data();
    f.size_ = f.buffer_.size();
    f.parse();
    return f;
  }

  SafetensorsFile(SafetensorsFile&& other) noexcept { swap(other); }
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept {
    if (this != &other) {
      SafetensorsFile tmp(std::move(other));
      swap(tmp);
    }
    return *this;
  }
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile() {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
  }

  /// The path given to open(), or the name given to from_buffer().
  const std::string& path() const { return path_; }

  /// Every tensor name, sorted (std::string order).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  /// Number of tensors.
  std::size_t size() const { return tensors_.size(); }

  /// True when the header lists `name` ("__metadata__" is never a tensor).
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// Dtype, shape and location of `name`. Throws io_error "moe: <file>: no tensor named 'x'".
  const TensorInfo& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      throw io_error(moe::detail::concat("moe: ", path_, ": no tensor named '", name, "'"));
    }
    return it->second;
  }

  /// First byte of `name` inside the mapping (zero-copy; any alignment; info(name).nbytes
  /// bytes). Throws io_error when there is no such tensor.
  const unsigned char* data(const std::string& name) const {
    return data_begin() + info(name).offset;
  }

  /// The "__metadata__" map (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// `name` converted to T (a floating or integer type), as a new [rows x cols] matrix: a scalar
  /// gives [1 x 1], a 1-D tensor of n gives [1 x n], rank > 2 gives [prod(leading dims) x last].
  /// Every floating dtype converts exactly to double (and rounds once to float). Integer and
  /// BOOL dtypes convert to any T; to an integer T only when every value fits. Throws io_error
  /// for a missing tensor, a floating dtype read as an integer T, or an integer out of range.
  template <class T>
  RowMatrix<T> read_matrix(const std::string& name) const {
    const TensorInfo& ti = info(name);
    const auto [rows, cols] = matrix_shape(ti);
    RowMatrix<T> m(rows, cols);
    convert_into(ti, m.data());
    return m;
  }

  /// `name` converted to T and flattened in row-major order (any rank). Same conversions and
  /// errors as read_matrix.
  template <class T>
  std::vector<T> read_vector(const std::string& name) const {
    const TensorInfo& ti = info(name);
    std::vector<T> v(static_cast<std::size_t>(ti.numel()));
    convert_into(ti, v.data());
    return v;
  }

  /// Zero-copy read-only view of `name` with the shape read_matrix would give. T is float (F32),
  /// double (F64) or a fixed-width integer (I64, I32, I16, I8, U8). Throws io_error unless the
  /// stored dtype is exactly T's, or when the tensor's bytes are not aligned to alignof(T) in
  /// memory (files written by write_safetensors and by the Python library are aligned; use
  /// read_matrix for others). Valid as long as this object lives.
  template <class T>
  ConstMap<T> map_matrix(const std::string& name) const {
    constexpr Dtype want = detail::native_dtype<T>();
    const TensorInfo& ti = info(name);
    if (ti.dtype != want) {
      throw io_error(moe::detail::concat("moe: ", path_, ": tensor '", name, "' is ",
                                         dtype_name(ti.dtype), ", cannot map it as ",
                                         dtype_name(want), " (use read_matrix to convert)"));
    }
    const unsigned char* p = data_begin() + ti.offset;
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) {
      throw io_error(moe::detail::concat("moe: ", path_, ": tensor '", name, "' is not aligned to ",
                                         alignof(T),
                                         " bytes in the file, cannot map it (use read_matrix)"));
    }
    const auto [rows, cols] = matrix_shape(ti);
    return ConstMap<T>(reinterpret_cast<const T*>(p), rows, cols);
  }

  /// Offset of the data section from the start of the file (8 + header length).
  std::size_t data_section_offset() const { return data_offset_; }

 private:
  SafetensorsFile() = default;

  void swap(SafetensorsFile& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(buffer_, o.buffer_);
    std::swap(mapping_, o.mapping_);
    std::swap(bytes_, o.bytes_);
    std::swap(size_, o.size_);
    std::swap(data_offset_, o.data_offset_);
    std::swap(tensors_, o.tensors_);
    std::swap(metadata_, o.metadata_);
  }

  const unsigned char* data_begin() const { return bytes_ + data_offset_; }

  std::string where() const { return "moe: " + path_; }

  [[noreturn]] void fail(const std::string& what) const { throw io_error(where() + ": " + what); }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    throw io_error(moe::detail::concat(where(), ": tensor '", name, "' ", what));
  }

  static std::pair<Index, Index> matrix_shape(const TensorInfo& ti) {
    if (ti.shape.empty()) return {1, 1};
    if (ti.shape.size() == 1) return {1, static_cast<Index>(ti.shape[0])};
    std::int64_t rows = 1;  // cannot overflow: validated (zero dims aside, see parse_shape)
    for (std::size_t i = 0; i + 1 < ti.shape.size(); ++i) rows *= ti.shape[i];
    return {static_cast<Index>(rows), static_cast<Index>(ti.shape.back())};
  }

  template <class T>
  void convert_into(const TensorInfo& ti, T* out) const {
    static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                  "moe::io: read into a floating or integer type");
    const unsigned char* p = data_begin() + ti.offset;
    const std::size_t n = static_cast<std::size_t>(ti.numel());
    if (ti.dtype == Dtype::F32 && std::is_same_v<T, float>) {
      if (n) std::memcpy(static_cast<void*>(out), p, n * sizeof(float));
      return;
    }
    if (ti.dtype == Dtype::F64 && std::is_same_v<T, double>) {
      if (n) std::memcpy(static_cast<void*>(out), p, n * sizeof(double));
      return;
    }
    if (std::is_integral_v<T> && dtype_is_floating(ti.dtype)) {
      fail_tensor(ti.name, moe::detail::concat("is ", dtype_name(ti.dtype),
                                               ", cannot convert it to an integer type"));
    }
    detail::for_each_element(ti.dtype, p, n, [&](std::size_t i, auto v) {
      using V = decltype(v);
      if constexpr (std::is_floating_point_v<V>) {
        if constexpr (std::is_floating_point_v<T>) out[i] = static_cast<T>(v);
      } else {
        const auto wide = static_cast<std::int64_t>(v);  // every stored integer fits
        if constexpr (std::is_integral_v<T>) {
          bool ok;
          if constexpr (std::is_signed_v<T>) {
            ok = wide >= static_cast<std::int64_t>(std::numeric_limits<T>::min()) &&
                 wide <= static_cast<std::int64_t>(std::numeric_limits<T>::max());
          } else {
            ok = wide >= 0 && static_cast<std::uint64_t>(wide) <= std::numeric_limits<T>::max();
          }
          if (!ok) {
            fail_tensor(ti.name, moe::detail::concat("element ", i, " = ", wide,
                                                     " does not fit the requested integer type"));
          }
        }
        out[i] = static_cast<T>(wide);
      }
    });
  }

  // ---- validation ----

  void parse() {
    detail::check_little_endian();
    if (size_ < 8) {
      fail(moe::detail::concat("file has ", size_, " bytes, too few for the 8-byte header length"));
    }
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_[i];
    const std::uint64_t after = size_ - 8;
    if (n > kMaxHeaderBytes) {
      fail(moe::detail::concat("header length ", n, " exceeds the limit of ", kMaxHeaderBytes,
                               " bytes"));
    }
    if (n > after) {
      fail(moe::detail::concat("header length ", n, " exceeds the ", after,
                               " bytes that follow it"));
    }
    data_offset_ = static_cast<std::size_t>(8 + n);
    const std::size_t data_size = size_ - data_offset_;
    const char* text = reinterpret_cast<const char*>(bytes_ + 8);
    const nlohmann::json header = detail::parse_untrusted_json(text, text + n, where() + ": header",
                                                               /*max_depth=*/8, "tensor");
    if (!header.is_object()) {
      fail(moe::detail::concat("header is ", detail::json_kind(header), ", expected an object"));
    }
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        parse_metadata(entry);
        continue;
      }
      tensors_.emplace(name, parse_entry(name, entry, data_size));
    }
    // No two tensors may share a byte. Empty tensors occupy nothing.
    std::vector<const TensorInfo*> by_offset;
    for (const auto& kv : tensors_) {
      if (kv.second.nbytes > 0) by_offset.push_back(&kv.second);
    }
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->offset != b->offset ? a->offset < b->offset : a->name < b->name;
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo& a = *by_offset[i - 1];
      const TensorInfo& b = *by_offset[i];
      if (b.offset < a.offset + a.nbytes) {
        fail(moe::detail::concat("tensors '", a.name, "' data_offsets [", a.offset, ", ",
                                 a.offset + a.nbytes, "] and '", b.name, "' data_offsets [",
                                 b.offset, ", ", b.offset + b.nbytes, "] overlap"));
      }
    }
  }

  void parse_metadata(const nlohmann::json& entry) {
    if (!entry.is_object()) {
      fail(moe::detail::concat("__metadata__ is ", detail::json_kind(entry),
                               ", expected an object of strings"));
    }
    for (const auto& [key, value] : entry.items()) {
      if (!value.is_string()) {
        fail(moe::detail::concat("__metadata__ value of '", key, "' is ", detail::json_kind(value),
                                 ", expected a string"));
      }
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry,
                         std::size_t data_size) const {
    if (!entry.is_object()) {
      fail_tensor(name, "entry is " + detail::json_kind(entry) +
                            ", expected an object with dtype, shape and data_offsets");
    }
    // Other keys are ignored, as the reference implementation does.
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) fail_tensor(name, moe::detail::concat("has no '", key, "'"));
    }
    TensorInfo ti;
    ti.name = name;

    const nlohmann::json& dtype = entry["dtype"];
    if (!dtype.is_string()) {
      fail_tensor(name, "dtype is " + detail::json_kind(dtype) + ", expected a string");
    }
    const auto parsed_dtype = dtype_from_name(dtype.get_ref<const std::string&>());
    if (!parsed_dtype) {
      fail_tensor(name, "has unknown dtype " + detail::json_brief(dtype) +
                            " (known: F64, F32, F16, BF16, F8_E4M3, I64, I32, I16, I8, U8, BOOL)");
    }
    ti.dtype = *parsed_dtype;

    const nlohmann::json& shape = entry["shape"];
    if (!shape.is_array()) {
      fail_tensor(name, "shape is " + detail::json_kind(shape) +
                            ", expected an array of non-negative integers");
    }
    // The product of the non-zero dims must fit: then so does every partial product
    // (read_matrix multiplies the leading dims), even when a zero dim makes numel 0.
    std::uint64_t nonzero_product = 1;
    bool overflow = false;
    constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const auto d = detail::json_non_negative_integer(shape[i]);
      if (!d || *d > kMax) {
        fail_tensor(name, moe::detail::concat("shape[", i, "] is ", detail::json_brief(shape[i]),
                                              ", expected a non-negative integer"));
      }
      ti.shape.push_back(static_cast<std::int64_t>(*d));
      if (*d != 0) {
        if (nonzero_product > kMax / *d) overflow = true;
        if (!overflow) nonzero_product *= *d;
      }
    }
    if (overflow) {
      fail_tensor(name, "shape " + detail::shape_str(ti.shape) +
                            " has more elements than a 64-bit count can hold");
    }

    const nlohmann::json& offsets = entry["data_offsets"];
    std::optional<std::uint64_t> begin, end;
    if (offsets.is_array() && offsets.size() == 2) {
      begin = detail::json_non_negative_integer(offsets[0]);
      end = detail::json_non_negative_integer(offsets[1]);
    }
    if (!begin || !end) {
      fail_tensor(name,
                  "data_offsets is " +
                      (offsets.is_array()
                           ? moe::detail::concat("an array of ", offsets.size(), " JSON values")
                           : detail::json_kind(offsets)) +
                      ", expected [begin, end] as two non-negative integers");
    }
    const std::string offsets_str = moe::detail::concat("data_offsets [", *begin, ", ", *end, "]");
    if (*begin > *end) fail_tensor(name, offsets_str + " end before they begin");
    if (*end > data_size) {
      fail_tensor(name, moe::detail::concat(offsets_str, " end beyond the data section of ",
                                            data_size, " bytes"));
    }
    // numel * size cannot overflow once numel is bounded by the data size.
    const std::uint64_t held = *end - *begin;
    const std::uint64_t numel = static_cast<std::uint64_t>(ti.numel());
    const std::uint64_t esize = dtype_size(ti.dtype);
    if (numel > held / esize || numel * esize != held) {
      std::string needs = numel <= std::numeric_limits<std::uint64_t>::max() / esize
                              ? std::to_string(numel * esize)
                              : "more than 2^64";
      fail_tensor(name, moe::detail::concat(offsets_str, " hold ", held, " bytes, but shape ",
                                            detail::shape_str(ti.shape), " of ",
                                            dtype_name(ti.dtype), " needs ", needs));
    }
    ti.offset = static_cast<std::size_t>(*begin);
    ti.nbytes = static_cast<std::size_t>(held);
    return ti;
  }

  std::string path_;
  std::vector<unsigned char> buffer_;  // from_buffer storage
  void* mapping_ = nullptr;            // open() storage
  const unsigned char* bytes_ = nullptr;
  std::size_t size_ = 0;
  std::size_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// A tensor to write: `bytes` holds numel * dtype_size(dtype) bytes, row-major, little-endian.
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};

/// Writes a safetensors file readable by SafetensorsFile and by the Python library. Tensors are
/// laid out as the Python writer does (by decreasing dtype size, then name), with no gaps, and
/// the header is padded with spaces to a multiple of 8 bytes, so every tensor is aligned to its
/// element size. Throws io_error for a duplicate or reserved name ("__metadata__"), a negative
/// dim, a byte count that disagrees with the shape, or a failed write (the file is then removed).
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  detail::check_little_endian();
  const std::string where = "moe: " + path + ": ";
  std::vector<const TensorToWrite*> order;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw io_error(where + "'__metadata__' is not a tensor name");
    if (!seen.insert(t.name).second) throw io_error(where + "tensor '" + t.name + "' given twice");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const std::size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json md = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header["__metadata__"] = std::move(md);
  }
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    const TensorToWrite& t = *order[i];
    // Byte count with overflow saturating at UINT64_MAX (which no vector can hold).
    constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
    std::uint64_t need = dtype_size(t.dtype);
    bool zero = false;
    for (std::int64_t d : t.shape) {
      if (d < 0) {
        throw io_error(where + "tensor '" + t.name + "' has a negative dim in shape " +
                       detail::shape_str(t.shape));
      }
      const auto ud = static_cast<std::uint64_t>(d);
      zero = zero || ud == 0;
      need = (ud != 0 && need > kMax / ud) ? kMax : need * ud;
    }
    if (zero) need = 0;
    if (t.bytes.size() != need) {
      throw io_error(moe::detail::concat(
          where, "tensor '", t.name, "' has ", t.bytes.size(), " bytes, but shape ",
          detail::shape_str(t.shape), " of ", dtype_name(t.dtype), " needs ",
          need == kMax ? std::string("more than 2^64") : std::to_string(need)));
    }
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = dtype_name(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + need};
    header[t.name] = std::move(e);
    offset += need;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len[8];
  std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw io_error(where + "cannot create: " + std::strerror(errno));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const TensorToWrite* t : order) {
    out.write(reinterpret_cast<const char*>(t->bytes.data()),
              static_cast<std::streamsize>(t->bytes.size()));
  }
  out.close();
  if (!out) {
    std::remove(path.c_str());
    throw io_error(where + "write failed");
  }
}

/// Converts a row-major matrix to a tensor of dtype `stored` with shape [rows, cols]: floating
/// dtypes round to nearest even in one step (E4M3 overflow gives NaN, see double_to_e4m3);
/// integer dtypes and BOOL need every value integral and in range (BOOL: 0 or 1). Throws
/// io_error otherwise (message names the tensor and the first offending element).
template <class T>
TensorToWrite make_tensor(std::string name, const RowMatrix<T>& m,
                          Dtype stored = detail::native_dtype<T>()) {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "moe::io: write from a floating or integer type");
  TensorToWrite t;
  t.name = std::move(name);
  t.dtype = stored;
  t.shape = {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())};
  const std::size_t n = static_cast<std::size_t>(m.size());
  const std::size_t es = dtype_size(stored);
  t.bytes.resize(n * es);
  unsigned char* out = t.bytes.data();
  auto store = [&](std::size_t i, auto v) { std::memcpy(out + i * es, &v, sizeof v); };
  for (std::size_t i = 0; i < n; ++i) {
    const T v = m.data()[i];
    const double d = static_cast<double>(v);
    switch (stored) {
      case Dtype::F64:
        store(i, d);
        continue;
      case Dtype::F32:
        store(i, static_cast<float>(v));
        continue;
      case Dtype::F16:
        store(i, double_to_f16(d));
        continue;
      case Dtype::BF16:
        store(i, double_to_bf16(d));
        continue;
      case Dtype::F8_E4M3:
        store(i, double_to_e4m3(d));
        continue;
      default:
        break;
    }
    // Integer dtypes: exact values only.
    std::int64_t lo = 0, hi = 1;
    switch (stored) {
      case Dtype::I64:
        lo = std::numeric_limits<std::int64_t>::min();
        hi = std::numeric_limits<std::int64_t>::max();
        break;
      case Dtype::I32:
        lo = std::numeric_limits<std::int32_t>::min();
        hi = std::numeric_limits<std::int32_t>::max();
        break;
      case Dtype::I16:
        lo = std::numeric_limits<std::int16_t>::min();
        hi = std::numeric_limits<std::int16_t>::max();
        break;
      case Dtype::I8:
        lo = std::numeric_limits<std::int8_t>::min();
        hi = std::numeric_limits<std::int8_t>::max();
        break;
      case Dtype::U8:
        hi = 255;
        break;
      default:  // BOOL
        break;
    }
    std::int64_t iv = 0;
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      // [-2^63, 2^63) is exactly representable as double bounds.
      ok = std::isfinite(d) && d == std::trunc(d) && d >= -9223372036854775808.0 &&
           d < 9223372036854775808.0;
      if (ok) iv = static_cast<std::int64_t>(d);
    } else if constexpr (std::is_unsigned_v<T>) {
      ok = static_cast<std::uint64_t>(v) <=
           static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      iv = static_cast<std::int64_t>(v);
    } else {
      ok = true;
      iv = static_cast<std::int64_t>(v);
    }
    ok = ok && iv >= lo && iv <= hi;
    if (!ok) {
      throw io_error(moe::detail::concat("moe: tensor '", t.name, "': element ", i, " = ", v,
                                         " cannot be stored exactly as ", dtype_name(stored)));
    }
    switch (stored) {
      case Dtype::I64:
        store(i, iv);
        break;
      case Dtype::I32:
        store(i, static_cast<std::int32_t>(iv));
        break;
      case Dtype::I16:
        store(i, static_cast<std::int16_t>(iv));
        break;
      case Dtype::I8:
        store(i, static_cast<std::int8_t>(iv));
        break;
      default:  // U8, BOOL
        store(i, static_cast<std::uint8_t>(iv));
        break;
    }
  }
  return t;
}

}  // namespace moe::io
