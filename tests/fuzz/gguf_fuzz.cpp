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

void touch_all(const moe::io::GgufFile& file, const std::string& key) {
  touch<std::uint8_t>(file, key);
  touch<std::int8_t>(file, key);
  touch<std::uint16_t>(file, key);
  touch<std::int16_t>(file, key);
  touch<std::uint32_t>(file, key);
  touch<std::int32_t>(file, key);
  touch<float>(file, key);
  touch<bool>(file, key);
  touch<std::string>(file, key);
  touch<std::uint64_t>(file, key);
  touch<std::int64_t>(file, key);
  touch<double>(file, key);
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
