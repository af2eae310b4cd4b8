// moe: PhiMoE's sparsemixer routing at inference (Liu et al. 2023, "Sparse Backpropagation for
// MoE Training"; Phi-3.5-MoE).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// Sparsemixer, deterministic form (HF PhimoeSparseMoeBlock in eval mode), top-2. Per token:
///   i1 = argmax z; experts with (z[i1] - z[e]) / max(|z[e]|, z[i1]) > 2 eps are masked (-inf);
///   w1 = softmax(masked z)[i1];
///   z' = z with z'[i1] = -inf; i2 = argmax z'; experts with
///   (z'[i2] - z[e]) / max(|z[e]|, z'[i2]) > 2 eps are masked in z'; w2 = softmax(masked z')[i2].
/// eps is Phimoe's router_jitter_noise: a relative threshold here, not noise. Ties: the lower
/// expert index. scores() is softmax(z) over all experts (statistics and losses read it). The
/// training form samples the experts (a stochastic gradient estimator); it is not implemented: in
/// training the block routes as at inference.
/// Source: HF transformers 5.17 modeling_phimoe.sparsemixer; FORMAT.md section 6 (phimoe).
struct Sparsemixer {
  struct Options {
    double jitter_eps = 0.01;  ///< HF router_jitter_noise (PhimoeConfig default 0.01)
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = false;

  Sparsemixer() = default;
  explicit Sparsemixer(Options o) : options(o) {}

  /// Throws config_error unless top_k = 2 and jitter_eps is finite and >= 0.
  void validate(const MoeConfig& config) const {
    if (config.top_k != 2) {
      throw config_error(
          moe::detail::concat("moe: sparsemixer routes top_k = 2, got top_k = ", config.top_k));
    }
    if (!std::isfinite(options.jitter_eps) || options.jitter_eps < 0) {
      throw config_error(moe::detail::concat("moe: jitter_eps = ", options.jitter_eps,
                                             " must be finite and >= 0"));
    }
  }
  Index slots(const MoeConfig&) const { return 2; }

  /// Writes scores = softmax(z) and the two slots of every token. O(T E).
  template <class S>
  void route(const MoeConfig&, const RouteContext<S>&, Routing<S>& routing) const {
    const Index T = routing.num_tokens(), E = routing.num_experts();
    const S threshold = static_cast<S>(2 * options.jitter_eps);
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      const S* z = &logits(t, 0);
      kernels::softmax(z, E, &scores(t, 0));
      std::int32_t i1 = 0;
      kernels::top_k(z, E, 1, &i1);
      const S w1 = masked_softmax_at(z, E, i1, -1, z[i1], threshold);
      // The runner-up: the best of z without i1.
      std::int32_t i2 = i1 == 0 ? 1 : 0;
      for (Index e = 0; e < E; ++e) {
        if (e != i1 && kernels::ranks_above(z[e], z[i2])) i2 = static_cast<std::int32_t>(e);
      }
      const S w2 = masked_softmax_at(z, E, i2, i1, z[i2], threshold);
      std::int32_t* idx = &experts(t, 0);
      S* w = &weights(t, 0);
      idx[0] = i1;
      w[0] = w1;
      idx[1] = i2;
      w[1] = w2;
      kept(t, 0) = kept(t, 1) = 1;
      detail::sort_slots(idx, w, 2);
    }
  }

  Options options;

 private:
  /// softmax over the experts e != removed whose (top - z[e]) / max(|z[e]|, top) <= threshold,
  /// taken at `at` (the others are -inf). The maximum is `top` = z[at] (a kept expert).
  template <class S>
  static S masked_softmax_at(const S* z, Index E, Index at, Index removed, S top, S threshold) {
    auto kept = [&](Index e) {
      if (e == removed) return false;
      const S scale = std::fabs(z[e]) > top ? std::fabs(z[e]) : top;
      return !((top - z[e]) / scale > threshold);
    };
    S sum = 0;
    for (Index e = 0; e < E; ++e) {
      if (kept(e)) sum += std::exp(z[e] - top);
    }
    return std::exp(z[at] - top) / sum;
  }
};

}  // namespace moe::gating
