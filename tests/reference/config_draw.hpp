// Differential testing of SparseMoeBlock against the scalar float64 reference (reference_moe.hpp):
// random configurations of every gating family, their data, the mapping onto ref::Config, and
// the comparison. Shared by tests/differential_test.cpp (a seeded std::mt19937_64) and
// tests/fuzz/differential_fuzz.cpp (libFuzzer bytes); no gtest here.
//
// What is compared, per case: the block run on the serial executor and on a 2-worker ThreadPool
// (bitwise equal: the block promises executor-independent results), then against ref::forward:
// logits and scores, the chosen experts and their slot order, kept flags (exactly), weights and
// outputs (within tolerances scaled by the float or double epsilon and by the magnitude of the
// terms that produced them).
//
// Near-ties. The block computes in float (or double), the reference in double, so two experts
// whose selection values differ by less than rounding may be ordered differently. For every token
// the reference's values are examined (their "scale" is a bound on the terms that produced them:
// the L1 norm of x_t * W_e for a logit); when the chosen and an unchosen candidate (or two
// adjacent slots) lie within tie_tolerance of each other, a differing choice is accepted for
// that token (counted), its weights and output are skipped, and with a binding capacity the rest
// of the batch's drops are not compared (they depend on that choice). Anything else must match.
// Exactly equal values are exact ties in the block too when the router logits are exact in float
// (the "dyadic" data: x on a 1/4 grid, router on a 1/8 grid, bias on a 1/16 grid): then ties must
// go to the lower index in both, with no tolerance.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/moe.hpp"

#include "reference/reference_moe.hpp"

namespace moe::difftest {

enum class Policy { softmax_topk, deepseek_v2, deepseek_v3, capacity, noisy, expert_choice };
enum class FfnKind { swiglu, geglu, relu_mlp };
using Capacity = gating::CapacityTopK::Capacity;
using Renormalize = gating::CapacityTopK::Renormalize;

inline const char* name(Policy p) {
  switch (p) {
    case Policy::softmax_topk:
      return "SoftmaxTopK";
    case Policy::deepseek_v2:
      return "DeepSeekV2";
    case Policy::deepseek_v3:
      return "DeepSeekV3";
    case Policy::capacity:
      return "CapacityTopK";
    case Policy::noisy:
      return "NoisyTopK";
    case Policy::expert_choice:
      return "ExpertChoice";
  }
  return "?";
}
inline const char* name(FfnKind f) {
  switch (f) {
    case FfnKind::swiglu:
      return "SwiGLU";
    case FfnKind::geglu:
      return "GeGLU";
    case FfnKind::relu_mlp:
      return "ReluMlp";
  }
  return "?";
}

/// One drawn case: everything needed to rebuild the block, its data and the reference's view.
struct Case {
  std::uint64_t data_seed = 0;  ///< seeds the weights and x
  std::uint64_t rng_seed = 0;   ///< seeds the workspace generator (noisy top-k in training)
  Policy policy = Policy::softmax_topk;
  FfnKind ffn = FfnKind::swiglu;
  bool use_double = false;
  MoeConfig config;
  Index tokens = 0;
  bool training = false;
  // SoftmaxTopK and the group-limited policies: norm_topk_prob.
  bool normalize = true;
  // Group-limited (DeepSeek V2 / V3).
  gating::Scoring scoring = gating::Scoring::softmax;
  gating::GroupScore group_score = gating::GroupScore::max;
  Index n_group = 1, topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool hf_zero_group_mask = false;
  // CapacityTopK (capacity_factor is also expert choice's).
  Capacity capacity = Capacity::absolute;
  Index expert_capacity = 1;
  double capacity_factor = 1.0;
  Index min_capacity = 0;
  Renormalize renormalize = Renormalize::none;
  // NoisyTopK.
  double noise_epsilon = 0.0;
  // Data.
  double router_scale = 0.3;  ///< standard deviation of the router weights (0: all zero)
  double bias_scale = 0.1;    ///< of the DeepSeek-V3 selection bias
  double x_scale = 1.0;
  bool dyadic = false;           ///< x, router, bias on power-of-two grids: exact logits
  int duplicate_token_pct = 0;   ///< chance that a token copies an earlier one
  int duplicate_expert_pct = 0;  ///< chance that a router row copies an earlier one
  std::vector<double> x_prefix;  ///< overrides the first x values (the fuzzer's bytes)

