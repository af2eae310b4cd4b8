// moe: top-k gating with expert capacity (Switch Transformers k = 1, GShard k = 2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// Softmax, top-k, then a per-expert capacity with priority by position; assignments beyond the
/// capacity are dropped. Per token: p = softmax(z), i = top-k of p (descending, ties to the lower
/// index), w = p[i] (renormalised as Options::renormalize says).
///
/// Priority: all tokens' first choices, in token order (flattened batch-major), then all second
/// choices, and so on; an assignment whose expert already holds `capacity` assignments is dropped
/// (first come, first served). A dropped slot keeps its expert and weight but kept = 0, so a token
/// whose every slot is dropped gets a zero output row (HF Switch 5.x, FORMAT.md 5.5; a model adds
/// the residual outside the block).
///
/// Capacity, clamped to at most T (an expert never receives more than T assignments):
///   absolute:  expert_capacity                                   (HF Switch expert_capacity)
///   factor:    max(min_capacity, ceil(capacity_factor * k * T / E))
///   unlimited: no token is dropped (dropless; also HF 5.17 Switch as shipped, FORMAT.md 5.6)
///
/// Sources: Fedus et al. 2021 (Switch Transformers) section 2.2, HF
/// SwitchTransformersTop1Router; Lepikhin et al. 2020 (GShard) algorithm 1 and fairseq
/// top2gating (first choices before second choices, normalize_gate_prob_before_dropping);
/// DeepSpeed top1gating (min_capacity); ROUTING.md "Capacity and dropped tokens".
struct CapacityTopK {
  /// How the per-expert capacity is given.
  enum class Capacity {
    absolute,   ///< Options::expert_capacity assignments per expert
    factor,     ///< max(min_capacity, ceil(capacity_factor * k * T / E)) per expert
    unlimited,  ///< no limit: nothing is dropped
  };
  /// When the k weights of a token are renormalised to sum to 1.
  enum class Renormalize {
    none,         ///< the raw probabilities (Switch: the top-1 probability)
    before_drop,  ///< over the k chosen, before capacity (a kept slot's weight does not change)
    after_drop,   ///< over the kept slots only (GShard / fairseq default); dropped keep p
  };
  struct Options {
    Capacity capacity = Capacity::absolute;
    Index expert_capacity = 0;     ///< absolute: assignments per expert (HF expert_capacity)
    double capacity_factor = 1.0;  ///< factor: multiplies k * T / E
    Index min_capacity = 0;        ///< factor: lower bound (DeepSpeed min_capacity)
    Renormalize renormalize = Renormalize::none;

    /// Switch Transformers: top-1 with an absolute expert_capacity, weight = top-1 probability.
    static Options switch_transformers(Index expert_capacity) {
      Options o;
      o.capacity = Capacity::absolute;
      o.expert_capacity = expert_capacity;
      return o;
    }
    /// GShard top-2 (use with top_k = 2): capacity ceil(capacity_factor * k * T / E), the kept
    /// weights renormalised after dropping.
    static Options gshard(double capacity_factor = 1.0, Index min_capacity = 0) {
      Options o;
      o.capacity = Capacity::factor;
      o.capacity_factor = capacity_factor;
      o.min_capacity = min_capacity;
      o.renormalize = Renormalize::after_drop;
      return o;
    }
    /// No capacity (dropless), raw probabilities: HF 5.17 Switch as shipped (FORMAT.md 5.6).
    static Options dropless(Renormalize renormalize = Renormalize::none) {
      Options o;
      o.capacity = Capacity::unlimited;
      o.renormalize = renormalize;
      return o;
    }
  };
  static constexpr bool uses_bias = false;
  static constexpr bool uses_noise = false;

  CapacityTopK() = default;
  explicit CapacityTopK(Options o) : options(o) {}

  /// Throws config_error naming the field: expert_capacity not positive (absolute),
  /// capacity_factor not finite and positive, min_capacity negative (factor).
  void validate(const MoeConfig&) const {
    if (options.capacity == Capacity::absolute) {
      detail::require_positive_count("expert_capacity", options.expert_capacity);
    } else if (options.capacity == Capacity::factor) {
      detail::require_positive_real("capacity_factor", options.capacity_factor);
      if (options.min_capacity < 0) {
        throw config_error(
            moe::detail::concat("moe: min_capacity = ", options.min_capacity, " must be >= 0"));
      }
    }
  }

