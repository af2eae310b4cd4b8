// moe: group-limited top-k gating (DeepSeek-V2 / DeepSeek-V3).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// How a policy turns logits into per-expert scores.
enum class Scoring {
  softmax,  ///< softmax over all experts (DeepSeek-V2 scoring_func "softmax")
  sigmoid,  ///< independent sigmoid per expert (DeepSeek-V3 scoring_func "sigmoid")
};

/// How group-limited selection scores a group of experts.
enum class GroupScore {
  max,       ///< the largest score in the group (DeepSeek-V2 "group_limited_greedy")
  top2_sum,  ///< the sum of the two largest biased scores in the group (DeepSeek-V3 "noaux_tc")
};

/// Group-limited top-k (DeepSeek-V2 / V3). The E experts form n_group contiguous groups of
/// E / n_group (group g = experts g*E/G .. (g+1)*E/G - 1). Per token:
///   s = softmax(z) or sigmoid(z)                         (Options::scoring)
///   c = s + b                                            (b = selection bias, V3 only)
///   group score = max of c in the group, or sum of its two largest c   (Options::group_score)
///   keep the topk_group best groups (ties: lower group index); the experts of the other groups
///   get c = -inf (DeepSeek's inference code, vLLM, llama.cpp), or 0.0 with hf_zero_group_mask
///   i = top-k of the masked c (ties: lower expert index)
///   w = s[i] (the UNBIASED scores); if normalize: w = w / (sum w + 1e-20); w *= scaling.
/// Slots are then ordered by descending w, ties to the lower expert index (HF's own top-k is
/// unsorted; compare with it as sets).
/// Sources: DeepSeek-V3 technical report (2024) section 2.1.2, eqs. 12-16; HF transformers
/// DeepseekV3TopkRouter / DeepseekV3MoE.route_tokens_to_experts and DeepseekV2MoEGate;
/// FORMAT.md 5.4.
///
/// Note (DeepSeek-V2 in HF): when norm_topk_prob is true, HF's V2 gate normalises and then skips
/// routed_scaling_factor; this policy always scales, so give routed_scaling_factor = 1 there.
///
/// SelectionBias: whether the policy reads a [E] selection bias (V3 e_score_correction_bias,
/// MoeWeights::router_bias). The bias changes which experts are chosen, never the weights.
template <bool SelectionBias>
struct BasicGroupLimitedTopK {
  struct Options {
    Scoring scoring = Scoring::sigmoid;             ///< HF scoring_func
    GroupScore group_score = GroupScore::top2_sum;  ///< V3: top2_sum, V2: max
    Index n_group = 1;                              ///< HF n_group (1 = no group limit)
    Index topk_group = 1;                           ///< HF topk_group: groups kept per token
    bool normalize = true;                          ///< HF norm_topk_prob
    double routed_scaling_factor = 1.0;             ///< HF routed_scaling_factor
    /// Hugging Face compatibility: fill the excluded groups with 0.0 instead of -inf, as HF's
    /// DeepseekV3TopkRouter does (masked_fill(..., 0.0)). Once biased scores are negative this
    /// selects experts of excluded groups; keep it false except to reproduce HF bit for bit.
    bool hf_zero_group_mask = false;

    /// DeepSeek-V3 (and R1, Kimi K2 style): sigmoid, bias, top-2-sum groups, renormalised
    /// (denominator + 1e-20), scaled. V3: n_group 8, topk_group 4, scaling 2.5.
    static Options deepseek_v3(Index n_group, Index topk_group, double routed_scaling_factor,
                               bool norm_topk_prob = true) {
      Options o;
      o.scoring = Scoring::sigmoid;
      o.group_score = GroupScore::top2_sum;
      o.n_group = n_group;
      o.topk_group = topk_group;
      o.normalize = norm_topk_prob;
      o.routed_scaling_factor = routed_scaling_factor;
      return o;
    }
    /// DeepSeek-V2: softmax, group score = max, no renormalisation, scaled (V2: n_group 8,
    /// topk_group 3, scaling 16). Use with DeepSeekV2 (no selection bias).
    static Options deepseek_v2(Index n_group, Index topk_group, double routed_scaling_factor) {
      Options o;
      o.scoring = Scoring::softmax;
      o.group_score = GroupScore::max;
      o.n_group = n_group;
      o.topk_group = topk_group;
      o.normalize = false;
      o.routed_scaling_factor = routed_scaling_factor;
      return o;
    }
  };
  static constexpr bool uses_bias = SelectionBias;
  static constexpr bool uses_noise = false;

  BasicGroupLimitedTopK() = default;
  explicit BasicGroupLimitedTopK(Options o) : options(o) {}

