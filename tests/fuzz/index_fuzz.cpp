// libFuzzer target: parse_weight_map on arbitrary text (the model.safetensors.index.json reader).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moe/io/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto map = moe::io::parse_weight_map(text, "fuzz.index.json");
    for (const auto& kv : map) {
      if (kv.second.empty() || kv.second.find('/') != std::string::npos) std::abort();
    }
  } catch (const moe::io_error&) {
  }
  return 0;
}
