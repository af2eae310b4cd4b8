// moe: what every gating policy shares: the per-call RouteContext and small selection helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Per-call inputs of a gating policy besides the logits. The router fills it from the weights
/// and the Workspace; a test or a custom caller may fill it by hand (every pointer may be null
/// unless the policy's documentation says otherwise).
template <class S>
struct RouteContext {
  const S* selection_bias = nullptr;  ///< [E] bias added for selection only (DeepSeek-V3), or null
  const S* noise_logits = nullptr;    ///< [T x E] x * W_noise^T (noisy top-k), or null
  /// [T x E] written by noisy top-k in training: the standard normal draws eps of
  /// H = z + eps * softplus(noise_logits), kept for the backward pass. Null at inference.
  S* noise_draws = nullptr;
  std::mt19937_64* rng = nullptr;  ///< caller-seeded generator for noisy top-k, or null
  bool training = false;           ///< noise and jitter apply only when training
  /// Integer scratch of `scratch_size` entries (capacity counters, kept-group flags). The router
  /// passes num_experts entries from the Workspace; when null or too small a policy allocates its
  /// own (one allocation per call).
  Index* scratch = nullptr;
  Index scratch_size = 0;
  /// [T] token ids of the batch (the block's input_ids), or null. Policies that select from a
  /// token table (DeepSeek-V4 hash layers) need them.
  const std::int64_t* token_ids = nullptr;
  /// [expert_table_rows x top_k] experts of each token id (DeepSeek-V4 gate.tid2eid), or null.
  const std::int64_t* expert_table = nullptr;
  Index expert_table_rows = 0;
};

namespace gating {

/// Hooks for the router and the block, whatever the policy: a policy whose Options has the field
/// answers with it, any other the neutral value.
template <class G, class = void>
struct has_routed_output_scale : std::false_type {};
template <class G>
struct has_routed_output_scale<
    G, std::void_t<decltype(std::declval<const G&>().options.routed_output_scale)>>
    : std::true_type {};
template <class G, class = void>
struct has_zero_experts : std::false_type {};
template <class G>
struct has_zero_experts<G, std::void_t<decltype(std::declval<const G&>().options.zero_experts)>>
    : std::true_type {};

/// The factor the block multiplies the routed output by (Options::routed_output_scale: Laguna,
/// Step-3.x), 1 for policies without it.
template <class G>
double routed_output_scale(const G& g) {
  if constexpr (has_routed_output_scale<G>::value) {
    return g.options.routed_output_scale;
  } else {
    return 1.0;
  }
}

/// Identity experts after the routed ones (Options::zero_experts: LongCat-Flash), 0 for policies
/// without them. The router scores num_experts + zero_experts experts.
template <class G>
Index zero_experts(const G& g) {
  if constexpr (has_zero_experts<G>::value) {
    return g.options.zero_experts;
  } else {
    return 0;
  }
}

}  // namespace gating

