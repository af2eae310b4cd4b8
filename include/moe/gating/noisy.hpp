// moe: noisy top-k gating (Shazeer et al. 2017).
#pragma once

#include <cmath>
#include <cstdint>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// Noisy top-k gating, Shazeer et al. 2017 ("Outrageously Large Neural Networks"), eqs. 3-5:
///   H = z + eps * (softplus(x W_noise^T) + noise_epsilon),  eps ~ N(0, 1) [T x E], training only
///   H = z                                                    at inference
///   G = softmax(KeepTopK(H, k)): the k largest H (ties: lower index), weights = softmax over
///   those k values, in descending order.
/// scores() is softmax(z) over all E experts (clean logits): what the statistics and the
/// balancing losses read. In training the draws eps are written to ctx.noise_draws ([T x E],
/// the Workspace's noise buffer, after the noise logits) so a backward pass can rebuild H; they
/// come from ctx.rng (the Workspace's generator: seed it for reproducible runs), token-major,
/// Box-Muller on 53-bit uniforms (the same numbers with every standard library).
/// The noise projection W_noise is MoeWeights::router_noise [E x d_model].
struct NoisyTopK {
  struct Options {
    /// Added to the noise standard deviation softplus(x W_noise^T). 0 in the paper; some
    /// reimplementations use 1e-2 to keep the noise from vanishing.
    double noise_epsilon = 0.0;
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = true;

  NoisyTopK() = default;
  explicit NoisyTopK(Options o) : options(o) {}

  /// Throws config_error unless noise_epsilon is finite and >= 0.
  void validate(const MoeConfig&) const {
    if (!std::isfinite(options.noise_epsilon) || options.noise_epsilon < 0) {
      throw config_error(moe::detail::concat("moe: noise_epsilon = ", options.noise_epsilon,
                                             " must be finite and >= 0"));
    }
  }
  Index slots(const MoeConfig& config) const { return config.top_k; }

  /// The noise standard deviation of one expert: softplus(noise_logit) + noise_epsilon.
  template <class S>
  S noise_stddev(S noise_logit) const {
    return detail::softplus(noise_logit) + static_cast<S>(options.noise_epsilon);
  }

  /// Writes scores = softmax(z), the k slots, and in training the draws. O(T E k).
  /// Throws config_error when training without ctx.noise_logits, ctx.noise_draws or ctx.rng.
  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>& ctx, Routing<S>& routing) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = config.top_k;
    const bool noisy = ctx.training;
    if (noisy &&
        (ctx.noise_logits == nullptr || ctx.noise_draws == nullptr || ctx.rng == nullptr)) {
      throw config_error(
          "moe: noisy top-k in training needs noise logits, a noise draw buffer and an rng");
    }
    if (noisy) detail::standard_normal(*ctx.rng, ctx.noise_draws, T * E);
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      const S* z = &logits(t, 0);
      kernels::softmax(z, E, &scores(t, 0));
      const S* nl = noisy ? ctx.noise_logits + t * E : nullptr;
      const S* eps = noisy ? ctx.noise_draws + t * E : nullptr;
      auto h = [&](Index e) -> S { return noisy ? z[e] + eps[e] * noise_stddev(nl[e]) : z[e]; };
      std::int32_t* idx = &experts(t, 0);
      detail::top_k_by<S>(E, k, h, idx);
      // softmax over the k kept values; h(idx[0]) is their maximum.
      const S m = h(idx[0]);
      S sum = 0;
      for (Index j = 0; j < k; ++j) {
        weights(t, j) = std::exp(h(idx[j]) - m);
        sum += weights(t, j);
      }
      for (Index j = 0; j < k; ++j) {
        weights(t, j) /= sum;
        kept(t, j) = 1;
      }
    }
  }

  /// Backward: H = z + eps * std, std = softplus(n) + noise_epsilon with n = x W_noise^T,
  /// w = softmax of the k selected H:
  ///   dH_{i_j} = w_j (dw_j - sum_l w_l dw_l);  dlogits += dH;  dnoise_logits += dH eps sigmoid(n).
  /// noise is the forward's [T x E] noise logits followed by the [T x E] draws eps (the
  /// Workspace's noise buffer). dweights [T x k]; dlogits, dnoise_logits [T x E].
  template <class S>
  void backward(const MoeConfig&, const Routing<S>& routing, const S* dweights, S* dlogits,
                const S* noise, S* dnoise_logits) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = routing.slots();
    const auto experts = routing.experts();
    const auto weights = routing.weights();
    const S* noise_logits = noise;
    const S* draws = noise + T * E;
    for (Index t = 0; t < T; ++t) {
      const S* dw = dweights + t * k;
      double dot = 0;
      for (Index j = 0; j < k; ++j)
        dot += static_cast<double>(weights(t, j)) * static_cast<double>(dw[j]);
      for (Index j = 0; j < k; ++j) {
        const Index e = experts(t, j);
        const double dh = static_cast<double>(weights(t, j)) * (static_cast<double>(dw[j]) - dot);
        dlogits[t * E + e] += static_cast<S>(dh);
        dnoise_logits[t * E + e] +=
            static_cast<S>(dh * static_cast<double>(draws[t * E + e]) *
                           kernels::sigmoid(static_cast<double>(noise_logits[t * E + e])));
      }
    }
  }

  Options options;
};

}  // namespace moe::gating
