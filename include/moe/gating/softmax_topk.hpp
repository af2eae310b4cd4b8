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

  /// Backward: dlogits [T x E] += dL/dz, given dweights [T x k] = dL/d Routing::weights() (zero
  /// on slots not executed):
  ///   p = softmax(z), v_j = p[i_j], w_j = v_j / sum_l v_l (normalize) or v_j;
  ///   dv_j = (dw_j - sum_l dw_l w_l) / sum_l v_l   (normalize) or dw_j;
  ///   dp = scatter(dv),  dz = p * (dp - <p, dp>).
  /// The selection i is piecewise constant (no gradient), as in autograd. O(T (E + k)).
  template <class S>
  void backward(const MoeConfig&, const Routing<S>& routing, const S* dweights, S* dlogits) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = routing.slots();
    const auto scores = routing.scores();
    const auto experts = routing.experts();
    const auto weights = routing.weights();
    for (Index t = 0; t < T; ++t) {
      const S* dw = dweights + t * k;
      double sum = 0, dot = 0;
      for (Index j = 0; j < k; ++j) {
        sum += static_cast<double>(scores(t, experts(t, j)));
        dot += static_cast<double>(dw[j]) * static_cast<double>(weights(t, j));
      }
      auto dv = [&](Index j) {
        return options.normalize ? (static_cast<double>(dw[j]) - dot) / sum
                                 : static_cast<double>(dw[j]);
      };
      double pdp = 0;  // <p, dp> = sum_j p[i_j] dv_j
      for (Index j = 0; j < k; ++j) pdp += static_cast<double>(scores(t, experts(t, j))) * dv(j);
      S* dz = dlogits + t * E;
      for (Index e = 0; e < E; ++e)
        dz[e] -= static_cast<S>(static_cast<double>(scores(t, e)) * pdp);
      for (Index j = 0; j < k; ++j) {
        const Index e = experts(t, j);
        dz[e] += static_cast<S>(static_cast<double>(scores(t, e)) * dv(j));
      }
    }
  }

  Options options;
};

}  // namespace moe::gating
