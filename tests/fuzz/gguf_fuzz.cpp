// libFuzzer target: GgufFile::from_buffer on arbitrary bytes, then every accessor on every key and
// tensor, and the float decode of every tensor whose type moe decodes. Any exception other than
// moe::io_error, any sanitizer report or any inconsistency between the validated layout and the
// reads is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "moe/io/gguf.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

/// Reads `key` as T, scalar and array; a mismatch must be an io_error.
template <class T>
void touch(const moe::io::GgufFile& file, const std::string& key) {
  try {
    (void)file.get<T>(key);
  } catch (const moe::io_error&) {
  }
  try {
    (void)file.get_array<T>(key);
  } catch (const moe::io_error&) {
  }
}

/// The accessor of the value's own type (scalar or array element type), and one of another type
/// (each throws on a mismatch; exceptions are slow, so not every type is tried on every key).
void touch_all(const moe::io::GgufFile& file, const std::string& key) {
  using moe::io::GgufValueType;
  const moe::io::GgufValue& v = file.value(key);
  const GgufValueType t = v.type() == GgufValueType::ARRAY ? v.array_type() : v.type();
  switch (t) {
    case GgufValueType::UINT8:
      touch<std::uint8_t>(file, key);
      break;
    case GgufValueType::INT8:
      touch<std::int8_t>(file, key);
      break;
    case GgufValueType::UINT16:
      touch<std::uint16_t>(file, key);
      break;
    case GgufValueType::INT16:
      touch<std::int16_t>(file, key);
      break;
    case GgufValueType::UINT32:
      touch<std::uint32_t>(file, key);
      break;
    case GgufValueType::INT32:
      touch<std::int32_t>(file, key);
      break;
    case GgufValueType::FLOAT32:
      touch<float>(file, key);
      break;
    case GgufValueType::BOOL:
      touch<bool>(file, key);
      break;
    case GgufValueType::STRING:
      touch<std::string>(file, key);
      break;
    case GgufValueType::UINT64:
      touch<std::uint64_t>(file, key);
      break;
    case GgufValueType::INT64:
      touch<std::int64_t>(file, key);
      break;
    case GgufValueType::FLOAT64:
      touch<double>(file, key);
      break;
    case GgufValueType::ARRAY:
      for (const auto& item : v.nested()) check(item.type() == GgufValueType::ARRAY);
      break;
  }
  try {
    (void)file.get<std::uint32_t>(key);
    check(v.type() == GgufValueType::UINT32);
  } catch (const moe::io_error&) {
    check(v.type() != GgufValueType::UINT32);
  }
  try {
    (void)file.get_unsigned(key);
  } catch (const moe::io_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<unsigned char> bytes(data, data + size);
  try {
    const auto file = moe::io::GgufFile::from_buffer(std::move(bytes), "fuzz.gguf");
    check(file.version() == 2 || file.version() == 3);
    check(file.alignment() > 0 && (file.alignment() & (file.alignment() - 1)) == 0);
    for (const auto& kv : file.metadata()) {
      check(file.find(kv.key) == &kv.value);
      touch_all(file, kv.key);
    }
    const std::size_t data_size = size - std::min(size, file.data_section_offset());
    for (const auto& t : file.tensors()) {
      check(&file.tensor(t.name) == &t);
      check(t.offset % file.alignment() == 0);
      check(t.offset + t.nbytes <= data_size);
      const auto traits = moe::io::ggml_type_traits(t.type);
      check(static_cast<std::size_t>(t.numel()) / traits.block_size * traits.type_size == t.nbytes);
      check(t.rows() * t.cols() == t.numel() || t.numel() == 0);
      if (moe::io::ggml_type_decodes_to_float(t.type)) {
        const auto m = moe::io::gguf_to_float(file, t.name);
        check(m.size() == t.numel());
      } else {
        try {
          (void)moe::io::gguf_to_float(file, t.name);
          std::abort();  // an undecodable type must be refused
        } catch (const moe::io_error&) {
        }
      }
    }
  } catch (const moe::io_error&) {
  }
  return 0;
}