  /// Throws config_error naming the field: n_group or topk_group not positive, num_experts not
  /// divisible by n_group, topk_group > n_group, top2_sum with one expert per group,
  /// top_k > topk_group * experts_per_group, a non-finite or non-positive routed_scaling_factor.
  /// (A non-finite selection bias is rejected by MoeWeights::validate, value_error.)
  void validate(const MoeConfig& config) const {
    using moe::detail::concat;
    detail::require_positive_count("n_group", options.n_group);
    detail::require_positive_count("topk_group", options.topk_group);
    const Index E = config.num_experts, G = options.n_group;
    if (E % G != 0) {
      throw config_error(concat("moe: num_experts = ", E, " is not divisible by n_group = ", G));
    }
    if (options.topk_group > G) {
      throw config_error(
          concat("moe: topk_group = ", options.topk_group, " exceeds n_group = ", G));
    }
    const Index per = E / G;
    if (options.group_score == GroupScore::top2_sum && per < 2) {
      throw config_error(
          concat("moe: group_score top2_sum needs at least 2 experts per group, "
                 "num_experts / n_group = ",
                 per));
    }
    if (config.top_k > options.topk_group * per) {
      throw config_error(concat("moe: top_k = ", config.top_k,
                                " exceeds topk_group * experts_per_group = ", options.topk_group,
                                " * ", per, " = ", options.topk_group * per));
    }
    detail::require_positive_real("routed_scaling_factor", options.routed_scaling_factor);
  }

  Index slots(const MoeConfig& config) const { return config.top_k; }

  /// Writes scores = s (unbiased, [T x E]) and the k slots of every token.
  /// O(T E (topk_group + k)); uses n_group entries of ctx.scratch. ctx.selection_bias must be
  /// set when SelectionBias.
  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>& ctx, Routing<S>& routing) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = config.top_k;
    const Index G = options.n_group, per = E / G;
    const S* bias = nullptr;
    if constexpr (SelectionBias) {
      bias = ctx.selection_bias;
      if (bias == nullptr) throw config_error("moe: group-limited top-k needs a selection bias");
    }
    std::vector<Index> fallback;
    Index* group_kept = detail::scratch(ctx, G, fallback);
    const S excluded = options.hf_zero_group_mask ? S(0) : -std::numeric_limits<S>::infinity();
    const S scaling = static_cast<S>(options.routed_scaling_factor);
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      S* s = &scores(t, 0);
      const S* z = &logits(t, 0);
      if (options.scoring == Scoring::softmax) {
        kernels::softmax(z, E, s);
      } else {
        for (Index e = 0; e < E; ++e) s[e] = kernels::sigmoid(z[e]);
      }
      auto choice = [&](Index e) -> S { return bias != nullptr ? s[e] + bias[e] : s[e]; };
      auto group_score = [&](Index g) -> S {
        S first = choice(g * per), second = -std::numeric_limits<S>::infinity();
        for (Index e = g * per + 1; e < (g + 1) * per; ++e) {
          const S v = choice(e);
          if (kernels::ranks_above(v, first)) {
            second = first;
            first = v;
          } else if (kernels::ranks_above(v, second)) {
            second = v;
          }
        }
        return options.group_score == GroupScore::max ? first : first + second;
      };
      // Keep the topk_group best groups: repeated scans, the first (lowest) best group wins.
      for (Index g = 0; g < G; ++g) group_kept[g] = 0;
      for (Index r = 0; r < options.topk_group; ++r) {
        Index best = -1;
        S best_score = S(0);
        for (Index g = 0; g < G; ++g) {
          if (group_kept[g]) continue;
          const S v = group_score(g);
          if (best < 0 || kernels::ranks_above(v, best_score)) {
            best = g;
            best_score = v;
          }
        }
        group_kept[best] = 1;
      }
      std::int32_t* idx = &experts(t, 0);
      detail::top_k_by<S>(
          E, k, [&](Index e) { return group_kept[e / per] ? choice(e) : excluded; }, idx);
      S* w = &weights(t, 0);
      S sum = 0;
      for (Index j = 0; j < k; ++j) {
        w[j] = s[idx[j]];
        sum += w[j];
      }
      const S denominator = sum + S(1e-20);
      for (Index j = 0; j < k; ++j) {
        if (options.normalize) w[j] /= denominator;
        w[j] *= scaling;
        kept(t, j) = 1;
      }
      detail::sort_slots(idx, w, k);
    }
  }

  Options options;
};

/// Group-limited top-k with the selection bias (generic Options; the family types DeepSeekV3 and
/// DeepSeekV2 in gating/family.hpp carry their families' defaults).
using GroupLimitedTopK = BasicGroupLimitedTopK<true>;

}  // namespace moe::gating
