// libFuzzer target: parse_model_spec on arbitrary text (the config.json reader), then every query
// a loader makes of the spec (sparse layers, prefixes, the gating options of its family).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moe/io/load_weights.hpp"

namespace {

template <class G>
void options_or_config_error(const moe::io::ModelSpec& spec) {
  try {
    (void)moe::io::gating_options<G>(spec);
  } catch (const moe::config_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto spec = moe::io::parse_model_spec(text, "fuzz/config.json");
    // A parsed spec is valid: sizes positive, top_k within num_experts.
    if (spec.moe.d_model <= 0 || spec.moe.num_experts <= 0 || spec.moe.top_k <= 0 ||
        spec.moe.top_k > spec.moe.num_experts || spec.total_layers() <= 0) {
      std::abort();
    }
    const moe::Index layers = std::min<moe::Index>(spec.total_layers(), 64);
    for (moe::Index l = 0; l < layers; ++l) {
      (void)spec.is_moe_layer(l);
      if (spec.moe_prefix(l).empty()) std::abort();
    }
    options_or_config_error<moe::gating::SoftmaxTopK>(spec);
    options_or_config_error<moe::gating::DeepSeekV2>(spec);
    options_or_config_error<moe::gating::GroupLimitedTopK>(spec);
    options_or_config_error<moe::gating::CapacityTopK>(spec);
  } catch (const moe::io_error&) {
  } catch (const moe::config_error&) {
  }
  return 0;
}
