// moe: gating policies. A policy turns the router logits of a batch into a Routing: scores,
// the chosen experts of every token and their weights. Policies are template parameters of the
// block (they shape the inner loop); their numbers (renormalisation, groups, capacity) are runtime
// Options validated once against the MoeConfig.
//
// Policy interface (every policy provides):
//   struct Options;                               runtime settings (presets as static functions)
//   explicit Policy(Options);  void validate(const MoeConfig&) const;
//   Index slots(const MoeConfig&) const;          slots per token in the Routing
//   template <class S> void route(const MoeConfig&, const RouteContext<S>&, Routing<S>&) const;
//     reads routing.logits() (already computed, [T x E]) and writes scores, experts, weights, kept.
//   static constexpr bool uses_bias, uses_noise;   which router parameters the policy needs
//
// The families (docs/families.md has the table):
//   SoftmaxTopK        Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE           (this file)
//   GroupLimitedTopK   DeepSeek-V3; DeepSeekV2 without the bias      (gating/group_limited.hpp)
//   CapacityTopK       Switch (k = 1), GShard (k = 2), dropless       (gating/capacity.hpp)
//   NoisyTopK          Shazeer et al. 2017                            (gating/noisy.hpp)
//   ExpertChoice       Zhou et al. 2022 (not causal)                  (gating/expert_choice.hpp)
//
// Conventions shared by every top-k policy: slots hold the chosen experts in descending weight,
// ties going to the lower expert index; a policy never writes an expert outside [0, E) into a
// kept slot, even for NaN logits (NaN ranks below every number).
#pragma once

#include <cstdint>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// Softmax over all experts, then top-k, then (optionally) renormalise the k weights to sum to 1.
///   Mixtral: normalize = true (always). Qwen3-MoE: norm_topk_prob (true in released models).
///   Qwen2-MoE, OLMoE: norm_topk_prob = false, the weights are the raw probabilities.
/// Softmax is taken over all E logits before selection, so without renormalisation this is NOT
/// softmax over the top-k logits. Ties go to the lower expert index.
/// Source: HF transformers MixtralTopKRouter, Qwen2MoeSparseMoeBlock, Qwen3MoeTopKRouter,
/// OlmoeTopKRouter (FORMAT.md 5.1-5.3): p = softmax(z); (v, i) = topk(p, k);
/// w = norm_topk_prob ? v / sum(v) : v (no epsilon in the denominator).
struct SoftmaxTopK {
  struct Options {
    bool normalize = true;  ///< HF norm_topk_prob (Mixtral: always true)

    /// Mixtral: always renormalised.
    static Options mixtral() { return Options{true}; }
    /// Qwen2-MoE: norm_topk_prob defaults to false (pair with the gated shared expert:
    /// MoeConfig::shared_d_ff = shared_expert_intermediate_size, shared_expert_gate = true).
    static Options qwen2_moe(bool norm_topk_prob = false) { return Options{norm_topk_prob}; }
    /// Qwen3-MoE: norm_topk_prob, true in the released models.
    static Options qwen3_moe(bool norm_topk_prob = true) { return Options{norm_topk_prob}; }
    /// OLMoE: norm_topk_prob = false.
    static Options olmoe(bool norm_topk_prob = false) { return Options{norm_topk_prob}; }
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = false;

  SoftmaxTopK() = default;
  explicit SoftmaxTopK(Options o) : options(o) {}
  /// Nothing to check beyond MoeConfig::validate (1 <= top_k <= num_experts).
  void validate(const MoeConfig&) const {}
  Index slots(const MoeConfig& config) const { return config.top_k; }

  /// Writes scores = softmax(logits) [T x E] and the k slots of every token. O(T E k).
  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>&, Routing<S>& routing) const {
    detail::softmax_top_k(config.top_k, options.normalize, routing);
  }

  Options options;
};

/// Mixtral: softmax, top-k, always renormalised (SoftmaxTopK::Options::mixtral(), the default).
using Mixtral = SoftmaxTopK;
/// Qwen2-MoE: pass SoftmaxTopK::Options::qwen2_moe() (no renormalisation) and a gated shared
/// expert in the MoeConfig.
using Qwen2Moe = SoftmaxTopK;
/// Qwen3-MoE: pass SoftmaxTopK::Options::qwen3_moe(norm_topk_prob).
using Qwen3Moe = SoftmaxTopK;
/// OLMoE: pass SoftmaxTopK::Options::olmoe() (no renormalisation).
using Olmoe = SoftmaxTopK;

}  // namespace moe::gating

#include "moe/gating/capacity.hpp"       // IWYU pragma: export
#include "moe/gating/expert_choice.hpp"  // IWYU pragma: export
#include "moe/gating/group_limited.hpp"  // IWYU pragma: export
#include "moe/gating/noisy.hpp"          // IWYU pragma: export
