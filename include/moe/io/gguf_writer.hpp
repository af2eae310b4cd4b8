// moe/io: a writer of GGUF v3 files (tests, conversion of our checkpoints for llama.cpp users).
//
// Writes the layout gguf_reader.hpp reads: header, metadata in insertion order, tensor infos in
// insertion order, zero padding to the alignment, then each tensor's bytes at the next multiple of
// the alignment. The alignment is general.alignment when that key holds a UINT32 power of two,
// else 32; set_alignment() sets the key.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/ggml_types.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/io/gguf_value.hpp"

namespace moe::io {

/// Builds a GGUF v3 file in memory. Keys set twice keep their first position and the last value.
/// Tensor bytes are copied when added.
class GgufWriter {
 public:
  /// Sets `key` to a scalar or string (T: std::uint8_t .. double, bool, std::string).
  template <class T>
  GgufWriter& set(const std::string& key, const T& v) {
    return set_value(key, GgufValue::of(v));
  }
  GgufWriter& set(const std::string& key, const char* v) {
    return set_value(key, GgufValue::of(std::string(v)));
  }
  /// Sets `key` to an array of scalars or strings.
  template <class T>
  GgufWriter& set_array(const std::string& key, const std::vector<T>& items) {
    return set_value(key, GgufValue::array(items));
  }
  /// Sets `key` to any value (nested arrays: GgufValue::array_of_arrays).
  GgufWriter& set_value(const std::string& key, GgufValue v) {
    const auto it = index_.find(key);
    if (it != index_.end()) {
      metadata_[it->second].value = std::move(v);
    } else {
      index_.emplace(key, metadata_.size());
      metadata_.push_back({key, std::move(v)});
    }
    return *this;
  }
  /// Sets general.alignment (UINT32). Throws config_error unless a power of two.
  GgufWriter& set_alignment(std::uint32_t alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
      throw config_error(
          moe::detail::concat("moe: GGUF alignment = ", alignment, " is not a power of two"));
    }
    return set("general.alignment", alignment);
  }

  /// Adds a tensor of ggml type `type` with ggml-order `dims` (dims[0] contiguous) whose stored
  /// bytes are `bytes` (blocks of the type's layout, row after row). Throws io_error for a name
  /// added twice, more than 4 dims, a type without a known layout, dims[0] not a multiple of the
  /// block size, or a byte count other than numel / block_size * type_size.
  GgufWriter& add_tensor(const std::string& name, GgmlType type, std::vector<std::int64_t> dims,
                         const void* bytes, std::size_t nbytes) {
    const GgmlTypeTraits traits = ggml_type_traits(type);
    const std::string where = "moe: GGUF writer: tensor '" + name + "' ";
    if (tensor_names_.count(name)) throw io_error(where + "was added twice");
    if (dims.size() > kGgufMaxDims) {
      throw io_error(
          moe::detail::concat(where, "has ", dims.size(), " dimensions, at most ", kGgufMaxDims));
    }
    if (traits.block_size == 0) {
      throw io_error(moe::detail::concat(where, "has type ", traits.name,
                                         ", whose layout the writer does not know"));
    }
    std::uint64_t numel = 1;
    for (std::int64_t d : dims) {
      if (d < 0) throw io_error(moe::detail::concat(where, "has a negative dimension ", d));
      numel *= static_cast<std::uint64_t>(d);
    }
    const std::uint64_t cols = dims.empty() ? 1 : static_cast<std::uint64_t>(dims[0]);
    if (cols % traits.block_size != 0) {
      throw io_error(moe::detail::concat(where, "has rows of ", cols, " elements, not a multiple ",
                                         "of the ", traits.name, " block size ",
                                         traits.block_size));
    }
    const std::uint64_t expected = numel / traits.block_size * traits.type_size;
    if (expected != nbytes) {
      throw io_error(moe::detail::concat(where, "has ", nbytes, " bytes, expected ", expected,
                                         " for ", traits.name, " dims ",
                                         detail::gguf_dims_str(dims)));
    }
    const auto* p = static_cast<const unsigned char*>(bytes);
    tensors_.push_back({name, type, std::move(dims), std::vector<unsigned char>(p, p + nbytes)});
    tensor_names_.emplace(name, tensors_.size() - 1);
    return *this;
  }

