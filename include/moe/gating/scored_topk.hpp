// moe: scored top-k gating, the general form behind most MoE routers since DeepSeek-V2: per-expert
// scores, an optional selection bias and group limit, top-k (or a token-id table), then the
// weights: renormalised, scaled. One policy, every variant an Option (no per-family code).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/common.hpp"
#include "moe/gating/scoring.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"

namespace moe::gating {

/// What the k experts of a token are chosen from.
enum class Selection {
  /// top-k of the scores (+ selection bias), within the kept groups; weights = the chosen scores.
  scores,
  /// top-k of the logits; weights = Options::scoring applied to the k chosen logits only
  /// (softmax over the k, or a sigmoid each): Llama 4, Cohere2, Granite/JetMoE, gpt-oss.
  logits,
  /// the k experts of RouteContext::expert_table row token_id (DeepSeek-V4 hash layers);
  /// weights = the chosen scores.
  token_table,
};

/// Scored top-k. The E (or E + zero_experts) experts may form n_group contiguous groups. Per token:
///   s = scoring(z)                       softmax / sigmoid / sqrt(softplus), over all experts
///   Selection::scores:      c = s + b (b: selection bias, SelectionBias only);
///                           group score = max or top-2 sum of c in each group; the topk_group
///                           best groups kept, the experts of the others get c = -inf (or 0 with
///                           hf_zero_group_mask); i = top-k of c; v = s[i] (unbiased)
///   Selection::logits:      i = top-k of z; v = scoring over z[i] only (softmax over the k)
///   Selection::token_table: i = expert_table[token_id]; v = s[i]
///   w = v / max(norm(v) + normalize_epsilon, normalize_min)   if normalize
///       norm = sum v (normalize_p = 1) or (sum |v|^p)^(1/p) (DBRX moe_normalize_expert_weights)
///   w *= routed_scaling_factor.
/// Slots are then ordered by descending w, ties to the lower expert index (HF's own top-k is
/// often unsorted; compare with it as sets). scores() is s over all experts: what the
/// statistics and the balancing losses read.
///
/// float32: Hugging Face computes most routers in float32 even in a float64 model (FORMAT.md
/// "f32"). With float32 set, a double routing rounds the logits to float and computes scores,
/// weights, renormalisation and scaling in float, then widens; a float routing is unchanged.
/// The selection bias is added in the routing scalar (HF promotes to the bias's dtype).
///
/// Zero experts (LongCat-Flash): with zero_experts = Z the router produces E + Z logits and the
/// routing holds E + Z experts; a slot whose expert is >= E is an identity expert whose
/// contribution is w * x (the block applies it). routed_output_scale multiplies the routed sum in
/// the block (Laguna, Step-3.x scale the output, not the weights; equal up to rounding).
///
/// Sources: DeepSeek-V3 technical report section 2.1.2 (eqs. 12-16); HF transformers 5.17
/// routers (DeepseekV3TopkRouter, DeepseekV2Moe, Mistral4MoE, DeepseekV4 gate, Ernie4_5 gate,
/// LongcatFlash router, Lfm2Moe, MiniMaxM2, Afmoe, HYV3, Laguna, Step3p7, Dbrx router, Cohere2,
/// Llama4, GptOss, GraniteMoe/JetMoe TopKGating); tests/data/reference/v2/FORMAT.md section 6.
///
/// SelectionBias: whether the policy reads a [E] selection bias (e_score_correction_bias,
/// expert_bias, MoeWeights::router_bias). The bias changes which experts are chosen, never the
/// weights.
template <bool SelectionBias>
struct BasicScoredTopK {
  struct Options {
    Scoring scoring = Scoring::sigmoid;             ///< HF scoring_func
    Selection selection = Selection::scores;        ///< what the k experts are chosen from
    GroupScore group_score = GroupScore::top2_sum;  ///< V3: top2_sum, V2: max
    Index n_group = 1;                              ///< HF n_group (1 = no group limit)
    Index topk_group = 1;                           ///< HF topk_group: groups kept per token
    /// Hugging Face compatibility: fill the excluded groups with 0.0 instead of -inf, as HF's
    /// DeepseekV3TopkRouter and Mistral4 do (masked_fill(..., 0.0)). Once biased scores are
    /// negative this selects experts of excluded groups.
    bool hf_zero_group_mask = false;
    bool normalize = true;               ///< HF norm_topk_prob: w = v / denominator
    double normalize_epsilon = 1e-20;    ///< added to the norm (DeepSeek 1e-20, LFM2 1e-6, 0)
    double normalize_min = 0.0;          ///< denominator >= this (ERNIE moe_norm_min)
    double normalize_p = 1.0;            ///< the norm's p: 1 = sum (DBRX: L_p)
    double routed_scaling_factor = 1.0;  ///< HF routed_scaling_factor: multiplies the weights
    double routed_output_scale = 1.0;    ///< multiplies the routed output (applied by the block)
    bool float32 = false;                ///< HF's float32 router steps (see above)
    Index zero_experts = 0;              ///< identity experts after the E routed ones (LongCat)

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

