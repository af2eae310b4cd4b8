// moe: gating policies. A policy turns the router logits of a batch into a Routing: scores,
// the chosen experts of every token and their weights. Policies are template parameters of the
// block (they shape the inner loop); their numbers (renormalisation, groups, capacity) are runtime
// Options validated once against the MoeConfig.
//
// Policy interface (every policy provides):
//   struct Options;                               runtime settings
//   explicit Policy(Options);  void validate(const MoeConfig&) const;
//   Index slots(const MoeConfig&) const;          slots per token in the Routing
//   template <class S> void route(const MoeConfig&, const RouteContext<S>&, Routing<S>&) const;
//     reads routing.logits() (already computed, [T x E]) and writes scores, experts, weights, kept.
//   static constexpr bool uses_bias, uses_noise;   which router parameters the policy needs
#pragma once

#include <cstdint>
#include <random>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe {

/// Per-call inputs of a gating policy besides the logits.
template <class S>
struct RouteContext {
  const S* selection_bias = nullptr;  ///< [E] bias added for selection only (DeepSeek-V3), or null
  const S* noise_logits = nullptr;    ///< [T x E] x * W_noise^T (noisy top-k), or null
  std::mt19937_64* rng = nullptr;     ///< caller-seeded generator for noisy top-k, or null
  bool training = false;              ///< noise and jitter apply only when training
};

namespace gating {

/// Softmax over all experts, then top-k, then (optionally) renormalise the k weights to sum to 1.
///   Mixtral: normalize = true (always). Qwen3-MoE: norm_topk_prob (true in released models).
///   Qwen2-MoE, OLMoE: norm_topk_prob = false, the weights are the raw probabilities.
/// Softmax is taken over all E logits before selection, so without renormalisation this is NOT
/// softmax over the top-k logits. Ties go to the lower expert index.
struct SoftmaxTopK {
  struct Options {
    bool normalize = true;  ///< HF norm_topk_prob (Mixtral: always true)
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = false;

  SoftmaxTopK() = default;
  explicit SoftmaxTopK(Options o) : options(o) {}
  void validate(const MoeConfig&) const {}
  Index slots(const MoeConfig& config) const { return config.top_k; }

  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>&, Routing<S>& routing) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = config.top_k;
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      S* p = &scores(t, 0);
      kernels::softmax(&logits(t, 0), E, p);
      std::int32_t* idx = &experts(t, 0);
      kernels::top_k(p, E, k, idx);
      S sum = 0;
      for (Index j = 0; j < k; ++j) sum += p[idx[j]];
      const S scale = options.normalize ? S(1) / sum : S(1);
      for (Index j = 0; j < k; ++j) {
        weights(t, j) = p[idx[j]] * scale;
        kept(t, j) = 1;
      }
    }
  }

  Options options;
};

/// Mixtral: softmax, top-k, always renormalised.
using Mixtral = SoftmaxTopK;

}  // namespace gating
}  // namespace moe