  Index slots(const MoeConfig& config) const { return config.top_k; }

  /// The per-expert capacity for a batch of num_tokens tokens (num_tokens when unlimited).
  Index capacity(const MoeConfig& config, Index num_tokens) const {
    const double T = static_cast<double>(num_tokens);
    double c = T;
    if (options.capacity == Capacity::absolute) {
      c = static_cast<double>(options.expert_capacity);
    } else if (options.capacity == Capacity::factor) {
      c = std::ceil(options.capacity_factor * static_cast<double>(config.top_k) * T /
                    static_cast<double>(config.num_experts));
      c = std::max(c, static_cast<double>(options.min_capacity));
    }
    return c >= T ? num_tokens : static_cast<Index>(c);
  }

  /// Writes scores = softmax(logits), the k slots of every token and which of them are kept.
  /// O(T E k); uses num_experts entries of ctx.scratch (load counters).
  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>& ctx, Routing<S>& routing) const {
    detail::softmax_top_k(config.top_k, options.renormalize == Renormalize::before_drop, routing);
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = config.top_k;
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    if (options.capacity != Capacity::unlimited) {
      const Index cap = capacity(config, T);
      std::vector<Index> fallback;
      Index* load = detail::scratch(ctx, E, fallback);
      std::fill(load, load + E, Index(0));
      for (Index j = 0; j < k; ++j) {
        for (Index t = 0; t < T; ++t) {
          Index& n = load[experts(t, j)];
          if (n < cap) {
            ++n;
          } else {
            kept(t, j) = 0;
          }
        }
      }
    }
    if (options.renormalize == Renormalize::after_drop) {
      for (Index t = 0; t < T; ++t) {
        S sum = 0;
        for (Index j = 0; j < k; ++j) {
          if (kept(t, j)) sum += weights(t, j);
        }
        if (!(sum > S(0))) continue;
        for (Index j = 0; j < k; ++j) {
          if (kept(t, j)) weights(t, j) /= sum;
        }
      }
    }
  }

  /// Backward: dlogits [T x E] += dL/dz given dweights [T x k] (zero on slots not executed).
  /// p = softmax(z), v_j = p[i_j];
  ///   none:        w_j = v_j,                          dv_j = dw_j
  ///   before_drop: w_j = v_j / sum_all v,              dv_j = (dw_j - sum_l dw_l w_l) / sum_all v
  ///   after_drop:  w_j = v_j / sum_kept v (kept j),    dv_j = (dw_j - sum_kept dw_l w_l) /
  ///   sum_kept
  /// A dropped slot contributes nothing to the output, so dw_j = 0 there and (after_drop) it is
  /// outside the normalisation: a dropped token's router gradient comes from the losses alone.
  template <class S>
  void backward(const MoeConfig&, const Routing<S>& routing, const S* dweights, S* dlogits) const {
    using R = Renormalize;
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = routing.slots();
    const auto scores = routing.scores();
    const auto experts = routing.experts();
    const auto weights = routing.weights();
    const auto kept = routing.kept();
    const R mode = options.renormalize;
    for (Index t = 0; t < T; ++t) {
      const S* p = scores.data() + t * E;
      const std::int32_t* idx = experts.data() + t * k;
      const S* dw = dweights + t * k;
      double sum = 0, dot = 0;
      for (Index j = 0; j < k; ++j) {
        const bool in = mode == R::before_drop || (mode == R::after_drop && kept(t, j));
        if (!in) continue;
        sum += static_cast<double>(p[idx[j]]);
        dot += static_cast<double>(dw[j]) * static_cast<double>(weights(t, j));
      }
      auto dv = [&](Index j) {
        if (mode == R::none) return static_cast<double>(dw[j]);
        if (mode == R::after_drop && !kept(t, j)) return 0.0;
        return sum > 0 ? (static_cast<double>(dw[j]) - dot) / sum : 0.0;
      };
      detail::softmax_vjp<S>(p, idx, k, E, dv, dlogits + t * E);
    }
  }

  Options options;
};

}  // namespace moe::gating