  BasicScoredTopK() = default;
  explicit BasicScoredTopK(Options o) : options(o) {}

  /// Experts the router scores: num_experts + zero_experts.
  Index num_scored(const MoeConfig& config) const {
    return config.num_experts + options.zero_experts;
  }

  /// Throws config_error naming the field: n_group or topk_group not positive, num_experts not
  /// divisible by n_group, topk_group > n_group, top2_sum with one expert per group,
  /// top_k > topk_group * experts_per_group, a group limit with Selection::logits /
  /// token_table or with zero experts, a non-finite or non-positive routed_scaling_factor /
  /// routed_output_scale / normalize_p, a negative or non-finite normalize_epsilon /
  /// normalize_min, negative zero_experts.
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
    if (G > 1 && options.group_score == GroupScore::top2_sum && per < 2) {
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
    if (options.zero_experts < 0) {
      throw config_error(concat("moe: zero_experts = ", options.zero_experts, " must be >= 0"));
    }
    if (G > 1 && (options.selection != Selection::scores || options.zero_experts > 0)) {
      throw config_error(concat("moe: n_group = ", G,
                                " needs Selection::scores and no zero experts (group-limited "
                                "routing chooses from the scores of the routed experts)"));
    }
    detail::require_positive_real("routed_scaling_factor", options.routed_scaling_factor);
    detail::require_positive_real("routed_output_scale", options.routed_output_scale);
    detail::require_positive_real("normalize_p", options.normalize_p);
    auto non_negative = [](const char* name, double v) {
      if (!std::isfinite(v) || v < 0) {
        throw config_error(concat("moe: ", name, " = ", v, " must be finite and >= 0"));
      }
    };
    non_negative("normalize_epsilon", options.normalize_epsilon);
    non_negative("normalize_min", options.normalize_min);
  }

  Index slots(const MoeConfig& config) const { return config.top_k; }

  /// Writes scores = s ([T x E'], E' = routing.num_experts(), unbiased) and the k slots of every
  /// token. O(T E' (topk_group + k)); uses n_group entries of ctx.scratch. ctx.selection_bias
  /// ([E']) must be set when SelectionBias; ctx.token_ids and ctx.expert_table with
  /// Selection::token_table (config_error when missing, value_error naming the token for an id
  /// or a table entry out of range).
  template <class S>
  void route(const MoeConfig& config, const RouteContext<S>& ctx, Routing<S>& routing) const {
    if constexpr (!std::is_same_v<S, float>) {
      if (options.float32) return route_as<float>(config, ctx, routing);
    }
    route_as<S>(config, ctx, routing);
  }

