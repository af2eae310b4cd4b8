// moe: the router: linear scores x * W_r^T (with the family extras that MoeWeights carries as
// data: logit bias, soft-capping, input RMS norm and scale, per-expert weight scale), then a
// gating policy.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>

#include "moe/config.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/threading.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// Router logits followed by the Gating policy. W_r is stored [E' x d_model] as in checkpoints
/// (E' = num_experts + the policy's zero experts), so logits = x * W_r^T, computed in
/// RouteScalar<T> (float or wider). Extras, each applied only when its tensor is present in the
/// weights (or its number set in the config), in HF's order:
///   Gemma 4:  logits(t) = (x_t / rms(x_t) * scale * d^-1/2) W_r^T   (router_input_scale; the
///             scale and d^-1/2 are folded into W_r once, in prepare(): one product per call)
///   gpt-oss:  logits += router_logit_bias
///   Laguna:   logits = c tanh(logits / c)                          (router_logit_softcap c)
///   Gemma 4:  after the policy, w(t, j) *= expert_weight_scale[e(t, j)]
template <class T, class Gating>
class Router {
 public:
  using RouteS = RouteScalar<T>;

  Router() = default;
  explicit Router(Gating gating) : gating_(std::move(gating)) {}

  const Gating& gating() const { return gating_; }

  /// Experts the router scores: num_experts plus the policy's zero (identity) experts.
  Index num_scored(const MoeConfig& config) const {
    return config.num_experts + gating::zero_experts(gating_);
  }

  /// Precomputes what the extras need from the weights (the folded Gemma 4 router). Called once
  /// by the block's constructor, after the weights are validated.
  void prepare(const MoeWeights<T>& weights) {
    if (weights.router_input_scale.size() == 0) return;
    const T inv_sqrt_d = T(1) / std::sqrt(static_cast<T>(weights.router.cols()));
    folded_ = weights.router;
    for (Index e = 0; e < folded_.rows(); ++e) {
      for (Index c = 0; c < folded_.cols(); ++c) {
        folded_(e, c) *= weights.router_input_scale[c] * inv_sqrt_d;
      }
    }
  }

  /// Routes x [T x d_model] into the workspace's routing. Shapes are validated by the caller (the
  /// block).
  /// The logits run on `executor` in fixed chunks of tokens (the same bits for any executor).
  void route(const MoeConfig& config, const MatrixRef<T>& x, const MoeWeights<T>& weights,
             Workspace<T>& ws, const Executor& executor = serial_executor()) const {
    const Index num_tokens = x.rows(), E = num_scored(config);
    Routing<RouteS>& routing = detail::WorkspaceAccess::routing(ws);
    if (ws.token_ids() != nullptr && ws.num_token_ids() != num_tokens) {
      throw shape_error(detail::concat("moe: ", ws.num_token_ids(), " token ids for ", num_tokens,
                                       " tokens (Workspace::set_token_ids)"));
    }
    routing.resize(num_tokens, E, gating_.slots(config));
    if (num_tokens == 0) return;
    RouteS* logits = routing.logits().data();
    if (folded_.size() != 0) {
      logits_nt(x, folded_, logits, executor);
      for (Index t = 0; t < num_tokens; ++t) {
        const RouteS ms =
            static_cast<RouteS>(x.row(t).squaredNorm()) / static_cast<RouteS>(x.cols());
        const RouteS inv = RouteS(1) / std::sqrt(ms + static_cast<RouteS>(config.router_norm_eps));
        for (Index e = 0; e < E; ++e) logits[t * E + e] *= inv;
      }
    } else {
      logits_nt(x, weights.router, logits, executor);
    }
    if (weights.router_logit_bias.size() != 0) {
      for (Index t = 0; t < num_tokens; ++t) {
        for (Index e = 0; e < E; ++e) logits[t * E + e] += weights.router_logit_bias[e];
      }
    }
    if (config.router_logit_softcap > 0) {
      const RouteS c = static_cast<RouteS>(config.router_logit_softcap);
      for (Index i = 0; i < num_tokens * E; ++i) logits[i] = c * std::tanh(logits[i] / c);
    }
    RouteContext<RouteS> ctx;
    ctx.training = ws.training();
    ctx.scratch = detail::WorkspaceAccess::gating_scratch(ws).ensure(E);
    ctx.scratch_size = E;
    if constexpr (Gating::uses_bias) ctx.selection_bias = weights.router_bias.data();
    ctx.token_ids = ws.token_ids();
    if (weights.expert_table.size() != 0) {
      ctx.expert_table = weights.expert_table.data();
      ctx.expert_table_rows = weights.expert_table.rows();
    }
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
    if (weights.expert_weight_scale.size() != 0) {
      auto w = routing.weights();
      const auto idx = std::as_const(routing).experts();
      for (Index t = 0; t < num_tokens; ++t) {
        for (Index j = 0; j < routing.slots(); ++j) {
          const Index e = idx(t, j);
          if (e >= 0 && e < config.num_experts) w(t, j) *= weights.expert_weight_scale[e];
        }
      }
    }
  }

 private:
  /// out [T x E] = x * w^T through the streaming kernel: each token's logits are computed by the
  /// same sequence of operations whatever the batch size, so routing is batch-invariant (Eigen's
  /// product takes different paths for 1 row and for more, with different summation orders).
  /// The router matrix is small (E x d_model), so it stays in cache across row tiles.
  /// Prefill: chunks of logits_chunk_rows tokens (a multiple of the kernel's row tile, so every
  /// row sees the same tile as in one call) run as tasks: at 512 tokens the router was 7.3 of the
  /// 15 ms that a qwen3 forward (E 128, d 2048) spent outside the expert products on 16 threads
  /// (server, 2026-12-01).
  static void logits_nt(const MatrixRef<T>& x, const RowMatrix<T>& w, RouteS* out,
                        const Executor& executor = serial_executor()) {
    static_assert(std::is_same_v<RouteS, T>, "moe: the router computes in the block's scalar");
    constexpr Index chunk = logits_chunk_rows;
    static_assert(chunk % kernels::gemm_small_nt_row_tile == 0, "chunks must align with tiles");
    const Index n = x.rows(), E = w.rows();
    const Index tasks = executor.num_workers() > 1 ? (n + chunk - 1) / chunk : 1;
    executor.run(tasks, [&](Index task, Index) {
      const Index r0 = tasks == 1 ? 0 : task * chunk, r1 = tasks == 1 ? n : std::min(n, r0 + chunk);
      kernels::gemm_small_nt<T>(x.data() + r0 * x.outerStride(), r1 - r0, x.outerStride(),
                                w.data(), w.cols(), w.cols(), 0, E, out + r0 * E, E);
    });
  }
  static constexpr Index logits_chunk_rows = 32;

  Gating gating_;
  RowMatrix<T> folded_;  ///< Gemma 4: W_r * diag(router_input_scale) * d^-1/2, else empty
};

}  // namespace moe
