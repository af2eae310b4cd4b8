// moe: the router: linear scores x * W_r^T, then a gating policy.
#pragma once

#include <cmath>
#include <random>

#include "moe/config.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// Router logits followed by the Gating policy. W_r is stored [num_experts x d_model] as in
/// checkpoints, so logits = x * W_r^T, computed in RouteScalar<T> (float or wider). Extras, each
/// applied when the weights / config carry it: the input RMS norm and scale (Gemma 4), a bias on
/// the logits (gpt-oss), soft-capping (Laguna), a per-expert scale of the weights after the
/// gating (Gemma 4); the token ids (Workspace::set_token_ids) and the expert table
/// (MoeWeights::expert_table) for policies that route by token id (DeepSeek-V4 hash layers).
template <class T, class Gating>
class Router {
 public:
  using RouteS = RouteScalar<T>;

  Router() = default;
  explicit Router(Gating gating) : gating_(std::move(gating)) {}

  const Gating& gating() const { return gating_; }

  /// Routes x [T x d_model] into the workspace's routing. Shapes are validated by the caller (the
  /// block).
  void route(const MoeConfig& config, const MatrixRef<T>& x, const MoeWeights<T>& weights,
             Workspace<T>& ws) const {
    const Index num_tokens = x.rows(), E = config.num_experts;
    Routing<RouteS>& routing = detail::WorkspaceAccess::routing(ws);
    routing.resize(num_tokens, E, gating_.slots(config));
    if (num_tokens == 0) return;
    if (weights.router_input_scale.size() != 0) {
      normed_logits(config, x, weights, routing.logits().data());
    } else {
      logits_nt(x, weights.router, routing.logits().data());
    }
    apply_logit_extras(config, weights, routing.logits());
    RouteContext<RouteS> ctx;
    ctx.training = ws.training();
    ctx.scratch = detail::WorkspaceAccess::gating_scratch(ws).ensure(E);
    ctx.scratch_size = E;
    if constexpr (Gating::uses_bias) ctx.selection_bias = weights.router_bias.data();
    if constexpr (Gating::uses_noise) {
      if (ws.training()) {
        // noise_ holds [T x E] noise logits, then [T x E] standard normal draws (for backward).
        RouteS* buffer = detail::WorkspaceAccess::noise(ws).ensure(2 * num_tokens * E);
        MutMap<RouteS> noise(buffer, num_tokens, E);
        logits_nt(x, weights.router_noise, noise.data());
        ctx.noise_logits = noise.data();
        ctx.noise_draws = buffer + num_tokens * E;
        ctx.rng = &ws.rng();
      }
    }
    if (weights.expert_table.size() != 0) {
      ctx.expert_table = weights.expert_table.data();
      ctx.expert_table_rows = weights.expert_table.rows();
    }
    if (ws.token_ids() != nullptr) {
      if (ws.num_token_ids() != num_tokens) {
        throw shape_error(detail::concat("moe: ", ws.num_token_ids(), " token ids for ", num_tokens,
                                         " tokens (Workspace::set_token_ids)"));
      }
      ctx.token_ids = ws.token_ids();
    }
    gating_.route(config, ctx, routing);
    if (weights.expert_weight_scale.size() != 0) {
      // Gemma 4: w[t, j] *= per_expert_scale[e[t, j]], after the gating's renormalisation.
      auto w = routing.weights();
      const auto e = routing.experts();
      for (Index t = 0; t < num_tokens; ++t) {
        for (Index j = 0; j < routing.slots(); ++j) {
          if (e(t, j) >= 0) w(t, j) *= static_cast<RouteS>(weights.expert_weight_scale(e(t, j)));
        }
      }
    }
  }

  /// True when the weights carry router extras the backward pass does not differentiate yet.
  static bool has_extras(const MoeConfig& config, const MoeWeights<T>& weights) {
    return config.router_logit_softcap > 0 || weights.router_logit_bias.size() != 0 ||
           weights.router_input_scale.size() != 0 || weights.expert_weight_scale.size() != 0;
  }

 private:
  /// Gemma 4's router input: logits[t] = W (x[t] / rms(x[t]) * scale * d^-1/2), rms with
  /// MoeConfig::router_norm_eps; a plain per-token loop (O(T E d), the router is small), the same
  /// operations for every batch size.
  static void normed_logits(const MoeConfig& config, const MatrixRef<T>& x,
                            const MoeWeights<T>& weights, RouteS* out) {
    const Index T_ = x.rows(), d = x.cols(), E = weights.router.rows();
    const T inv_sqrt_d = T(1) / std::sqrt(static_cast<T>(d));
    for (Index t = 0; t < T_; ++t) {
      const T* xt = x.data() + t * x.outerStride();
      T ms = 0;
      for (Index i = 0; i < d; ++i) ms += xt[i] * xt[i];
      const T inv =
          T(1) / std::sqrt(ms / static_cast<T>(d) + static_cast<T>(config.router_norm_eps));
      for (Index e = 0; e < E; ++e) {
        const T* we = weights.router.data() + e * d;
        T z = 0;
        for (Index i = 0; i < d; ++i) {
          z += we[i] * (xt[i] * inv * weights.router_input_scale(i) * inv_sqrt_d);
        }
        out[t * E + e] = z;
      }
    }
  }

  /// The logit bias (gpt-oss), then soft-capping c tanh(z / c) (Laguna), in place.
  static void apply_logit_extras(const MoeConfig& config, const MoeWeights<T>& weights,
                                 MutMap<RouteS> logits) {
    if (weights.router_logit_bias.size() != 0) {
      for (Index t = 0; t < logits.rows(); ++t) {
        for (Index e = 0; e < logits.cols(); ++e) logits(t, e) += weights.router_logit_bias(e);
      }
    }
    if (config.router_logit_softcap > 0) {
      const RouteS c = static_cast<RouteS>(config.router_logit_softcap);
      for (Index i = 0; i < logits.size(); ++i) {
        logits.data()[i] = c * std::tanh(logits.data()[i] / c);
      }
    }
  }

  /// out [T x E] = x * w^T through the streaming kernel: each token's logits are computed by the
  /// same sequence of operations whatever the batch size, so routing is batch-invariant (Eigen's
  /// product takes different paths for 1 row and for more, with different summation orders).
  /// The router matrix is small (E x d_model), so it stays in cache across row tiles.
  static void logits_nt(const MatrixRef<T>& x, const RowMatrix<T>& w, RouteS* out) {
    static_assert(std::is_same_v<RouteS, T>, "moe: the router computes in the block's scalar");
    kernels::gemm_small_nt<T>(x.data(), x.rows(), x.outerStride(), w.data(), w.cols(), w.cols(), 0,
                              w.rows(), out, w.rows());
  }

  Gating gating_;
};

}  // namespace moe
