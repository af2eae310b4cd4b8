// moe/io: a validating, memory-mapping reader of GGUF files (llama.cpp's model format).
//
// Layout (ggml/docs/gguf.md), all little-endian:
//   u32 magic "GGUF" | u32 version (2 or 3) | u64 tensor_count | u64 metadata_kv_count
//   metadata_kv_count x { string key | u32 value_type | value }
//   tensor_count x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset }
//   padding to general.alignment (u32, default 32) | data section
// A string is a u64 byte count and the bytes (no terminator). An array value is a u32 element type,
// a u64 count and the elements; elements may be arrays. dims[0] is the innermost (contiguous)
// dimension: a PyTorch [out x in] weight is stored with dims {in, out}. Tensor offsets are relative
// to the data section and multiples of the alignment.
//
// The file is untrusted input: every count, length, type tag, dimension, offset and range is
// checked against the bytes that remain before it is used, and every failure is a moe::io_error
// naming the file, the key or tensor, and what is wrong.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/ggml_types.hpp"
#include "moe/io/gguf_cursor.hpp"
#include "moe/io/gguf_value.hpp"
#include "moe/io/mapped_file.hpp"

namespace moe::io {

/// One tensor of a validated GGUF file.
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<std::int64_t> dims;  ///< ggml order: dims[0] is the contiguous (row) dimension.
  std::size_t offset = 0;          ///< First byte, relative to the data section; aligned.
  std::size_t nbytes = 0;          ///< numel / block_size * type_size; inside the file.

  /// Elements per row: dims[0] (1 for a tensor without dimensions).
  std::int64_t cols() const { return dims.empty() ? 1 : dims[0]; }
  /// Rows: product of dims[1..] (1 for 0 or 1 dimensions). Validation bounds the product of the
  /// non-zero dims by 2^63 - 1, so no product of dims overflows.
  std::int64_t rows() const {
    std::int64_t r = 1;
    for (std::size_t i = 1; i < dims.size(); ++i) r *= dims[i];
    return r;
  }
  /// Element count (0 when a dim is 0).
  std::int64_t numel() const { return cols() * rows(); }
  /// Row-major shape, PyTorch's order: dims reversed ([experts, out, in] for stacked experts).
  std::vector<std::int64_t> shape() const { return {dims.rbegin(), dims.rend()}; }
};

/// A metadata key and its value, in file order.
struct GgufKeyValue {
  std::string key;
  GgufValue value;
};

/// A validated GGUF file (v2 or v3, little-endian), memory-mapped read-only or held in memory.
/// Immutable after construction: every const member may be called from many threads. Move-only;
/// pointers from data() live as long as the object.
class GgufFile {
 public:
  /// Maps `path` and validates it (see the header comment). Throws io_error.
  static GgufFile open(const std::string& path) { return GgufFile(MappedFile::open(path)); }

  /// Validates in-memory bytes (tests, fuzzing); `name` stands for the path in messages.
  static GgufFile from_buffer(std::vector<unsigned char> bytes, std::string name) {
    return GgufFile(MappedFile::from_buffer(std::move(bytes), std::move(name)));
  }

  /// The path given to open(), or the name given to from_buffer().
  const std::string& path() const { return file_.name(); }
  /// The format version (2 or 3; they share one layout).
  std::uint32_t version() const { return version_; }
  /// general.alignment, or 32 when absent.
  std::size_t alignment() const { return alignment_; }
  /// Offset of the data section from the start of the file.
  std::size_t data_section_offset() const { return data_offset_; }
  /// Total bytes of the file.
  std::size_t file_size() const { return file_.size(); }

  // ---- metadata ----