  /// One line naming every field that shapes the case.
  std::string describe() const {
    std::ostringstream s;
    s << (use_double ? "double " : "float ") << name(policy) << '/' << name(ffn)
      << " E=" << config.num_experts << " k=" << config.top_k << " T=" << tokens
      << " d_model=" << config.d_model << " d_ff=" << config.d_ff
      << " shared_d_ff=" << config.shared_d_ff << " shared_gate=" << config.shared_expert_gate
      << " training=" << training;
    switch (policy) {
      case Policy::softmax_topk:
        s << " normalize=" << normalize;
        break;
      case Policy::deepseek_v2:
      case Policy::deepseek_v3:
        s << " scoring=" << (scoring == gating::Scoring::softmax ? "softmax" : "sigmoid")
          << " group_score=" << (group_score == gating::GroupScore::max ? "max" : "top2_sum")
          << " n_group=" << n_group << " topk_group=" << topk_group << " normalize=" << normalize
          << " scaling=" << routed_scaling_factor << " hf_zero_group_mask=" << hf_zero_group_mask
          << " bias_scale=" << bias_scale;
        break;
      case Policy::capacity:
        s << " capacity="
          << (capacity == Capacity::absolute ? "absolute"
              : capacity == Capacity::factor ? "factor"
                                             : "unlimited")
          << " expert_capacity=" << expert_capacity << " capacity_factor=" << capacity_factor
          << " min_capacity=" << min_capacity << " renormalize="
          << (renormalize == Renormalize::none          ? "none"
              : renormalize == Renormalize::before_drop ? "before_drop"
                                                        : "after_drop");
        break;
      case Policy::noisy:
        s << " noise_epsilon=" << noise_epsilon << " rng_seed=" << rng_seed;
        break;
      case Policy::expert_choice:
        s << " capacity_factor=" << capacity_factor;
        break;
    }
    s << " router_scale=" << router_scale << " x_scale=" << x_scale << " dyadic=" << dyadic
      << " dup_tokens=" << duplicate_token_pct << "% dup_experts=" << duplicate_expert_pct
      << "% x_prefix=" << x_prefix.size() << " data_seed=" << data_seed;
    return s.str();
  }
};

/// A source of draws from a seeded std::mt19937_64 (the unit test). The fuzzer has its own
/// source over FuzzedDataProvider with the same three calls.
struct SeededSource {
  std::mt19937_64 rng;
  explicit SeededSource(std::uint64_t seed) : rng(seed) {}
  Index range(Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(rng); }
  double unit() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
  std::uint64_t bits() { return rng(); }
};

/// The capacity the reference is given, computed independently of the policy (the formula of
/// gating/capacity.hpp's documentation): absolute min(expert_capacity, T); factor
/// max(min_capacity, ceil(capacity_factor * k * T / E)) clamped to T; unlimited T.
inline Index expected_capacity(const Case& c) {
  const Index T = c.tokens;
  if (c.capacity == Capacity::absolute) return std::min(c.expert_capacity, T);
  if (c.capacity == Capacity::unlimited) return T;
  double v = std::ceil(c.capacity_factor * static_cast<double>(c.config.top_k) *
                       static_cast<double>(T) / static_cast<double>(c.config.num_experts));
  v = std::max(v, static_cast<double>(c.min_capacity));
  return v >= static_cast<double>(T) ? T : static_cast<Index>(v);
}

/// Draws a valid case: every family, E in 1..64 (group counts dividing E), T in 0..300 biased
/// toward small batches, awkward d_model / d_ff (now and then wider than one 256-column task).
template <class Source>
Case draw_case(Source& src) {
  auto chance = [&](double p) { return src.unit() < p; };
  auto pick = [&](std::initializer_list<double> v) {
    return *(v.begin() + src.range(0, static_cast<Index>(v.size()) - 1));
  };
  Case c;
  c.data_seed = src.bits();
  c.rng_seed = src.bits();
  c.use_double = chance(0.5);
  c.policy = static_cast<Policy>(src.range(0, 5));
  c.ffn = static_cast<FfnKind>(src.range(0, 2));
  const bool wide = chance(0.04);

  double u = src.unit();
  Index E = u < 0.1    ? 1
            : u < 0.55 ? src.range(2, 8)
            : u < 0.85 ? src.range(9, 32)
                       : src.range(33, 64);
  u = src.unit();
  Index T = u < 0.06   ? 0
            : u < 0.18 ? 1
            : u < 0.55 ? src.range(2, 16)
            : u < 0.85 ? src.range(17, 64)
                       : src.range(65, 300);
  if (wide) {
    E = src.range(1, 4);
    T = std::min<Index>(T, 40);
  }
  c.tokens = T;
  c.config.num_experts = E;
  const bool wide_d = wide && chance(0.5);
  c.config.d_model = wide_d        ? src.range(257, 300)
                     : chance(0.3) ? src.range(1, 8)
                                   : src.range(9, 48);
  c.config.d_ff = wide && !wide_d ? src.range(257, 300) : src.range(1, 40);
  if (chance(0.35)) {
    c.config.shared_d_ff = src.range(1, 32);
    c.config.shared_expert_gate = chance(0.5);
  }
  auto draw_k = [&](Index max_k) {
    return chance(0.15) ? src.range(1, max_k) : src.range(1, std::min<Index>(max_k, 4));
  };
  c.training = chance(0.3);
  switch (c.policy) {
    case Policy::softmax_topk:
      c.config.top_k = draw_k(E);
      c.normalize = chance(0.5);
      break;
    case Policy::deepseek_v2:
    case Policy::deepseek_v3: {
      std::vector<Index> divisors;
      for (Index g = 1; g <= E; ++g) {
        if (E % g == 0) divisors.push_back(g);
      }
      c.n_group =
          divisors[static_cast<std::size_t>(src.range(0, static_cast<Index>(divisors.size()) - 1))];
      const Index per = E / c.n_group;
      c.group_score =
          per >= 2 && chance(0.5) ? gating::GroupScore::top2_sum : gating::GroupScore::max;
      c.topk_group = src.range(1, c.n_group);
      c.config.top_k = draw_k(c.topk_group * per);
      c.scoring = chance(0.5) ? gating::Scoring::softmax : gating::Scoring::sigmoid;
      c.normalize = chance(0.5);
      c.routed_scaling_factor = chance(0.25) ? 0.1 + 3.0 * src.unit() : pick({1.0, 2.5, 16.0});
      c.hf_zero_group_mask = chance(0.3);
      c.bias_scale = pick({0.01, 0.1, 1.0});
      break;
    }
    case Policy::capacity:
      c.config.top_k = draw_k(E);
      c.capacity = static_cast<Capacity>(src.range(0, 2));
      c.expert_capacity = chance(0.5) ? src.range(1, 4) : src.range(1, T + 2);
      c.capacity_factor = chance(0.3) ? 0.1 + 3.0 * src.unit() : pick({0.5, 1.0, 1.25, 2.0});
      c.min_capacity = chance(0.3) ? src.range(1, 4) : 0;
      c.renormalize = static_cast<Renormalize>(src.range(0, 2));
      break;
    case Policy::noisy:
      c.config.top_k = draw_k(E);
      c.training = chance(0.7);
      c.noise_epsilon = chance(0.5) ? 0.0 : 1e-2;
      break;
    case Policy::expert_choice:
      c.config.top_k = src.range(1, E);  // not used by expert choice
      c.capacity_factor = chance(0.3) ? 0.05 + 4.0 * src.unit() : pick({0.5, 1.0, 2.0});
      break;
  }
  c.dyadic = chance(0.2);
  c.router_scale = chance(0.06) ? 0.0 : pick({0.02, 0.3, 1.0});
  c.x_scale = pick({1.0, 1.0, 0.1, 3.0});
  c.duplicate_token_pct = chance(0.15) ? static_cast<int>(src.range(10, 60)) : 0;
  c.duplicate_expert_pct = chance(0.1) ? static_cast<int>(src.range(10, 60)) : 0;
  return c;
}

/// The data of a case in double, already rounded to the block's scalar (so the reference sees
/// exactly the block's numbers). Layouts as ref::Weights.
struct Data {
  std::vector<double> x, router, bias, noise;
  std::vector<std::vector<double>> gate, up, down;
  std::vector<double> s_gate, s_up, s_down, s_gate_weight;
};

inline Data make_data(const Case& c) {
  std::mt19937_64 rng(c.data_seed);
  const Index D = c.config.d_model, F = c.config.d_ff, E = c.config.num_experts, T = c.tokens;
  const Index Fs = c.config.shared_d_ff;
  const bool gated = c.ffn != FfnKind::relu_mlp;
  auto round = [&](double v) {
    return c.use_double ? v : static_cast<double>(static_cast<float>(v));
  };
  auto fill = [&](std::size_t n, double scale, double step) {
    std::normal_distribution<double> dist(0.0, 1.0);
    std::vector<double> v(n);
    for (double& a : v) {
      a = scale * dist(rng);
      a = step > 0 ? std::round(a / step) * step : round(a);
    }
    return v;
  };
  const auto uD = static_cast<std::size_t>(D), uE = static_cast<std::size_t>(E);
  const auto uF = static_cast<std::size_t>(F), uT = static_cast<std::size_t>(T);
  Data d;
  d.x = fill(uT * uD, c.x_scale, c.dyadic ? 0.25 : 0.0);
  for (std::size_t i = 0; i < c.x_prefix.size() && i < d.x.size(); ++i)
    d.x[i] = round(c.x_prefix[i]);
  std::uniform_int_distribution<int> percent(0, 99);
  for (std::size_t t = 1; t < uT; ++t) {
    if (percent(rng) < c.duplicate_token_pct) {
      const std::size_t from = std::uniform_int_distribution<std::size_t>(0, t - 1)(rng);
      std::copy_n(d.x.begin() + static_cast<std::ptrdiff_t>(from * uD), uD,
                  d.x.begin() + static_cast<std::ptrdiff_t>(t * uD));
    }
  }
  d.router = fill(uE * uD, c.router_scale, c.dyadic ? 0.125 : 0.0);
  for (std::size_t e = 1; e < uE; ++e) {
    if (percent(rng) < c.duplicate_expert_pct) {
      const std::size_t from = std::uniform_int_distribution<std::size_t>(0, e - 1)(rng);
      std::copy_n(d.router.begin() + static_cast<std::ptrdiff_t>(from * uD), uD,
                  d.router.begin() + static_cast<std::ptrdiff_t>(e * uD));
    }
  }
  if (c.policy == Policy::deepseek_v3) d.bias = fill(uE, c.bias_scale, c.dyadic ? 1.0 / 16 : 0.0);
  if (c.policy == Policy::noisy) d.noise = fill(uE * uD, 0.3, 0.0);
  const double in_scale = 1.0 / std::sqrt(static_cast<double>(D));
  const double out_scale = 1.0 / std::sqrt(static_cast<double>(F));
  for (Index e = 0; e < E; ++e) {
    d.gate.push_back(fill(uF * uD, in_scale, 0.0));
    if (gated) d.up.push_back(fill(uF * uD, in_scale, 0.0));
    d.down.push_back(fill(uD * uF, out_scale, 0.0));
  }
  if (Fs > 0) {
    const auto uFs = static_cast<std::size_t>(Fs);
    d.s_gate = fill(uFs * uD, in_scale, 0.0);
    if (gated) d.s_up = fill(uFs * uD, in_scale, 0.0);
    d.s_down = fill(uD * uFs, 1.0 / std::sqrt(static_cast<double>(Fs)), 0.0);
    if (c.config.shared_expert_gate) d.s_gate_weight = fill(uD, 0.3, 0.0);
  }
  return d;
}

/// The reference's view of the case (the mapping of gating_test.cpp, extended to every option).
inline ref::Config ref_config(const Case& c) {
  ref::Config r;
  r.d_model = static_cast<int>(c.config.d_model);
  r.d_ff = static_cast<int>(c.config.d_ff);
  r.num_experts = static_cast<int>(c.config.num_experts);
  r.top_k = static_cast<int>(c.config.top_k);
  r.gated = c.ffn != FfnKind::relu_mlp;
  r.activation = c.ffn == FfnKind::swiglu  ? ref::Activation::silu
                 : c.ffn == FfnKind::geglu ? ref::Activation::gelu
                                           : ref::Activation::relu;
  r.shared_d_ff = static_cast<int>(c.config.shared_d_ff);
  r.shared_gate = c.config.shared_expert_gate;
  switch (c.policy) {
    case Policy::softmax_topk:
      r.family = ref::Family::topk;
      r.norm_topk_prob = c.normalize;
      break;
    case Policy::deepseek_v2:
    case Policy::deepseek_v3:
      r.family = ref::Family::group_limited;
      r.scoring =
          c.scoring == gating::Scoring::softmax ? ref::Scoring::softmax : ref::Scoring::sigmoid;
      r.group_score = c.group_score == gating::GroupScore::max ? ref::GroupScore::max
                                                               : ref::GroupScore::top2_sum;
      r.n_group = static_cast<int>(c.n_group);
      r.topk_group = static_cast<int>(c.topk_group);
      r.norm_topk_prob = c.normalize;
      r.routed_scaling_factor = c.routed_scaling_factor;
      r.hf_zero_group_mask = c.hf_zero_group_mask;
      break;
    case Policy::capacity:
      r.family = ref::Family::capacity_topk;
      // Unlimited: capacity T cannot drop (an expert appears at most once per token), and lets
      // the reference apply after_drop renormalisation, which the policy also does.
      r.capacity = static_cast<long>(expected_capacity(c));
      r.norm_topk_prob = c.renormalize == Renormalize::before_drop;
      r.renormalize_after_drop = c.renormalize == Renormalize::after_drop;
      break;
    case Policy::noisy:
      r.family = ref::Family::noisy_topk;
      break;
    case Policy::expert_choice:
      r.family = ref::Family::expert_choice;
      r.capacity_factor = c.capacity_factor;
      break;
  }
  return r;
}

inline ref::Weights ref_weights(const Data& d) {
  ref::Weights w;
  w.router = d.router;
  w.router_bias = d.bias;
  w.router_noise = d.noise;
  w.gate = d.gate;
  w.up = d.up;
  w.down = d.down;
  w.shared_gate_proj = d.s_gate;
  w.shared_up = d.s_up;
  w.shared_down = d.s_down;
  w.shared_gate_weight = d.s_gate_weight;
  return w;
}

template <class T>
MoeWeights<T> block_weights(const Case& c, const Data& d, bool gated, bool bias, bool noise) {
  const MoeConfig& cfg = c.config;
  const Index D = cfg.d_model, F = cfg.d_ff, E = cfg.num_experts, Fs = cfg.shared_d_ff;
  auto w = MoeWeights<T>::zeros(cfg, gated, bias, noise);
  auto copy = [](const std::vector<double>& from, T* to) {
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = static_cast<T>(from[i]);
  };
  copy(d.router, w.router.data());
  if (bias) copy(d.bias, w.router_bias.data());
  if (noise) copy(d.noise, w.router_noise.data());
  for (Index e = 0; e < E; ++e) {
    const auto ue = static_cast<std::size_t>(e);
    RowMatrix<T> g(F, D), o(D, F);
    copy(d.gate[ue], g.data());
    copy(d.down[ue], o.data());
    if (gated) {
      RowMatrix<T> up(F, D);
      copy(d.up[ue], up.data());
      w.experts.set_gated(e, g, up, o);
    } else {
      w.experts.set_plain(e, g, o);
    }
  }
  if (Fs > 0) {
    RowMatrix<T> g(Fs, D), o(D, Fs);
    copy(d.s_gate, g.data());
    copy(d.s_down, o.data());
    if (gated) {
      RowMatrix<T> up(Fs, D);
      copy(d.s_up, up.data());
      w.shared.set_gated(0, g, up, o);
    } else {
      w.shared.set_plain(0, g, o);
    }
    if (cfg.shared_expert_gate) copy(d.s_gate_weight, w.shared_gate.data());
  }
  return w;
}

template <class Gating>
typename Gating::Options gating_options(const Case& c) {
  typename Gating::Options o;
  if constexpr (std::is_same_v<Gating, gating::SoftmaxTopK>) {
    o.normalize = c.normalize;
  } else if constexpr (std::is_same_v<Gating, gating::DeepSeekV2> ||
                       std::is_same_v<Gating, gating::DeepSeekV3>) {
    o.scoring = c.scoring;
    o.group_score = c.group_score;
    o.n_group = c.n_group;
    o.topk_group = c.topk_group;
    o.normalize = c.normalize;
    o.routed_scaling_factor = c.routed_scaling_factor;
    o.hf_zero_group_mask = c.hf_zero_group_mask;
  } else if constexpr (std::is_same_v<Gating, gating::CapacityTopK>) {
    o.capacity = c.capacity;
    o.expert_capacity = c.expert_capacity;
    o.capacity_factor = c.capacity_factor;
    o.min_capacity = c.min_capacity;
    o.renormalize = c.renormalize;
  } else if constexpr (std::is_same_v<Gating, gating::NoisyTopK>) {
    o.noise_epsilon = c.noise_epsilon;
  } else {
    o.capacity_factor = c.capacity_factor;
  }
  return o;
}

/// What a run compared, summed over cases.
struct Tally {
  long long cases = 0, tokens = 0;
  long long slot_checks = 0;       ///< (token, slot) expert + kept comparisons
  long long value_checks = 0;      ///< logits, scores and weights compared within tolerance
  long long output_checks = 0;     ///< output elements compared within tolerance
  long long executor_checks = 0;   ///< cases whose serial and pooled runs were compared bitwise
  long long near_tie_tokens = 0;   ///< tokens with a near-tie in the reference
  long long selection_flips = 0;   ///< of those, tokens where the block chose or ordered otherwise
  long long diverged_batches = 0;  ///< capacity batches whose drops were skipped after a flip
  double max_output_ratio = 0;     ///< largest output error / tolerance seen
  double max_value_ratio = 0;      ///< largest weight, score or logit error / tolerance seen

