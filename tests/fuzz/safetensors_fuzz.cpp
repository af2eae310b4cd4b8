// libFuzzer target: SafetensorsFile::from_buffer on arbitrary bytes, then every accessor on every
// tensor. Any exception other than moe::io_error, any sanitizer report or any inconsistency
// between the validated header and the reads is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "moe/io/safetensors.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<unsigned char> bytes(data, data + size);
  try {
    const auto file = moe::io::SafetensorsFile::from_buffer(std::move(bytes), "fuzz.safetensors");
    for (const auto& name : file.names()) {
      const auto& info = file.info(name);
      check(file.contains(name));
      check(info.offset + info.nbytes <= size - file.data_section_offset());
      check(static_cast<std::size_t>(info.numel()) * moe::io::dtype_size(info.dtype) ==
            info.nbytes);
      const auto m = file.read_matrix<float>(name);
      check(static_cast<std::int64_t>(m.size()) == info.numel());
      const auto v = file.read_vector<double>(name);
      check(static_cast<std::int64_t>(v.size()) == info.numel());
      if (!moe::io::dtype_is_floating(info.dtype)) {
        try {
          (void)file.read_vector<std::int8_t>(name);  // range-checked narrowing
        } catch (const moe::io_error&) {
        }
      }
      try {
        const auto map = file.map_matrix<float>(name);
        check(map.size() == m.size());
      } catch (const moe::io_error&) {
      }
    }
    std::size_t metadata_bytes = 0;
    for (const auto& kv : file.metadata()) metadata_bytes += kv.first.size() + kv.second.size();
    check(metadata_bytes <= size);
  } catch (const moe::io_error&) {
  }
  return 0;
}
