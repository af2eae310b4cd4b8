// The block type and options of every v1 golden family (tests/data/reference), for the MPI tests
// that replay the golden files through the expert-parallel block.
#pragma once

#include <string>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case.hpp"

namespace moe::mpi_test {

/// Every v1 golden file, as gtest parameters named by the file's stem.
inline const auto kGoldenFiles =
    ::testing::Values("mixtral.safetensors", "mixtral_mask.safetensors", "olmoe.safetensors",
                      "qwen2_moe.safetensors", "qwen3_moe.safetensors", "deepseek_v3.safetensors",
                      "switch.safetensors", "switch_capacity.safetensors");
inline std::string golden_test_name(const ::testing::TestParamInfo<std::string>& info) {
  return info.param.substr(0, info.param.find('.'));
}

/// The gating and FFN types of a family, as a value.
template <class G, class F>
struct Family {
  using Gating = G;
  using Ffn = F;
};

/// Calls check(Family<G, Ffn>{}, weights, options) with the family's types, its full weights in
/// T and its options; FAILs on a family without a mapping.
template <class T, class Check>
void with_golden_family(const golden::Case& c, const MoeConfig& config, Check&& check) {
  const std::string family = c.meta("family");
  if (family == "mixtral" || family == "qwen2_moe" || family == "qwen3_moe" || family == "olmoe") {
    gating::SoftmaxTopK::Options o;
    const bool family_default = family == "mixtral" || family == "qwen3_moe";
    o.normalize = family == "mixtral" ? true : c.meta_bool_or("norm_topk_prob", family_default);
    check(Family<gating::SoftmaxTopK, SwiGLU>{}, c.weights<T>(config, true, false), o);
  } else if (family == "deepseek_v3") {
    const Index n_group = c.meta_int_or("n_group", 1), topk_group = c.meta_int_or("topk_group", 1);
    const double scaling = c.meta_double_or("routed_scaling_factor", 1.0);
    const bool normalize = c.meta_bool_or("norm_topk_prob", true);
    ASSERT_TRUE(c.has("router.bias"));
    using G = gating::GroupLimitedTopK;
    check(Family<G, SwiGLU>{}, c.weights<T>(config, true, true),
          G::Options::deepseek_v3(n_group, topk_group, scaling, normalize));
  } else if (family == "switch") {
    const std::string rule = c.meta_or("capacity_rule", "none in effect");
    const Index capacity = c.meta_int_or("capacity", 0);
    const bool dropless = rule.rfind("none in effect", 0) == 0 || capacity <= 0;
    using G = gating::CapacityTopK;
    const auto o = dropless ? G::Options::dropless() : G::Options::switch_transformers(capacity);
    check(Family<G, ReluMlp>{}, c.weights<T>(config, false, false), o);
  } else {
    FAIL() << family << " has no expert-parallel mapping";
  }
}

}  // namespace moe::mpi_test
