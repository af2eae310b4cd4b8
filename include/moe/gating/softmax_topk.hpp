// moe: softmax over all experts, then top-k (Mixtral, Qwen2/3-MoE, OLMoE and their relatives).
#pragma once

#include "moe/config.hpp"
#include "moe/gating/common.hpp"
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

}  // namespace moe::gating