  /// Backward: dlogits [T x E'] += dL/dz given dweights [T x k] = dL/d Routing::weights() (zero
  /// on slots not executed). With v_j the unnormalised weight of slot j (s[i_j], or the scoring of
  /// the chosen logits), D = max(norm(v) + normalize_epsilon, normalize_min):
  ///   w_j = scale v_j / D (normalize) or scale v_j;
  ///   dv_j = scale (dw_j / D - sum_l dw_l v_l / D^2 * dnorm/dv_j)   (normalize, D not clamped)
  ///        = scale dw_j / D                                        (normalize, D = normalize_min)
  ///        = scale dw_j                                            (no renormalisation)
  ///   dnorm/dv_j = 1 (p = 1) or (v_j / norm)^(p - 1);
  /// then the scoring's VJP: softmax dz = s (ds - <s, ds>), sigmoid dz = ds s (1 - s),
  /// sqrt(softplus) dz = ds sigmoid(z) / (2 s); for Selection::logits the same over the k chosen
  /// logits. The selection (top-k, groups, the bias, the token table) is piecewise constant: no
  /// gradient, as in autograd; the selection bias gets none. float32 steps are differentiated as
  /// if exact. O(T (E' + k)).
  template <class S>
  void backward(const MoeConfig&, const Routing<S>& routing, const S* dweights, S* dlogits) const {
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = routing.slots();
    const auto logits = routing.logits();
    const auto scores = routing.scores();
    const auto experts = routing.experts();
    const double scale = options.routed_scaling_factor, p = options.normalize_p;
    const bool selected = options.selection == Selection::logits;
    for (Index t = 0; t < T; ++t) {
      const S* s = scores.data() + t * E;
      const S* z = logits.data() + t * E;
      const std::int32_t* idx = experts.data() + t * k;
      const S* dw = dweights + t * k;
      // The k chosen logits' softmax needs their maximum and partition function.
      double zmax = -std::numeric_limits<double>::infinity(), partition = 0;
      if (selected && options.scoring == Scoring::softmax) {
        for (Index j = 0; j < k; ++j) zmax = std::max(zmax, static_cast<double>(z[idx[j]]));
        for (Index j = 0; j < k; ++j) partition += std::exp(static_cast<double>(z[idx[j]]) - zmax);
      }
      auto v = [&](Index j) -> double {
        if (!selected) return static_cast<double>(s[idx[j]]);
        const double x = static_cast<double>(z[idx[j]]);
        switch (options.scoring) {
          case Scoring::softmax:
            return std::exp(x - zmax) / partition;
          case Scoring::sigmoid:
            return kernels::sigmoid(x);
          case Scoring::sqrt_softplus:
            break;
        }
        return std::sqrt(detail::softplus(x));
      };
      double D = options.normalize_epsilon, norm = 0, dot = 0;
      for (Index j = 0; j < k; ++j) {
        const double vj = v(j);
        if (p == 1.0) {
          D += vj;
        } else {
          norm += std::pow(std::fabs(vj), p);
        }
        dot += static_cast<double>(dw[j]) * vj;
      }
      if (p != 1.0) {
        norm = std::pow(norm, 1.0 / p);
        D += norm;
      }
      const bool clamped = D < options.normalize_min;
      if (clamped) D = options.normalize_min;
      auto dv = [&](Index j) -> double {
        const double g = static_cast<double>(dw[j]);
        if (!options.normalize) return scale * g;
        if (clamped) return scale * (g / D);
        if (p == 1.0) return scale * (g / D - dot / (D * D));
        const double vj = v(j);
        const double dnorm = (vj < 0 ? -1.0 : 1.0) * std::pow(std::fabs(vj) / norm, p - 1);
        return scale * (g / D - dot / (D * D) * dnorm);
      };
      S* dz = dlogits + t * E;
      if (selected && options.scoring == Scoring::softmax) {
        double udv = 0;  // <u, du> over the k chosen, u = softmax of their logits
        for (Index j = 0; j < k; ++j) udv += v(j) * dv(j);
        for (Index j = 0; j < k; ++j) dz[idx[j]] += static_cast<S>(v(j) * (dv(j) - udv));
      } else if (!selected && options.scoring == Scoring::softmax) {
        detail::softmax_vjp<S>(s, idx, k, E, dv, dz);
      } else if (options.scoring == Scoring::sigmoid) {
        for (Index j = 0; j < k; ++j) {
          const double sj = selected ? v(j) : static_cast<double>(s[idx[j]]);
          dz[idx[j]] += static_cast<S>(dv(j) * sj * (1 - sj));
        }
      } else {
        for (Index j = 0; j < k; ++j) {
          const double sj = selected ? v(j) : static_cast<double>(s[idx[j]]);
          const double x = static_cast<double>(z[idx[j]]);
          dz[idx[j]] += static_cast<S>(dv(j) * kernels::sigmoid(x) / (2 * sj));
        }
      }
    }
  }

