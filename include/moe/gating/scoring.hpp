// moe: scoring functions of the gating policies (softmax, sigmoid, sqrt-softplus, computed in a
// chosen precision) and group-limited selection, shared by the policies that score experts.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moe/gating/common.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/tensor.hpp"

namespace moe::gating {

/// How a policy turns logits into per-expert scores.
enum class Scoring {
  softmax,        ///< softmax over all experts (scoring_func "softmax")
  sigmoid,        ///< independent sigmoid per expert (scoring_func "sigmoid")
  sqrt_softplus,  ///< sqrt(softplus(z)) per expert (DeepSeek-V4 scoring_func "sqrtsoftplus")
};

/// How group-limited selection scores a group of experts.
enum class GroupScore {
  max,       ///< the largest score in the group (DeepSeek-V2 "group_limited_greedy")
  top2_sum,  ///< the sum of the two largest biased scores in the group (DeepSeek-V3 "noaux_tc")
};

namespace detail {

/// s[0..n) = scoring(z) computed in R, stored in S. R == S: the library's kernels (bitwise the
/// pre-float32 behaviour); R narrower: the logits rounded to R first, as HF's float32 router.
template <class R, class S>
inline void score_row(Scoring scoring, const S* z, Index n, S* s) {
  if (scoring == Scoring::softmax) {
    if constexpr (std::is_same_v<R, S>) {
      kernels::softmax(z, n, s);
    } else {
      R m = -std::numeric_limits<R>::infinity();
      bool nan = false;
      for (Index e = 0; e < n; ++e) {
        const R v = static_cast<R>(z[e]);
        nan = nan || std::isnan(v);
        m = v > m ? v : m;
      }
      R sum = 0;
      for (Index e = 0; e < n; ++e) {
        const R p = std::exp(static_cast<R>(z[e]) - m);
        s[e] = static_cast<S>(p);
        sum += p;
      }
      const R inv = R(1) / sum;
      for (Index e = 0; e < n; ++e) {
        s[e] =
            nan ? std::numeric_limits<S>::quiet_NaN() : static_cast<S>(static_cast<R>(s[e]) * inv);
      }
    }
  } else if (scoring == Scoring::sigmoid) {
    for (Index e = 0; e < n; ++e) s[e] = static_cast<S>(kernels::sigmoid(static_cast<R>(z[e])));
  } else {
    for (Index e = 0; e < n; ++e) {
      s[e] = static_cast<S>(std::sqrt(detail::softplus(static_cast<R>(z[e]))));
    }
  }
}

/// The k best experts by c = s + bias (bias may be null) within the topk_group best of G
/// contiguous groups, each scored by its largest c or the sum of its two largest (ties: lower
/// group, lower expert), into idx in descending c; the other groups' experts count as
/// `excluded`. group_kept: G entries of scratch. O(E (topk_group + k)).
template <class S>
inline void group_limited_top_k(const S* s, const S* bias, Index E, Index k, Index G,
                                Index topk_group, GroupScore score, S excluded, Index* group_kept,
                                std::int32_t* idx) {
  const Index per = E / G;
  auto choice = [&](Index e) -> S { return bias != nullptr ? s[e] + bias[e] : s[e]; };
  if (G == 1) {
    detail::top_k_by<S>(E, k, choice, idx);
    return;
  }
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
    return score == GroupScore::max ? first : first + second;
  };
  // Keep the topk_group best groups: repeated scans, the first (lowest) best group wins.
  for (Index g = 0; g < G; ++g) group_kept[g] = 0;
  for (Index r = 0; r < topk_group; ++r) {
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
  detail::top_k_by<S>(
      E, k, [&](Index e) { return group_kept[e / per] ? choice(e) : excluded; }, idx);
}

}  // namespace detail
}  // namespace moe::gating