  void add(const Tally& o) {
    cases += o.cases;
    tokens += o.tokens;
    slot_checks += o.slot_checks;
    value_checks += o.value_checks;
    output_checks += o.output_checks;
    executor_checks += o.executor_checks;
    near_tie_tokens += o.near_tie_tokens;
    selection_flips += o.selection_flips;
    diverged_batches += o.diverged_batches;
    max_output_ratio = std::max(max_output_ratio, o.max_output_ratio);
    max_value_ratio = std::max(max_value_ratio, o.max_value_ratio);
  }
};

namespace detail {

/// A value the routing compares, with a bound on the magnitude of the terms it came from.
struct Scaled {
  double v = 0, scale = 0;
  bool excluded = false;  ///< a masked expert (the same constant in block and reference)
};

/// The comparison of one case, after both computations.
class Checker {
 public:
  Checker(const Case& c, double eps, double min_normal, Tally& tally) : tally_(tally) {
    tie_tol_ = (512.0 + 4.0 * static_cast<double>(c.config.d_model)) * eps;
    floor_ = 1e4 * min_normal;
    exact_ties_ = c.dyadic || c.router_scale == 0.0;
  }

  /// Could a and b be ordered differently by the block's rounding?
  bool near(const Scaled& a, const Scaled& b) const {
    if (a.excluded && b.excluded) return false;   // the same constant in both
    if (exact_ties_ && a.v == b.v) return false;  // an exact tie in the block too
    return std::fabs(a.v - b.v) <= tie_tol_ * (a.scale + b.scale) + floor_;
  }