  Options options;

 private:
  template <class R, class S>
  void route_as(const MoeConfig& config, const RouteContext<S>& ctx, Routing<S>& routing) const {
    using moe::detail::concat;
    const Index T = routing.num_tokens(), E = routing.num_experts(), k = config.top_k;
    const Index G = options.n_group;
    const S* bias = nullptr;
    if constexpr (SelectionBias) {
      bias = ctx.selection_bias;
      if (bias == nullptr) throw config_error("moe: scored top-k needs a selection bias");
    }
    const bool table = options.selection == Selection::token_table;
    if (table && (ctx.token_ids == nullptr || ctx.expert_table == nullptr)) {
      throw config_error(
          "moe: Selection::token_table needs the token ids and the expert table "
          "(RouteContext::token_ids, expert_table)");
    }
    std::vector<Index> fallback;
    Index* group_kept = detail::scratch(ctx, G, fallback);
    const S excluded = options.hf_zero_group_mask ? S(0) : -std::numeric_limits<S>::infinity();
    const R scaling = static_cast<R>(options.routed_scaling_factor);
    const R epsilon = static_cast<R>(options.normalize_epsilon);
    const R minimum = static_cast<R>(options.normalize_min);
    const R p_norm = static_cast<R>(options.normalize_p);
    auto logits = routing.logits();
    auto scores = routing.scores();
    auto experts = routing.experts();
    auto weights = routing.weights();
    auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      S* s = &scores(t, 0);
      const S* z = &logits(t, 0);
      detail::score_row<R>(options.scoring, z, E, s);
      std::int32_t* idx = &experts(t, 0);
      S* w = &weights(t, 0);
      if (options.selection == Selection::logits) {
        kernels::top_k(z, E, k, idx);
        // The scoring over the k chosen logits only: softmax over them, or one value each.
        for (Index j = 0; j < k; ++j) w[j] = z[idx[j]];
        detail::score_row<R>(options.scoring, w, k, w);
      } else {
        if (table) {
          const std::int64_t id = ctx.token_ids[t];
          if (id < 0 || id >= ctx.expert_table_rows) {
            throw value_error(concat("moe: token ", t, " has id ", id,
                                     ", outside the expert table's ", ctx.expert_table_rows,
                                     " rows"));
          }
          for (Index j = 0; j < k; ++j) {
            const std::int64_t e = ctx.expert_table[id * k + j];
            if (e < 0 || e >= E) {
              throw value_error(concat("moe: expert table row ", id, " names expert ", e,
                                       ", outside [0, ", E, ")"));
            }
            idx[j] = static_cast<std::int32_t>(e);
          }
        } else {
          detail::group_limited_top_k(s, bias, E, k, G, options.topk_group, options.group_score,
                                      excluded, group_kept, idx);
        }
        for (Index j = 0; j < k; ++j) w[j] = s[idx[j]];
      }
      R norm = 0;
      if (options.normalize) {
        if (options.normalize_p == 1.0) {
          for (Index j = 0; j < k; ++j) norm += static_cast<R>(w[j]);
        } else {
          for (Index j = 0; j < k; ++j) norm += std::pow(std::fabs(static_cast<R>(w[j])), p_norm);
          norm = std::pow(norm, R(1) / p_norm);
        }
      }
      R denominator = norm + epsilon;
      if (denominator < minimum) denominator = minimum;
      for (Index j = 0; j < k; ++j) {
        R v = static_cast<R>(w[j]);
        if (options.normalize) v /= denominator;
        v *= scaling;
        w[j] = static_cast<S>(v);
        kept(t, j) = 1;
      }
      detail::sort_slots(idx, w, k);
    }
  }
};

/// Scored top-k without a selection bias (generic Options; the family types carry defaults).
using ScoredTopK = BasicScoredTopK<false>;
/// Scored top-k with a [E] selection bias (MoeWeights::router_bias).
using BiasedScoredTopK = BasicScoredTopK<true>;

}  // namespace moe::gating