  /// Adds an F32 tensor from a row-major [rows x cols] buffer (dims {cols, rows}).
  GgufWriter& add_f32(const std::string& name, const float* data, std::int64_t rows,
                      std::int64_t cols) {
    return add_tensor(name, GgmlType::F32, {cols, rows}, data,
                      static_cast<std::size_t>(rows * cols) * sizeof(float));
  }

  /// The alignment the layout uses (see the header comment).
  std::size_t alignment() const {
    const auto it = index_.find("general.alignment");
    if (it == index_.end()) return kGgufDefaultAlignment;
    const auto a = metadata_[it->second].value.get<std::uint32_t>();
    return (a && *a != 0 && (*a & (*a - 1)) == 0) ? *a : kGgufDefaultAlignment;
  }

  /// The file's bytes.
  std::vector<unsigned char> to_bytes() const {
    std::vector<unsigned char> out;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    put<std::uint32_t>(out, 3);
    put<std::uint64_t>(out, tensors_.size());
    put<std::uint64_t>(out, metadata_.size());
    for (const auto& kv : metadata_) {
      put_string(out, kv.key);
      put<std::uint32_t>(out, static_cast<std::uint32_t>(kv.value.type()));
      put_value(out, kv.value);
    }
    const std::size_t align = alignment();
    std::size_t offset = 0;
    for (const auto& t : tensors_) {
      put_string(out, t.name);
      put<std::uint32_t>(out, static_cast<std::uint32_t>(t.dims.size()));
      for (std::int64_t d : t.dims) put<std::uint64_t>(out, static_cast<std::uint64_t>(d));
      put<std::uint32_t>(out, static_cast<std::uint32_t>(t.type));
      put<std::uint64_t>(out, offset);
      offset = round_up(offset + t.bytes.size(), align);
    }
    out.resize(round_up(out.size(), align), 0);
    const std::size_t data_start = out.size();
    offset = 0;
    for (const auto& t : tensors_) {
      out.resize(data_start + offset, 0);
      out.insert(out.end(), t.bytes.begin(), t.bytes.end());
      offset = round_up(offset + t.bytes.size(), align);
    }
    return out;
  }

  /// Writes the file. Throws io_error when it cannot be written.
  void write(const std::string& path) const {
    const std::vector<unsigned char> bytes = to_bytes();
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) throw io_error("moe: " + path + ": cannot open for writing");
    const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    if (std::fclose(f) != 0 || !ok) throw io_error("moe: " + path + ": write failed");
  }

 private:
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<std::int64_t> dims;
    std::vector<unsigned char> bytes;
  };

  static std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

  template <class S>
  static void put(std::vector<unsigned char>& out, S v) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }
  static void put_string(std::vector<unsigned char>& out, const std::string& s) {
    put<std::uint64_t>(out, s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  static void put_value(std::vector<unsigned char>& out, const GgufValue& v) {
    switch (v.type()) {
      case GgufValueType::STRING:
        put_string(out, v.string_value());
        return;
      case GgufValueType::ARRAY:
        put<std::uint32_t>(out, static_cast<std::uint32_t>(v.array_type()));
        put<std::uint64_t>(out, v.array_size());
        if (v.array_type() == GgufValueType::STRING) {
          for (const auto& s : v.strings()) put_string(out, s);
        } else if (v.array_type() == GgufValueType::ARRAY) {
          for (const auto& item : v.nested()) put_value(out, item);
        } else {
          out.insert(out.end(), v.packed().begin(), v.packed().end());
        }
        return;
      default: {
        const std::uint64_t bits = v.scalar_bits();
        const auto* p = reinterpret_cast<const unsigned char*>(&bits);
        out.insert(out.end(), p, p + gguf_value_type_size(v.type()));
      }
    }
  }

  std::vector<GgufKeyValue> metadata_;
  std::map<std::string, std::size_t> index_;
  std::vector<Tensor> tensors_;
  std::map<std::string, std::size_t> tensor_names_;
};

}  // namespace moe::io
