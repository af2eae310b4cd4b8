// moe: expert-choice routing (Zhou et al. 2022).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// Expert-choice routing, Zhou et al. 2022 ("Mixture-of-Experts with Expert Choice Routing"),
/// section 3.1: S = softmax(z) [T x E]; every expert e takes the c tokens with the largest
/// S[:, e] (ties: lower token index), c = min(T, ceil(capacity_factor * T / E));
///   y_t = sum over the experts e that chose t, in expert order, of S[t, e] * FFN_e(x_t).
/// A token may get zero, one or several experts; every expert gets exactly c tokens.
///
/// NOT CAUSAL: whether token t is routed depends on the other tokens of the batch (later ones
/// included), so it cannot be used for autoregressive decoding, and a token's output changes with
/// the batch it is in.
///
/// Routing layout: slots = num_experts, slot j of token t is expert j: experts(t, j) = j and
/// kept = 1 when expert j chose t, else experts(t, j) = -1, kept = 0, weight 0.
/// MoeConfig::top_k is not used (any valid value, 1 for instance).
struct ExpertChoice {
  struct Options {
    double capacity_factor = 1.0;  ///< c = min(T, ceil(capacity_factor * T / E)); Zhou: 1 or 2
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = false;

  ExpertChoice() = default;
  explicit ExpertChoice(Options o) : options(o) {}

  /// Throws config_error unless capacity_factor is finite and positive.
  void validate(const MoeConfig&) const {
    detail::require_positive_real("capacity_factor", options.capacity_factor);
  }
  Index slots(const MoeConfig& config) const { return config.num_experts; }

  /// Tokens per expert for a batch: min(T, ceil(capacity_factor * T / E)).
  Index capacity(Index num_tokens, Index num_experts) const {
    const double c = std::ceil(options.capacity_factor * static_cast<double>(num_tokens) /
                               static_cast<double>(num_experts));
    return c >= static_cast<double>(num_tokens) ? num_tokens : static_cast<Index>(c);
  }

  /// Writes scores = softmax(z) and the E slots of every token. O(T E log c); uses the experts
  /// buffer as its scratch, no allocation.
  template <class S>
  void route(const MoeConfig&, const RouteContext<S>&, Routing<S>& routing) const {
    const Index T = routing.num_tokens(), E = routing.num_experts();
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) kernels::softmax(&logits(t, 0), E, &scores(t, 0));
    const Index c = capacity(T, E);
    // Phase 1: expert e's chosen tokens in experts_flat[e*T, e*T + c) (the [T x E] experts
    // buffer has exactly E * T entries). Phase 2 marks them in kept; phase 3 rewrites experts.
    std::int32_t* flat = experts.data();
    for (Index e = 0; e < E; ++e) {
      std::int32_t* order = flat + e * T;
      for (Index t = 0; t < T; ++t) order[t] = static_cast<std::int32_t>(t);
      std::partial_sort(order, order + c, order + T, [&](std::int32_t a, std::int32_t b) {
        return detail::slot_before(scores(a, e), a, scores(b, e), b);
      });
    }
    kept.setZero();
    for (Index e = 0; e < E; ++e) {
      const std::int32_t* order = flat + e * T;
      for (Index i = 0; i < c; ++i) kept(order[i], e) = 1;
    }
    for (Index t = 0; t < T; ++t) {
      for (Index e = 0; e < E; ++e) {
        const bool chosen = kept(t, e) != 0;
        experts(t, e) = chosen ? static_cast<std::int32_t>(e) : -1;
        weights(t, e) = chosen ? scores(t, e) : S(0);
      }
    }
  }

  /// Backward: slot e of token t holds weight S[t, e] = softmax(z_t)_e when expert e chose t, so
  /// dS = dw (zero where not chosen) and dz += S * (dS - <S, dS>). The choice itself (top-c
  /// tokens per expert) has no gradient. dweights and dlogits are [T x E].
  template <class S>
  void backward(const MoeConfig&, const Routing<S>& routing, const S* dweights, S* dlogits) const {
    const Index T = routing.num_tokens(), E = routing.num_experts();
    const auto scores = routing.scores();
    for (Index t = 0; t < T; ++t) {
      const S* dw = dweights + t * E;
      double dot = 0;
      for (Index e = 0; e < E; ++e)
        dot += static_cast<double>(scores(t, e)) * static_cast<double>(dw[e]);
      for (Index e = 0; e < E; ++e) {
        dlogits[t * E + e] +=
            static_cast<S>(static_cast<double>(scores(t, e)) * (static_cast<double>(dw[e]) - dot));
      }
    }
  }

  Options options;
};

}  // namespace moe::gating