  /// Every key/value pair, in file order.
  const std::vector<GgufKeyValue>& metadata() const { return metadata_; }
  /// True when the file holds `key`.
  bool contains_key(const std::string& key) const { return key_index_.count(key) != 0; }
  /// The value of `key`, or nullptr.
  const GgufValue* find(const std::string& key) const {
    const auto it = key_index_.find(key);
    return it == key_index_.end() ? nullptr : &metadata_[it->second].value;
  }
  /// The value of `key`. Throws io_error "moe: <file>: no metadata key 'k'".
  const GgufValue& value(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) fail(moe::detail::concat("no metadata key '", key, "'"));
    return *v;
  }

  /// The scalar (or string) `key` holds, read as exactly T (std::uint32_t for UINT32, float for
  /// FLOAT32, bool, std::string, ...). Throws io_error for a missing key or another type:
  /// "moe: <file>: metadata key 'k' is INT32, expected UINT32".
  template <class T>
  T get(const std::string& key) const {
    const GgufValue& v = value(key);
    const auto out = v.template get<T>();
    if (!out) wrong_type(key, v, gguf_value_type_name(gguf_value_type_of<T>()));
    return *out;
  }
  std::uint32_t get_u32(const std::string& key) const { return get<std::uint32_t>(key); }
  std::int32_t get_i32(const std::string& key) const { return get<std::int32_t>(key); }
  std::uint64_t get_u64(const std::string& key) const { return get<std::uint64_t>(key); }
  float get_f32(const std::string& key) const { return get<float>(key); }
  bool get_bool(const std::string& key) const { return get<bool>(key); }
  std::string get_string(const std::string& key) const { return get<std::string>(key); }

  /// Any integer type holding a value >= 0 (writers store counts as UINT32, INT32 or UINT64).
  /// Throws io_error for a missing key, a non-integer or a negative value.
  std::uint64_t get_unsigned(const std::string& key) const {
    const GgufValue& v = value(key);
    const auto out = v.get_unsigned();
    if (!out) {
      if (v.type() == GgufValueType::INT8 || v.type() == GgufValueType::INT16 ||
          v.type() == GgufValueType::INT32 || v.type() == GgufValueType::INT64) {
        fail(moe::detail::concat("metadata key '", key, "' is negative, expected a count"));
      }
      wrong_type(key, v, "an unsigned integer");
    }
    return *out;
  }

  /// The elements of the array `key`, whose element type must be exactly T's.
  /// Throws io_error for a missing key or another type ("is ARRAY of INT32, expected ARRAY of
  /// UINT32").
  template <class T>
  std::vector<T> get_array(const std::string& key) const {
    const GgufValue& v = value(key);
    auto out = v.template get_array<T>();
    if (!out) {
      wrong_type(key, v, std::string("ARRAY of ") + gguf_value_type_name(gguf_value_type_of<T>()));
    }
    return std::move(*out);
  }

  // ---- tensors ----

  /// Every tensor, in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  /// True when the file holds a tensor `name`.
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  /// The tensor `name`. Throws io_error "moe: <file>: no tensor named 'x'".
  const GgufTensorInfo& tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    if (it == tensor_index_.end()) fail(moe::detail::concat("no tensor named '", name, "'"));
    return tensors_[it->second];
  }
  /// First byte of a tensor's data (zero-copy; aligned to alignment() relative to the data
  /// section; info.nbytes bytes).
  const unsigned char* data(const GgufTensorInfo& info) const {
    return file_.data() + data_offset_ + info.offset;
  }
  const unsigned char* data(const std::string& name) const { return data(tensor(name)); }

 private:
  explicit GgufFile(MappedFile file) : file_(std::move(file)) { parse(); }

  std::string where() const { return "moe: " + file_.name(); }
  [[noreturn]] void fail(const std::string& what) const { throw io_error(where() + ": " + what); }
  [[noreturn]] void wrong_type(const std::string& key, const GgufValue& v,
                               const std::string& expected) const {
    fail(moe::detail::concat("metadata key '", key, "' is ", detail::gguf_type_label(v),
                             ", expected ", expected));
  }

  void parse() {
    const std::uint16_t one = 1;
    unsigned char first;
    std::memcpy(&first, &one, 1);
    if (first != 1) fail("reading GGUF needs a little-endian host");
    constexpr std::size_t kHeaderBytes = 4 + 4 + 8 + 8;
    if (file_.size() < kHeaderBytes) {
      fail(moe::detail::concat("file has ", file_.size(), " bytes, too few for the ", kHeaderBytes,
                               "-byte GGUF header"));
    }
    detail::GgufCursor in(file_.data(), file_.size(), where());
    const unsigned char* magic = in.take(4, "", "the magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) {
      fail(moe::detail::concat("not a GGUF file: the first 4 bytes are 0x", hex(magic[0]),
                               hex(magic[1]), hex(magic[2]), hex(magic[3]), ", expected \"GGUF\""));
    }
    version_ = in.read<std::uint32_t>("", "the version");
    if (version_ != 2 && version_ != 3) {
      fail(moe::detail::concat("GGUF version ", version_, " is not supported (2 and 3 are",
                               version_ > 0xFFFF ? "; a big-endian file?)" : ")"));
    }
    const auto tensor_count = in.read<std::uint64_t>("", "the tensor count");
    const auto kv_count = in.read<std::uint64_t>("", "the metadata count");
    // A key/value takes at least 13 bytes (u64 length, u32 type, 1-byte value); a tensor info 24
    // (u64 length, u32 n_dims, u32 type, u64 offset). Larger counts cannot be honest.
    if (kv_count > in.remaining() / 13) {
      fail(moe::detail::concat("metadata count ", kv_count, " cannot fit in the ", in.remaining(),
                               " bytes that follow the header"));
    }
    if (tensor_count > in.remaining() / 24) {
      fail(moe::detail::concat("tensor count ", tensor_count, " cannot fit in the ", in.remaining(),
                               " bytes that follow the header"));
    }
    read_metadata(in, static_cast<std::size_t>(kv_count));
    read_alignment();
    read_tensor_infos(in, static_cast<std::size_t>(tensor_count));
    // The data section starts at the next multiple of the alignment (from the file start).
    const std::size_t end_of_infos = in.pos();
    data_offset_ = end_of_infos + (alignment_ - end_of_infos % alignment_) % alignment_;
    if (!tensors_.empty() && data_offset_ > file_.size()) {
      fail(moe::detail::concat("data section starts at offset ", data_offset_,
                               ", past the end of the file (", file_.size(), " bytes)"));
    }
    check_tensor_ranges();
  }

  static std::string hex(unsigned char b) {
    const char* digits = "0123456789abcdef";
    return {digits[b >> 4], digits[b & 15]};
  }

  void read_metadata(detail::GgufCursor& in, std::size_t count) {
    metadata_.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      const std::string index_context = moe::detail::concat("metadata key #", i, ": ");
      std::string key = in.read_string(index_context, "key");
      const std::string context = moe::detail::concat("metadata key '", key, "': ");
      const auto tag = in.read<std::uint32_t>(context, "the value type");
      if (tag >= kGgufValueTypeCount) {
        in.fail(context, moe::detail::concat("unknown value type ", tag));
      }
      GgufValue value = detail::read_gguf_value(in, static_cast<GgufValueType>(tag), context, 0);
      if (!key_index_.emplace(key, metadata_.size()).second) {
        fail(moe::detail::concat("metadata key '", key, "' appears twice"));
      }
      metadata_.push_back({std::move(key), std::move(value)});
    }
  }

  void read_alignment() {
    const GgufValue* v = find("general.alignment");
    if (v == nullptr) return;
    const auto a = v->get<std::uint32_t>();
    if (!a) wrong_type("general.alignment", *v, "UINT32");
    if (*a == 0 || (*a & (*a - 1)) != 0) {
      fail(moe::detail::concat("general.alignment = ", *a, " is not a power of two"));
    }
    alignment_ = *a;
  }

  void read_tensor_infos(detail::GgufCursor& in, std::size_t count) {
    constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    tensors_.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      GgufTensorInfo t;
      t.name = in.read_string(moe::detail::concat("tensor info #", i, ": "), "name");
      const std::string context = moe::detail::concat("tensor '", t.name, "': ");
      const auto n_dims = in.read<std::uint32_t>(context, "the dimension count");
      if (n_dims > kGgufMaxDims) {
        in.fail(context, moe::detail::concat("has ", n_dims, " dimensions, at most ", kGgufMaxDims,
                                             " are allowed"));
      }
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto n = in.read<std::uint64_t>(context, "a dimension");
        if (n > kMax) {
          in.fail(context, moe::detail::concat("dimension ", d, " = ", n, " exceeds 2^63 - 1"));
        }
        t.dims.push_back(static_cast<std::int64_t>(n));
      }
      const auto type_id = in.read<std::uint32_t>(context, "the type");
      const auto traits = ggml_type_traits(type_id);
      if (!traits) in.fail(context, moe::detail::concat("unknown ggml type ", type_id));
      if (traits->block_size == 0) {
        in.fail(context, moe::detail::concat("ggml type ", ggml_type_label(type_id),
                                             " has a block layout this reader does not know"));
      }
      t.type = static_cast<GgmlType>(type_id);
      const auto offset = in.read<std::uint64_t>(context, "the offset");
      // The product of the non-zero dims must fit in int64 even when a zero makes the element
      // count 0: rows() and shape products must never overflow (found by gguf_fuzz).
      std::uint64_t nonzero_product = 1;
      for (std::int64_t d : t.dims) {
        if (d != 0 && !detail::gguf_mul_within(nonzero_product, static_cast<std::uint64_t>(d), kMax,
                                               nonzero_product)) {
          in.fail(context, moe::detail::concat("dimensions ", detail::gguf_dims_str(t.dims),
                                               " overflow: the product of the non-zero ones "
                                               "exceeds 2^63 - 1"));
        }
      }
      const bool any_zero = std::find(t.dims.begin(), t.dims.end(), 0) != t.dims.end();
      const std::uint64_t numel = any_zero ? 0 : nonzero_product;
      if (static_cast<std::uint64_t>(t.cols()) % traits->block_size != 0) {
        in.fail(context,
                moe::detail::concat("rows of ", t.cols(), " elements (dimension 0) are not",
                                    " a multiple of the ", traits->name, " block size ",
                                    traits->block_size));
      }
      std::uint64_t nbytes = 0;
      if (!detail::gguf_mul_within(numel / traits->block_size, traits->type_size, file_.size(),
                                   nbytes)) {
        in.fail(context, moe::detail::concat("dimensions ", detail::gguf_dims_str(t.dims), " of ",
                                             traits->name, " need more bytes than the file's ",
                                             file_.size()));
      }
      if (offset % alignment_ != 0) {
        in.fail(context, moe::detail::concat("offset ", offset, " is not a multiple of the ",
                                             "alignment ", alignment_));
      }
      if (offset > file_.size()) {
        in.fail(context, moe::detail::concat("offset ", offset, " lies past the end of the file (",
                                             file_.size(), " bytes)"));
      }
      t.offset = static_cast<std::size_t>(offset);
      t.nbytes = static_cast<std::size_t>(nbytes);
      if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
        fail(moe::detail::concat("tensor '", t.name, "' appears twice"));
      }
      tensors_.push_back(std::move(t));
    }
  }

  void check_tensor_ranges() const {
    const std::size_t data_size = file_.size() - std::min(data_offset_, file_.size());
    std::vector<const GgufTensorInfo*> by_offset;
    for (const auto& t : tensors_) {
      if (t.nbytes > data_size || t.offset > data_size - t.nbytes) {
        fail(moe::detail::concat("tensor '", t.name, "': data [", t.offset, ", ",
                                 t.offset + t.nbytes, ") runs past the end of the data section (",
                                 data_size, " bytes)"));
      }
      if (t.nbytes > 0) by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const GgufTensorInfo* a, const GgufTensorInfo* b) {
                return a->offset != b->offset ? a->offset < b->offset : a->name < b->name;
              });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const GgufTensorInfo& a = *by_offset[i - 1];
      const GgufTensorInfo& b = *by_offset[i];
      if (b.offset < a.offset + a.nbytes) {
        fail(moe::detail::concat("tensors '", a.name, "' [", a.offset, ", ", a.offset + a.nbytes,
                                 ") and '", b.name, "' [", b.offset, ", ", b.offset + b.nbytes,
                                 ") overlap"));
      }
    }
  }

  MappedFile file_;
  std::uint32_t version_ = 0;
  std::size_t alignment_ = kGgufDefaultAlignment;
  std::size_t data_offset_ = 0;
  std::vector<GgufKeyValue> metadata_;
  std::map<std::string, std::size_t> key_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

}  // namespace moe::io