namespace gating::detail {

/// Indices of the k largest of value(0..n) into idx[0..k), descending, ties to the lower index,
/// NaN last (kernels::ranks_above). O(n k); value(i) may be called several times per i.
template <class S, class F>
inline void top_k_by(Index n, Index k, F&& value, std::int32_t* idx) {
  Index filled = 0;
  for (Index i = 0; i < n; ++i) {
    const S v = value(i);
    if (filled == k && !kernels::ranks_above(v, value(idx[k - 1]))) continue;
    Index p = filled < k ? filled++ : k - 1;
    while (p > 0 && kernels::ranks_above(v, value(idx[p - 1]))) {
      idx[p] = idx[p - 1];
      --p;
    }
    idx[p] = static_cast<std::int32_t>(i);
  }
}

/// True when slot (wa, ea) goes before slot (wb, eb): larger weight first, then lower expert.
template <class S>
inline bool slot_before(S wa, std::int32_t ea, S wb, std::int32_t eb) {
  if (kernels::ranks_above(wa, wb)) return true;
  if (kernels::ranks_above(wb, wa)) return false;
  return ea < eb;
}

/// Sorts k slots (expert, weight) into descending weight, ties to the lower expert index
/// (insertion sort: k is small).
template <class S>
inline void sort_slots(std::int32_t* idx, S* w, Index k) {
  for (Index i = 1; i < k; ++i) {
    const std::int32_t e = idx[i];
    const S v = w[i];
    Index p = i;
    while (p > 0 && slot_before(v, e, w[p - 1], idx[p - 1])) {
      idx[p] = idx[p - 1];
      w[p] = w[p - 1];
      --p;
    }
    idx[p] = e;
    w[p] = v;
  }
}

/// The context's scratch when it is large enough, else `fallback` resized to n.
template <class S>
inline Index* scratch(const RouteContext<S>& ctx, Index n, std::vector<Index>& fallback) {
  if (ctx.scratch != nullptr && ctx.scratch_size >= n) return ctx.scratch;
  fallback.assign(static_cast<std::size_t>(n), 0);
  return fallback.data();
}

/// log(1 + exp(x)) without overflow (PyTorch F.softplus with beta 1, without its x > 20 cutoff).
template <class S>
inline S softplus(S x) {
  return (x > S(0) ? x : S(0)) + std::log1p(std::exp(-std::fabs(x)));
}

/// A uniform double in (0, 1] from the top 53 bits of one draw.
inline double uniform_open0(std::mt19937_64& rng) {
  return (static_cast<double>(rng() >> 11) + 1.0) * 0x1.0p-53;
}

/// Fills out[0..n) with standard normal draws, Box-Muller on pairs of uniform_open0 draws (two
/// generator calls per pair, both results used). Written out rather than std::normal_distribution
/// so that a seed gives the same numbers with every standard library.
template <class S>
inline void standard_normal(std::mt19937_64& rng, S* out, Index n) {
  constexpr double two_pi = 6.283185307179586476925286766559;
  for (Index i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(uniform_open0(rng)));
    const double a = two_pi * uniform_open0(rng);
    out[i] = static_cast<S>(r * std::cos(a));
    if (i + 1 < n) out[i + 1] = static_cast<S>(r * std::sin(a));
  }
}

/// Throws config_error("moe: <name> = <v> must be positive") unless v > 0, or "... must be
/// finite" for an infinite or NaN v.
inline void require_positive_real(const char* name, double v) {
  if (!std::isfinite(v)) {
    throw config_error(moe::detail::concat("moe: ", name, " = ", v, " must be finite"));
  }
  if (!(v > 0)) {
    throw config_error(moe::detail::concat("moe: ", name, " = ", v, " must be positive"));
  }
}
/// Throws config_error("moe: <name> = <v> must be positive") unless v > 0.
inline void require_positive_count(const char* name, Index v) {
  if (v <= 0) throw config_error(moe::detail::concat("moe: ", name, " = ", v, " must be positive"));
}

/// dz += VJP of p = softmax(z) for a sparse gradient dp (dv(j) at experts idx[0..k)):
/// dz = p * (dp - <p, dp>). The accumulation is in double.
template <class S, class DvFn>
inline void softmax_vjp(const S* p, const std::int32_t* idx, Index k, Index E, DvFn&& dv, S* dz) {
  double pdp = 0;
  for (Index j = 0; j < k; ++j) pdp += static_cast<double>(p[idx[j]]) * dv(j);
  for (Index e = 0; e < E; ++e) dz[e] -= static_cast<S>(static_cast<double>(p[e]) * pdp);
  for (Index j = 0; j < k; ++j)
    dz[idx[j]] += static_cast<S>(static_cast<double>(p[idx[j]]) * dv(j));
}

/// The softmax-then-top-k step shared by SoftmaxTopK and CapacityTopK: scores = softmax(logits)
/// over all E experts, the k best in descending order (ties to the lower index), weights = the k
/// probabilities, divided by their sum when `normalize`; every slot kept. O(T E k).
template <class S>
inline void softmax_top_k(Index top_k, bool normalize, Routing<S>& routing) {
  const Index T = routing.num_tokens(), E = routing.num_experts(), k = top_k;
  auto logits = routing.logits();
  auto scores = routing.scores();
  auto experts = routing.experts();
  auto weights = routing.weights();
  auto kept = routing.kept();
  for (Index t = 0; t < T; ++t) {
    S* p = &scores(t, 0);
    kernels::softmax(&logits(t, 0), E, p);
    std::int32_t* idx = &experts(t, 0);
    kernels::top_k(p, E, k, idx);
    S sum = 0;
    for (Index j = 0; j < k; ++j) sum += p[idx[j]];
    const S scale = normalize ? S(1) / sum : S(1);
    for (Index j = 0; j < k; ++j) {
      weights(t, j) = p[idx[j]] * scale;
      kept(t, j) = 1;
    }
  }
}

}  // namespace gating::detail
}  // namespace moe
