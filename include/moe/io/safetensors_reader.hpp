// moe/io: a validating, memory-mapping reader for the safetensors format.
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
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"
#include "moe/io/json.hpp"
#include "moe/io/mapped_file.hpp"
#include "moe/io/tensor_info.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// Largest header accepted, in bytes (the reference implementation uses the same 100 MB limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

/// A validated safetensors file, memory-mapped read-only (or held in memory by from_buffer).
/// Immutable after construction: every const member may be called from many threads.
/// Move-only; the mapping lives as long as the object, so pointers and maps returned by
/// data()/map_matrix() are valid until it is destroyed. If another process truncates the file
/// while it is mapped, reads fault (SIGBUS): treat checkpoint files as read-only.
class SafetensorsFile {
 public:
  /// Maps `path` (MappedFile::open) and validates its header (see the header comment of this
  /// file). Throws io_error when the file cannot be opened or mapped, or is malformed.
  static SafetensorsFile open(const std::string& path) {
    return SafetensorsFile(MappedFile::open(path));
  }

  /// Takes ownership of an in-memory file (tests, fuzzing). `name` stands for the path in
  /// messages. Same validation as open(); throws io_error.
  static SafetensorsFile from_buffer(std::vector<unsigned char> bytes, std::string name) {
    return SafetensorsFile(MappedFile::from_buffer(std::move(bytes), std::move(name)));
  }

  // Move-only (MappedFile): a moved file's bytes stay where they were, so pointers into them
  // survive the move.
  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile() = default;

  /// True for a memory-mapped file (open()), false for one held in memory (from_buffer()).
  bool mapped() const { return file_.mapped(); }

  /// The path given to open(), or the name given to from_buffer().
  const std::string& path() const { return file_.name(); }

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
      throw io_error(moe::detail::concat("moe: ", file_.name(), ": no tensor named '", name, "'"));
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

  /// Rows [first_row, first_row + rows) of the [R x C] matrix read_matrix would give, converted
  /// to T; only those rows' bytes are touched (one expert's slice of a fused [E, 2F, D] tensor is
  /// rows [e 2F, (e + 1) 2F)). Throws io_error for a missing tensor or a row range outside
  /// [0, R), plus read_matrix's conversion errors.
  template <class T>
  RowMatrix<T> read_rows(const std::string& name, Index first_row, Index rows) const {
    const TensorInfo& ti = info(name);
    const auto [all_rows, cols] = matrix_shape(ti);
    if (first_row < 0 || rows < 0 || first_row > all_rows - rows) {
      fail_tensor(name, moe::detail::concat("has ", all_rows, " rows, cannot read rows [",
                                            first_row, ", ", first_row + rows, ")"));
    }
    TensorInfo part = ti;
    const std::size_t row_bytes = static_cast<std::size_t>(cols) * dtype_size(ti.dtype);
    part.offset = ti.offset + static_cast<std::size_t>(first_row) * row_bytes;
    part.nbytes = static_cast<std::size_t>(rows) * row_bytes;
    part.shape = {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)};
    RowMatrix<T> m(rows, cols);
    convert_into(part, m.data());
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
      throw io_error(moe::detail::concat("moe: ", file_.name(), ": tensor '", name, "' is ",
                                         dtype_name(ti.dtype), ", cannot map it as ",
                                         dtype_name(want), " (use read_matrix to convert)"));
    }
    const unsigned char* p = data_begin() + ti.offset;
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) {
      throw io_error(moe::detail::concat("moe: ", file_.name(), ": tensor '", name,
                                         "' is not aligned to ", alignof(T),
                                         " bytes in the file, cannot map it (use read_matrix)"));
    }
    const auto [rows, cols] = matrix_shape(ti);
    return ConstMap<T>(reinterpret_cast<const T*>(p), rows, cols);
  }

  /// Offset of the data section from the start of the file (8 + header length).
  std::size_t data_section_offset() const { return data_offset_; }

 private:
  explicit SafetensorsFile(MappedFile file) : file_(std::move(file)) { parse(); }

  const unsigned char* data_begin() const { return file_.data() + data_offset_; }

  std::string where() const { return "moe: " + file_.name(); }

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

  // The source pages of the tensor leave RSS once converted (MappedFile::release).
  template <class T>
  void convert_into(const TensorInfo& ti, T* out) const {
    convert_bytes(ti, out);
    file_.release(data_offset_ + ti.offset, ti.nbytes);
  }

  template <class T>
  void convert_bytes(const TensorInfo& ti, T* out) const {
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
    if (file_.size() < 8) {
      fail(moe::detail::concat("file has ", file_.size(),
                               " bytes, too few for the 8-byte header length"));
    }
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | file_.data()[i];
    const std::uint64_t after = file_.size() - 8;
    if (n > kMaxHeaderBytes) {
      fail(moe::detail::concat("header length ", n, " exceeds the limit of ", kMaxHeaderBytes,
                               " bytes"));
    }
    if (n > after) {
      fail(moe::detail::concat("header length ", n, " exceeds the ", after,
                               " bytes that follow it"));
    }
    data_offset_ = static_cast<std::size_t>(8 + n);
    const std::size_t data_size = file_.size() - data_offset_;
    const char* text = reinterpret_cast<const char*>(file_.data() + 8);
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

  MappedFile file_;  // the bytes: mapped (open) or owned (from_buffer)
  std::size_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moe::io
