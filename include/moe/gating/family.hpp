// moe: model-family names as gating types. A family type is a generic policy whose
// default-constructed Options are that family's published behaviour, so
// SparseMoeBlock<float, gating::Olmoe>(cfg, w) routes as OLMoE does with no further argument.
#pragma once

#include <type_traits>

#include "moe/gating/capacity.hpp"
#include "moe/gating/group_limited.hpp"
#include "moe/gating/softmax_topk.hpp"

namespace moe::gating {

/// Base of every family type: `Policy` (a generic policy) whose Options default to
/// `Name::defaults()`. `Name` derives from FamilyPolicy<Policy, Name> and declares
///   static typename Policy::Options defaults();
/// The family's Options converts implicitly from the generic policy's Options, so the generic
/// presets (SoftmaxTopK::Options::qwen3_moe(false), ...) and a loader's output can be passed to a
/// family type unchanged; every field stays settable, defaults are only the starting point.
/// A family type is a Policy (derived), so everything written for Policy (its backward, the
/// statistics) applies to it.
template <class Policy, class Name>
struct FamilyPolicy : Policy {
  /// The generic policy this family configures.
  using Generic = Policy;

  /// Policy::Options, default-constructed to the family's published behaviour.
  struct Options : Policy::Options {
    Options() : Policy::Options(Name::defaults()) {}
    /// Takes generic Options as given (implicit: presets and loader output convert).
    Options(const typename Policy::Options& o)  // NOLINT(google-explicit-constructor)
        : Policy::Options(o) {}
  };

  FamilyPolicy() : Policy(Options()) {}
  explicit FamilyPolicy(const Options& o) : Policy(o) {}
};

/// The generic policy of G: FamilyPolicy's Policy for a family type, G itself otherwise. Code that
/// dispatches on the policy kind (a loader filling Options) matches generic_policy_t<G>.
template <class G, class = void>
struct generic_policy {
  using type = G;
};
template <class G>
struct generic_policy<G, std::void_t<typename G::Generic>> {
  using type = typename G::Generic;
};
template <class G>
using generic_policy_t = typename generic_policy<G>::type;

/// Mixtral (HF MixtralSparseMoeBlock): softmax over E, top-k, always renormalised.
struct Mixtral : FamilyPolicy<SoftmaxTopK, Mixtral> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options::mixtral(); }
};

/// Qwen2-MoE (Qwen2MoeSparseMoeBlock): softmax, top-k, no renormalisation (norm_topk_prob
/// defaults to false in Qwen2MoeConfig and in the released Qwen1.5-MoE / Qwen2-57B-A14B). Pair
/// with the gated shared expert: MoeConfig::shared_d_ff = shared_expert_intermediate_size,
/// shared_expert_gate = true.
struct Qwen2Moe : FamilyPolicy<SoftmaxTopK, Qwen2Moe> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options::qwen2_moe(false); }
};

/// Qwen3-MoE (Qwen3MoeSparseMoeBlock): softmax, top-k, renormalised (norm_topk_prob true in the
/// released Qwen3-30B-A3B / 235B-A22B).
struct Qwen3Moe : FamilyPolicy<SoftmaxTopK, Qwen3Moe> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options::qwen3_moe(true); }
};

/// OLMoE (OlmoeSparseMoeBlock): softmax, top-k, the raw probabilities (norm_topk_prob false).
struct Olmoe : FamilyPolicy<SoftmaxTopK, Olmoe> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options::olmoe(false); }
};

/// DeepSeek-V2 (DeepseekV2Moe, topk_method "group_limited_greedy"): softmax over E, groups scored
/// by their largest probability, the best topk_group kept, top-k, no renormalisation, weights
/// x routed_scaling_factor. Defaults: the released DeepSeek-V2 (236B) config, n_group 8,
/// topk_group 3, routed_scaling_factor 16. DeepSeek-V2-Lite routes greedily: n_group = 1,
/// topk_group = 1, routed_scaling_factor 1 (what the loader fills from config.json). The router
/// steps run in float32, as HF's (float32 = true; the backward pass treats them as exact).
struct DeepSeekV2 : FamilyPolicy<BasicGroupLimitedTopK<false>, DeepSeekV2> {
  using FamilyPolicy::FamilyPolicy;
  static BasicGroupLimitedTopK<false>::Options defaults() {
    auto o = BasicGroupLimitedTopK<false>::Options::deepseek_v2(8, 3, 16.0);
    o.float32 = true;
    return o;
  }
};

/// DeepSeek-V3 (DeepseekV3MoE, topk_method "noaux_tc"; also R1, V3.1, Kimi K2 style): sigmoid,
/// selection bias e_score_correction_bias (MoeWeights::router_bias), groups scored by the sum of
/// their two largest biased scores, the best topk_group kept (others -inf), top-k, weights the
/// unbiased scores / (sum + 1e-20) x routed_scaling_factor. Defaults: DeepseekV3Config and the
/// released V3, n_group 8, topk_group 4, routed_scaling_factor 2.5, norm_topk_prob true; the
/// router steps in float32 as HF's (float32 = true).
struct DeepSeekV3 : FamilyPolicy<BasicGroupLimitedTopK<true>, DeepSeekV3> {
  using FamilyPolicy::FamilyPolicy;
  static BasicGroupLimitedTopK<true>::Options defaults() {
    auto o = BasicGroupLimitedTopK<true>::Options::deepseek_v3(8, 4, 2.5, true);
    o.float32 = true;
    return o;
  }
};

/// Switch Transformers (SwitchTransformersSparseMLP; use with top_k = 1 and ReluMlp): top-1, the
/// top-1 probability as weight, an absolute expert_capacity with first-come-first-served
/// priority. Default: SwitchTransformersConfig's expert_capacity = 64 (clamped to the batch, so a
/// batch of at most 64 tokens drops nothing, as HF 5.17 as shipped).
struct SwitchTop1 : FamilyPolicy<CapacityTopK, SwitchTop1> {
  using FamilyPolicy::FamilyPolicy;
  static CapacityTopK::Options defaults() { return CapacityTopK::Options::switch_transformers(64); }
};

/// GShard (Lepikhin et al. 2020, algorithm 1; use with top_k = 2): capacity
/// ceil(capacity_factor * k * T / E) with capacity_factor 1 (the paper's 2 * ceil(T / E) up to
/// rounding), all first choices before any second choice, kept weights renormalised after
/// dropping.
struct GShardTop2 : FamilyPolicy<CapacityTopK, GShardTop2> {
  using FamilyPolicy::FamilyPolicy;
  static CapacityTopK::Options defaults() { return CapacityTopK::Options::gshard(1.0); }
};

}  // namespace moe::gating