  /// |got - want| <= tol (+ the underflow floor), else a failure naming `what`.
  bool close(double got, double want, double tol, const char* what, Index t, Index j) {
    ++tally_.value_checks;
    tol += floor_;
    const double err = std::fabs(got - want);
    if (tol > 0) tally_.max_value_ratio = std::max(tally_.max_value_ratio, err / tol);
    if (err <= tol) return true;
    fail(what, t, j, got, want, tol);
    return false;
  }

  void fail(const char* what, Index t, Index j, double got, double want, double tol) {
    if (!failure.empty()) return;
    std::ostringstream s;
    s.precision(17);
    s << what << " mismatch at token " << t << " slot/expert " << j << ": block " << got
      << ", reference " << want << " (tolerance " << tol << ")";
    failure = s.str();
  }
  void fail(const std::string& what) {
    if (failure.empty()) failure = what;
  }

  std::string failure;
  double tie_tol_ = 0, floor_ = 0;
  bool exact_ties_ = false;

 private:
  Tally& tally_;
};

template <class G>
struct Tag {
  using type = G;
};

}  // namespace detail

/// Runs one case with scalar T, policy Gating and expert kind Ffn; returns "" or the first
/// mismatch.
template <class T, class Gating, class Ffn>
std::string run_typed(const Case& c, const Executor& pool, Tally& tally) {
  using RouteS = RouteScalar<T>;
  const MoeConfig& cfg = c.config;
  const Index D = cfg.d_model, E = cfg.num_experts, Tn = c.tokens;
  const auto uE = static_cast<std::size_t>(E), uD = static_cast<std::size_t>(D);
  const Data data = make_data(c);
  const ref::Config rc = ref_config(c);
  const ref::Weights rw = ref_weights(data);

  // The block, serial and pooled. The pooled run reuses one workspace across cases (grow-only
  // buffers holding a previous, larger case's data must not leak into this one).
  SparseMoeBlock<T, Gating, Ffn> block(
      cfg, block_weights<T>(c, data, Ffn::gated, Gating::uses_bias, Gating::uses_noise),
      gating_options<Gating>(c));
  RowMatrix<T> x(Tn, D);
  for (Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<T>(data.x[static_cast<std::size_t>(i)]);
  RowMatrix<T> y(Tn, D), y_pool(Tn, D);
  Workspace<T> ws;
  ws.set_training(c.training);
  ws.rng().seed(c.rng_seed);
  block.forward(x, y, ws, serial_executor());
  static thread_local Workspace<T> ws_pool;
  ws_pool.set_training(c.training);
  ws_pool.rng().seed(c.rng_seed);
  block.forward(x, y_pool, ws_pool, pool);

  const Routing<RouteS>& routing = ws.routing();
  {
    const Routing<RouteS>& rp = ws_pool.routing();
    const std::size_t n = static_cast<std::size_t>(Tn * routing.slots());
    // memcmp of zero bytes still needs valid pointers, and an empty batch has none.
    auto same_bytes = [](const void* a, const void* b, std::size_t bytes) {
      return bytes == 0 || std::memcmp(a, b, bytes) == 0;
    };
    const bool same =
        rp.slots() == routing.slots() &&
        same_bytes(y.data(), y_pool.data(), static_cast<std::size_t>(y.size()) * sizeof(T)) &&
        same_bytes(routing.experts().data(), rp.experts().data(), n * sizeof(std::int32_t)) &&
        same_bytes(routing.weights().data(), rp.weights().data(), n * sizeof(RouteS)) &&
        same_bytes(routing.kept().data(), rp.kept().data(), n);
    ++tally.executor_checks;
    if (!same) return "serial executor and 2-worker ThreadPool results differ (not bitwise equal)";
  }

  // The reference, with the block's noise draws. Its noise scale is softplus(x W_noise^T); the
  // policy's is softplus + noise_epsilon, so the draws are rescaled to give the same H.
  std::vector<double> draws;
  const bool noisy = Gating::uses_noise && c.training;
  std::vector<double> noise_sd;
  if (noisy) {
    const RouteS* eps = moe::detail::WorkspaceAccess::noise(ws).data() + Tn * E;
    draws.assign(eps, eps + Tn * E);
    noise_sd = ref::noise_stddev(rc, rw, data.x, static_cast<int>(Tn));
    for (std::size_t i = 0; i < draws.size(); ++i) {
      if (noise_sd[i] > 0) draws[i] *= (noise_sd[i] + c.noise_epsilon) / noise_sd[i];
    }
  }
  const ref::Result r =
      ref::forward(rc, rw, data.x, static_cast<int>(Tn), noisy ? &draws : nullptr);

  ++tally.cases;
  tally.tokens += Tn;
  if (Tn == 0) return "";
  const double eps = std::numeric_limits<T>::epsilon();
  detail::Checker check(c, eps, static_cast<double>(std::numeric_limits<T>::min()), tally);

  // Magnitudes: L1[t][e] = sum_i |x_ti W_ei| bounds the rounding of logit z_te.
  std::vector<double> L1(static_cast<std::size_t>(Tn) * uE), L1n,
      L1max(static_cast<std::size_t>(Tn));
  if (noisy) L1n.resize(L1.size());
  for (Index t = 0; t < Tn; ++t) {
    const auto ut = static_cast<std::size_t>(t);
    for (std::size_t e = 0; e < uE; ++e) {
      double s = 0, sn = 0;
      for (std::size_t i = 0; i < uD; ++i) {
        s += std::fabs(data.x[ut * uD + i] * data.router[e * uD + i]);
        if (noisy) sn += std::fabs(data.x[ut * uD + i] * data.noise[e * uD + i]);
      }
      L1[ut * uE + e] = s;
      if (noisy) L1n[ut * uE + e] = sn;
      L1max[ut] = std::max(L1max[ut], s);
    }
  }

  // Logits and scores (noisy top-k reports softmax(z); the reference's scores are its gates).
  for (Index t = 0; t < Tn; ++t) {
    const auto ut = static_cast<std::size_t>(t);
    const std::vector<double> z(r.logits.begin() + static_cast<std::ptrdiff_t>(ut * uE),
                                r.logits.begin() + static_cast<std::ptrdiff_t>((ut + 1) * uE));
    const std::vector<double> p = ref::detail::softmax(z);
    const double rel = 64 * eps * (1 + 2 * L1max[ut]);
    for (Index e = 0; e < E; ++e) {
      const auto i = ut * uE + static_cast<std::size_t>(e);
      const double want = Gating::uses_noise ? p[static_cast<std::size_t>(e)] : r.scores[i];
      check.close(routing.logits()(t, e), r.logits[i],
                  4 * (static_cast<double>(D) + 4) * eps * L1[i], "logit", t, e);
      check.close(routing.scores()(t, e), want, rel * std::fabs(want), "score", t, e);
    }
  }
  if (!check.failure.empty()) return check.failure;

  using detail::Scaled;
  std::vector<char> skip(static_cast<std::size_t>(Tn), 0);
  std::vector<double> route_err(static_cast<std::size_t>(Tn));  // weight error, in eps
  bool diverged = false;
  auto list = [](const auto& v, std::size_t n) {
    std::ostringstream s;
    for (std::size_t j = 0; j < n; ++j) s << (j ? "," : "") << v[j];
    return s.str();
  };

  if constexpr (!std::is_same_v<Gating, gating::ExpertChoice>) {
    const Index k = cfg.top_k;
    const auto uk = static_cast<std::size_t>(k);
    const bool bounded = c.policy == Policy::capacity && expected_capacity(c) < Tn;
    const bool after_drop =
        c.policy == Policy::capacity && c.renormalize == Renormalize::after_drop;
    const std::vector<double> H =
        Gating::uses_noise
            ? ref::noisy_logits(rc, rw, data.x, static_cast<int>(Tn), noisy ? &draws : nullptr)
            : std::vector<double>();
    std::vector<std::vector<std::size_t>> match(static_cast<std::size_t>(Tn));
    std::vector<Scaled> sel(uE), ord(uE);
    for (Index t = 0; t < Tn; ++t) {
      const auto ut = static_cast<std::size_t>(t);
      route_err[ut] = 1 + 2 * L1max[ut];
      bool near_group = false;
      for (std::size_t e = 0; e < uE; ++e) {
        const std::size_t i = ut * uE + e;
        const double s = r.scores[i];
        if (c.policy == Policy::noisy) {
          double scale = L1[i] + std::fabs(H[i]);
          if (noisy) {
            const double nz_sig = -std::expm1(-noise_sd[i]);  // sigmoid(nz), sd = softplus(nz)
            scale += std::fabs(draws[i]) * (nz_sig * L1n[i] + noise_sd[i] + c.noise_epsilon);
          }
          sel[e] = ord[e] = Scaled{H[i], scale, false};
          route_err[ut] = std::max(route_err[ut], 1 + 2 * scale);
        } else if (c.policy == Policy::deepseek_v2 || c.policy == Policy::deepseek_v3) {
          const double ds = c.scoring == gating::Scoring::softmax ? s * (1 + 2 * L1max[ut])
                                                                  : s * (1 - s) * L1[i] + s;
          const double b = data.bias.empty() ? 0.0 : data.bias[e];
          sel[e] = Scaled{s + b, ds + std::fabs(b) + std::fabs(s + b), false};
          ord[e] = Scaled{s, ds, false};
        } else {
          sel[e] = ord[e] = Scaled{s, s * (1 + 2 * L1max[ut]), false};
        }
      }
      if (c.policy == Policy::deepseek_v2 || c.policy == Policy::deepseek_v3) {
        // Group scores and the kept groups (repeated scans, the lower group wins a tie); the
        // experts of the other groups become the excluded constant.
        const std::size_t G = static_cast<std::size_t>(c.n_group), per = uE / G;
        std::vector<Scaled> gs(G);
        for (std::size_t g = 0; g < G; ++g) {
          std::vector<Scaled> m(sel.begin() + static_cast<std::ptrdiff_t>(g * per),
                                sel.begin() + static_cast<std::ptrdiff_t>((g + 1) * per));
          std::stable_sort(m.begin(), m.end(),
                           [](const Scaled& a, const Scaled& b) { return a.v > b.v; });
          gs[g] = m[0];
          if (c.group_score == gating::GroupScore::top2_sum) {
            gs[g] = Scaled{m[0].v + m[1].v, m[0].scale + m[1].scale, false};
          }
        }
        std::vector<char> kept_group(G, 0);
        for (Index n = 0; n < c.topk_group; ++n) {
          std::size_t best = G;
          for (std::size_t g = 0; g < G; ++g) {
            if (!kept_group[g] && (best == G || gs[g].v > gs[best].v)) best = g;
          }
          kept_group[best] = 1;
        }
        for (std::size_t a = 0; a < G; ++a) {
          for (std::size_t b = 0; b < G; ++b) {
            if (kept_group[a] && !kept_group[b] && check.near(gs[a], gs[b])) near_group = true;
          }
        }
        const double excluded =
            c.hf_zero_group_mask ? 0.0 : -std::numeric_limits<double>::infinity();
        for (std::size_t e = 0; e < uE; ++e) {
          if (!kept_group[e / per]) sel[e] = Scaled{excluded, 0.0, true};
        }
      }
      // The reference's choice, and how close it came to another.
      std::vector<int> re(uk), be(uk);
      std::vector<char> chosen(uE, 0);
      for (std::size_t j = 0; j < uk; ++j) {
        re[j] = r.topk_idx[ut * uk + j];
        be[j] = routing.experts()(t, static_cast<Index>(j));
        chosen[static_cast<std::size_t>(re[j])] = 1;
      }
      bool near_sel = near_group, near_order = false;
      for (std::size_t a = 0; a < uE && !near_sel; ++a) {
        for (std::size_t b = 0; b < uE && chosen[a]; ++b) {
          if (!chosen[b] && check.near(sel[a], sel[b])) near_sel = true;
        }
      }
      for (std::size_t j = 0; j + 1 < uk; ++j) {
        if (check.near(ord[static_cast<std::size_t>(re[j])],
                       ord[static_cast<std::size_t>(re[j + 1])])) {
          near_order = true;
        }
      }
      if (near_sel || near_order) ++tally.near_tie_tokens;
      std::vector<int> rs = re, bs = be;
      std::sort(rs.begin(), rs.end());
      std::sort(bs.begin(), bs.end());
      const std::string where = "token " + std::to_string(t) + ": block experts " + list(be, uk) +
                                ", reference " + list(re, uk);
      if (rs != bs) {
        if (!near_sel) return "selection mismatch at " + where + " (no near-tie)";
        ++tally.selection_flips;
        skip[ut] = 1;
        diverged = diverged || bounded;
        continue;
      }
      if (re != be) {
        if (!near_order) return "slot order mismatch at " + where + " (no near-tie)";
        ++tally.selection_flips;
        diverged = diverged || bounded;
      }
      for (std::size_t j = 0; j < uk; ++j) {
        match[ut].push_back(
            static_cast<std::size_t>(std::find(be.begin(), be.end(), re[j]) - be.begin()));
      }
    }
    for (Index t = 0; t < Tn; ++t) {
      const auto ut = static_cast<std::size_t>(t);
      if (skip[ut]) continue;
      const double rel = 64 * eps * route_err[ut];
      // Scores below the normal range lose precision; group-limited weights divide them by
      // (their sum + 1e-20), which can be tiny when the bias chose experts of tiny score.
      double floor_gain = rc.routed_scaling_factor;
      if (rc.family == ref::Family::group_limited && rc.norm_topk_prob) {
        double sum = 0;
        for (std::size_t j = 0; j < uk; ++j) {
          sum += r.scores[ut * uE + static_cast<std::size_t>(r.topk_idx[ut * uk + j])];
        }
        floor_gain /= sum + 1e-20;
      }
      for (std::size_t j = 0; j < uk; ++j) {
        const auto jb = static_cast<Index>(match[ut][j]);
        ++tally.slot_checks;
        if (!diverged && (routing.kept()(t, jb) != 0) != (r.kept[ut * uk + j] != 0)) {
          return "kept mismatch at token " + std::to_string(t) + " expert " +
                 std::to_string(r.topk_idx[ut * uk + j]) + ": block " +
                 std::to_string(routing.kept()(t, jb)) + ", reference " +
                 std::to_string(r.kept[ut * uk + j]);
        }
        if (diverged && after_drop) continue;
        const double want = r.topk_weight[ut * uk + j];
        check.close(routing.weights()(t, jb), want,
                    rel * std::fabs(want) + floor_gain * check.floor_, "weight", t, jb);
      }
    }
    if (diverged) ++tally.diverged_batches;
  } else {
    // Expert choice: each expert's c tokens; a token chosen by one side only is accepted when
    // it is near-tied with a token chosen by the other side only.
    for (Index t = 0; t < Tn; ++t) {
      route_err[static_cast<std::size_t>(t)] = 1 + 2 * L1max[static_cast<std::size_t>(t)];
    }
    for (Index e = 0; e < E; ++e) {
      auto value = [&](Index t) {
        const double p = r.scores[static_cast<std::size_t>(t * E + e)];
        return Scaled{p, p * route_err[static_cast<std::size_t>(t)], false};
      };
      // The tokens each side chose alone must pair up with near-tied partners (a swap across the
      // boundary; a chain of exact ties may move the boundary, so compare with every partner).
      std::vector<Index> in_ref, out_ref, only_block, only_ref;
      for (Index t = 0; t < Tn; ++t) {
        const bool by_ref = r.kept[static_cast<std::size_t>(t * E + e)] != 0;
        (by_ref ? in_ref : out_ref).push_back(t);
        if (by_ref != (routing.kept()(t, e) != 0)) (by_ref ? only_ref : only_block).push_back(t);
      }
      auto near_any = [&](Index t, const std::vector<Index>& others) {
        for (Index o : others) {
          if (check.near(value(t), value(o))) return true;
        }
        return false;
      };
      bool near_column = false;
      for (std::size_t a = 0; a < in_ref.size() && !near_column; ++a) {
        near_column = near_any(in_ref[a], out_ref);
      }
      if (near_column) ++tally.near_tie_tokens;
      for (int side = 0; side < 2; ++side) {
        for (Index t : side == 0 ? only_block : only_ref) {
          if (!near_any(t, side == 0 ? only_ref : only_block)) {
            return "expert choice mismatch: expert " + std::to_string(e) + " token " +
                   std::to_string(t) + " chosen by " + (side == 0 ? "the block" : "the reference") +
                   " only (no near-tie)";
          }
          ++tally.selection_flips;
          skip[static_cast<std::size_t>(t)] = 1;
        }
      }
    }
    for (Index t = 0; t < Tn; ++t) {
      const auto ut = static_cast<std::size_t>(t);
      if (skip[ut]) continue;
      const double rel = 64 * eps * route_err[ut];
      for (Index e = 0; e < E; ++e) {
        const auto i = ut * uE + static_cast<std::size_t>(e);
        ++tally.slot_checks;
        if (routing.experts()(t, e) != r.topk_idx[i] ||
            (routing.kept()(t, e) != 0) != (r.kept[i] != 0)) {
          return "expert choice slot mismatch at token " + std::to_string(t) + " slot " +
                 std::to_string(e) + ": block expert " + std::to_string(routing.experts()(t, e)) +
                 ", reference " + std::to_string(r.topk_idx[i]);
        }
        check.close(routing.weights()(t, e), r.topk_weight[i], rel * std::fabs(r.topk_weight[i]),
                    "weight", t, e);
      }
    }
  }
  if (!check.failure.empty()) return check.failure;

  // Outputs, row by row, against the row's magnitude and the batch's RMS (cancellation).
  double rms = 0;
  for (double v : r.output) rms += v * v;
  rms = std::sqrt(rms / static_cast<double>(r.output.size())) + 1e-6;
  const double dims = static_cast<double>(D + cfg.d_ff + cfg.shared_d_ff);
  // A bound on the terms behind an output row: sum over its executed slots of |w| times
  // max_d sum_f |down_df| |gate_f . x| (|up_f . x|), as absolute values. Rounding (and an
  // activation evaluated in its flat tail, e.g. GELU's 1 + erf) errs relative to these terms.
  auto ffn_terms = [&](const std::vector<double>& gate, const std::vector<double>& up,
                       const std::vector<double>& down, const double* xt, Index F) {
    const auto uF = static_cast<std::size_t>(F);
    std::vector<double> a(uF);
    for (std::size_t f = 0; f < uF; ++f) {
      double h = 0, u = 0;
      for (std::size_t i = 0; i < uD; ++i) {
        h += std::fabs(gate[f * uD + i] * xt[i]);
        if (!up.empty()) u += std::fabs(up[f * uD + i] * xt[i]);
      }
      a[f] = up.empty() ? h : h * u;
    }
    double m = 0;
    for (std::size_t i = 0; i < uD; ++i) {
      double s = 0;
      for (std::size_t f = 0; f < uF; ++f) s += std::fabs(down[i * uF + f]) * a[f];
      m = std::max(m, s);
    }
    return m;
  };
  static const std::vector<double> no_up;
  for (Index t = 0; t < Tn && !diverged; ++t) {
    const auto ut = static_cast<std::size_t>(t);
    if (skip[ut]) continue;
    double row_max = 0, err = 0;
    for (std::size_t i = 0; i < uD; ++i) {
      const double want = r.output[ut * uD + i];
      row_max = std::max(row_max, std::fabs(want));
      err = std::max(err, std::fabs(static_cast<double>(y(t, static_cast<Index>(i))) - want));
    }
    const double* xt = &data.x[ut * uD];
    double terms = 0;
    for (std::size_t j = 0; j < static_cast<std::size_t>(r.slots); ++j) {
      const std::size_t i = ut * static_cast<std::size_t>(r.slots) + j;
      if (!r.kept[i]) continue;
      const auto e = static_cast<std::size_t>(r.topk_idx[i]);
      terms += std::fabs(r.topk_weight[i]) *
               ffn_terms(data.gate[e], Ffn::gated ? data.up[e] : no_up, data.down[e], xt, cfg.d_ff);
    }
    if (cfg.shared_d_ff > 0) {
      terms +=
          ffn_terms(data.s_gate, Ffn::gated ? data.s_up : no_up, data.s_down, xt, cfg.shared_d_ff);
    }
    tally.output_checks += D;
    const double tol =
        32 * eps * (route_err[ut] + dims) * (row_max + rms) + 4 * eps * (dims + 4) * terms;
    tally.max_output_ratio = std::max(tally.max_output_ratio, err / tol);
    if (!(err <= tol)) {
      std::ostringstream s;
      s.precision(6);
      s << "output mismatch at token " << t << ": max error " << err << ", tolerance " << tol
        << " (row max " << row_max << ")";
      return s.str();
    }
  }
  return "";
}

/// Runs a case with the block type its fields name; returns "" or the first mismatch.
/// Exceptions (the block's validation of a case drawn valid) are mismatches too.
template <class T>
std::string run_scalar(const Case& c, const Executor& pool, Tally& tally) {
  auto with_ffn = [&](auto gating_tag) -> std::string {
    using G = typename decltype(gating_tag)::type;
    switch (c.ffn) {
      case FfnKind::swiglu:
        return run_typed<T, G, SwiGLU>(c, pool, tally);
      case FfnKind::geglu:
        return run_typed<T, G, GeGLU>(c, pool, tally);
      case FfnKind::relu_mlp:
        return run_typed<T, G, ReluMlp>(c, pool, tally);
    }
    return "unknown ffn";
  };
  switch (c.policy) {
    case Policy::softmax_topk:
      return with_ffn(detail::Tag<gating::SoftmaxTopK>{});
    case Policy::deepseek_v2:
      return with_ffn(detail::Tag<gating::DeepSeekV2>{});
    case Policy::deepseek_v3:
      return with_ffn(detail::Tag<gating::DeepSeekV3>{});
    case Policy::capacity:
      return with_ffn(detail::Tag<gating::CapacityTopK>{});
    case Policy::noisy:
      return with_ffn(detail::Tag<gating::NoisyTopK>{});
    case Policy::expert_choice:
      return with_ffn(detail::Tag<gating::ExpertChoice>{});
  }
  return "unknown policy";
}

inline std::string run_case(const Case& c, const Executor& pool, Tally& tally) {
  try {
    return c.use_double ? run_scalar<double>(c, pool, tally) : run_scalar<float>(c, pool, tally);
  } catch (const std::exception& e) {
    return std::string("exception: ") + e.what();
  }
}

}  // namespace moe::difftest
