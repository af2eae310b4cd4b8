// moe: the router: linear scores x * W_r^T, then a gating policy.
#pragma once

#include <random>

#include "moe/config.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// Router logits followed by the Gating policy. W_r is stored [num_experts x d_model] as in
/// checkpoints, so logits = x * W_r^T, computed in RouteScalar<T> (float or wider).
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
    logits_nt(x, weights.router, routing.logits().data());
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
    gating_.route(config, ctx, routing);
  }

 private:
  /// out [T x E] = x * w^T through the streaming kernel: each token's logits are computed by the
  /// same sequence of operations whatever the batch size, so routing is batch-invariant (Eigen's
  /// product takes different paths for 1 row and for more, with different summation orders).
  /// The router matrix is small (E x d_model), so it stays in cache across row tiles.
  static void logits_nt(const MatrixRef<T>& x, const RowMatrix<T>& w, RouteS* out) {
    static_assert(std::is_same_v<RouteS, T>, "moe: the router computes in the block's scalar");
    kernels::gemm_small_nt<T>(x.data(), x.rows(), x.outerStride(), w.data(), w.cols(), w.cols(),
                              0, w.rows(), out, w.rows());
  }

  Gating gating_;
};

}  // namespace moe
