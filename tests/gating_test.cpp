// Gating policies (gating.hpp, gating/*.hpp) against the plain float64 reference
// (tests/reference/reference_moe.hpp), their exact rules (ties, capacity priority, group masks,
// noise), their validation messages, and the routing statistics of every policy.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/reference_moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::expect_error;

// ---------------------------------------------------------------------------------------------
// A random problem on a dyadic grid: x multiples of 1/4, weights multiples of 1/8, so the router
// logits are exact in float and double and equal rows give exactly equal scores. Some router rows
// and some token rows are copies, so exact ties between experts and between tokens occur.

double quantized(std::mt19937_64& rng, double scale, double step) {
  std::normal_distribution<double> dist(0.0, scale);
  return std::round(dist(rng) / step) * step;
}

RowMatrix<double> quantized_matrix(Index rows, Index cols, std::mt19937_64& rng, double scale,
                                   double step) {
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = quantized(rng, scale, step);
  return m;
}

struct Problem {
  MoeConfig config;
  Index tokens = 0;
  bool gated = true;
  RowMatrix<double> x, router, noise, bias;  // bias [E x 1], noise [E x D]
  std::vector<RowMatrix<double>> w_in, w_up, w_out;
  RowMatrix<double> s_in, s_up, s_out, s_gate;  // shared expert (+ gate)

  Problem(Index T, Index E, Index k, std::uint64_t seed, bool gated_experts = true,
          Index shared = 0, bool shared_gate = false)
      : tokens(T), gated(gated_experts) {
    std::mt19937_64 rng(seed);
    config.d_model = 8;
    config.d_ff = 3;
    config.num_experts = E;
    config.top_k = k;
    config.shared_d_ff = shared;
    config.shared_expert_gate = shared_gate;
    const Index D = config.d_model, F = config.d_ff;
    x = quantized_matrix(T, D, rng, 1.0, 0.25);
    for (Index t = 4; t < T; t += 5) x.row(t) = x.row(t - 2);  // equal tokens
    router = quantized_matrix(E, D, rng, 0.5, 0.125);
    for (Index e = 2; e < E; e += 3) router.row(e) = router.row(e - 1);  // equal experts
    noise = quantized_matrix(E, D, rng, 0.3, 0.125);
    bias = quantized_matrix(E, 1, rng, 0.1, 1.0 / 64);
    for (Index e = 0; e < E; ++e) {
      w_in.push_back(quantized_matrix(F, D, rng, 0.3, 1.0 / 32));
      w_up.push_back(quantized_matrix(F, D, rng, 0.3, 1.0 / 32));
      w_out.push_back(quantized_matrix(D, F, rng, 0.3, 1.0 / 32));
    }
    if (shared > 0) {
      s_in = quantized_matrix(shared, D, rng, 0.3, 1.0 / 32);
      s_up = quantized_matrix(shared, D, rng, 0.3, 1.0 / 32);
      s_out = quantized_matrix(D, shared, rng, 0.3, 1.0 / 32);
      s_gate = quantized_matrix(1, D, rng, 0.3, 1.0 / 32);
    }
  }

  template <class T>
  MoeWeights<T> weights(bool with_bias, bool with_noise) const {
    auto w = MoeWeights<T>::zeros(config, gated, with_bias, with_noise);
    w.router = router.cast<T>();
    if (with_bias) w.router_bias = bias.cast<T>();
    if (with_noise) w.router_noise = noise.cast<T>();
    for (Index e = 0; e < config.num_experts; ++e) {
      const auto ue = static_cast<std::size_t>(e);
      if (gated) {
        w.experts.set_gated(e, w_in[ue].cast<T>(), w_up[ue].cast<T>(), w_out[ue].cast<T>());
      } else {
        w.experts.set_plain(e, w_in[ue].cast<T>(), w_out[ue].cast<T>());
      }
    }
    if (config.shared_d_ff > 0) {
      w.shared.set_gated(0, s_in.cast<T>(), s_up.cast<T>(), s_out.cast<T>());
      if (config.shared_expert_gate) w.shared_gate = s_gate.cast<T>();
    }
    return w;
  }

  static std::vector<double> flat(const RowMatrix<double>& m) {
    return std::vector<double>(m.data(), m.data() + m.size());
  }

  /// The reference's view of the same problem; `family` fields are set by the caller.
  ref::Config ref_config() const {
    ref::Config c;
    c.d_model = static_cast<int>(config.d_model);
    c.d_ff = static_cast<int>(config.d_ff);
    c.num_experts = static_cast<int>(config.num_experts);
    c.top_k = static_cast<int>(config.top_k);
    c.gated = gated;
    c.activation = gated ? ref::Activation::silu : ref::Activation::relu;
    c.shared_d_ff = static_cast<int>(config.shared_d_ff);
    c.shared_gate = config.shared_expert_gate;
    return c;
  }
  ref::Weights ref_weights(bool with_bias, bool with_noise) const {
    ref::Weights w;
    w.router = flat(router);
    if (with_bias) w.router_bias = flat(bias);
    if (with_noise) w.router_noise = flat(noise);
    for (Index e = 0; e < config.num_experts; ++e) {
      const auto ue = static_cast<std::size_t>(e);
      w.gate.push_back(flat(w_in[ue]));
      if (gated) w.up.push_back(flat(w_up[ue]));
      w.down.push_back(flat(w_out[ue]));
    }
    if (config.shared_d_ff > 0) {
      w.shared_gate_proj = flat(s_in);
      w.shared_up = flat(s_up);
      w.shared_down = flat(s_out);
      if (config.shared_expert_gate) w.shared_gate_weight = flat(s_gate);
    }
    return w;
  }
};

template <class T>
double weight_tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-12;
}
template <class T>
double output_tol() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-11;
}

/// RoutingStats recomputed from the reference result (scores: the per-token distribution whose
/// entropy the statistics report, normalised per token).
void expect_stats(const RoutingStats& s, const ref::Result& r, const std::vector<double>& scores,
                  Index T, Index E) {
  std::vector<Index> load(static_cast<std::size_t>(E), 0);
  Index dropped = 0, dropped_tokens = 0, executed_total = 0;
  for (Index t = 0; t < T; ++t) {
    Index chosen = 0, executed = 0;
    for (Index j = 0; j < r.slots; ++j) {
      const auto i = static_cast<std::size_t>(t * r.slots + j);
      if (r.topk_idx[i] < 0) continue;
      ++chosen;
      if (r.kept[i]) {
        ++executed;
        ++load[static_cast<std::size_t>(r.topk_idx[i])];
      }
    }
    dropped += chosen - executed;
    dropped_tokens += (chosen > 0 && executed == 0) ? 1 : 0;
    executed_total += executed;
  }
  Index dead = 0;
  double sum = 0, max_load = 0;
  for (Index v : load) {
    dead += v == 0 ? 1 : 0;
    sum += static_cast<double>(v);
    max_load = std::max(max_load, static_cast<double>(v));
  }
  const double mean = sum / static_cast<double>(E);
  double var = 0;
  for (Index v : load) var += (static_cast<double>(v) - mean) * (static_cast<double>(v) - mean);
  var /= static_cast<double>(E);
  double entropy = 0;
  for (Index t = 0; t < T; ++t) {
    double total = 0, h = 0;
    for (Index e = 0; e < E; ++e) total += scores[static_cast<std::size_t>(t * E + e)];
    for (Index e = 0; e < E; ++e) {
      const double p = scores[static_cast<std::size_t>(t * E + e)] / total;
      if (p > 0) h -= p * std::log(p);
    }
    entropy += h;
  }
  ASSERT_EQ(s.tokens_per_expert.size(), static_cast<std::size_t>(E));
  for (Index e = 0; e < E; ++e) {
    EXPECT_EQ(s.tokens_per_expert[static_cast<std::size_t>(e)], load[static_cast<std::size_t>(e)])
        << "expert " << e;
  }
  EXPECT_EQ(s.assignments, executed_total);
  EXPECT_EQ(s.dropped, dropped);
  EXPECT_EQ(s.dropped_tokens, dropped_tokens);
  EXPECT_EQ(s.dead_experts, dead);
  EXPECT_NEAR(s.imbalance, mean > 0 ? max_load / mean : 0.0, 1e-12);
  EXPECT_NEAR(s.load_cv, mean > 0 ? std::sqrt(var) / mean : 0.0, 1e-12);
  EXPECT_NEAR(s.mean_entropy, entropy / static_cast<double>(T), 1e-5);
}

std::vector<double> softmax_rows(const std::vector<double>& logits, Index T, Index E) {
  std::vector<double> out(logits.size());
  for (Index t = 0; t < T; ++t) {
    const std::vector<double> row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    const std::vector<double> p = ref::detail::softmax(row);
    std::copy(p.begin(), p.end(), out.begin() + t * E);
  }
  return out;
}

/// Runs the block with Gating on the problem and compares routing (experts and kept exactly,
/// weights and scores to the scalar's tolerance), output and statistics with the reference.
template <class T, class Gating, class Ffn = SwiGLU>
void expect_matches_reference(const Problem& p, const typename Gating::Options& options,
                              const ref::Config& rc, bool training = false,
                              std::uint64_t rng_seed = 7) {
  const bool bias = Gating::uses_bias, noise = Gating::uses_noise;
  SparseMoeBlock<T, Gating, Ffn> block(p.config, p.weights<T>(bias, noise), options);
  const RowMatrix<T> x = p.x.cast<T>();
  RowMatrix<T> y(x.rows(), x.cols());
  Workspace<T> ws;
  ws.set_training(training);
  ws.rng().seed(rng_seed);
  block.forward(x, y, ws);

  const Index T_ = p.tokens, E = p.config.num_experts;
  std::vector<double> draws;
  if (noise && training) {
    const auto* d = moe::detail::WorkspaceAccess::noise(ws).data() + T_ * E;
    draws.assign(d, d + T_ * E);
  }
  const ref::Result r = ref::forward(rc, p.ref_weights(bias, noise), Problem::flat(p.x),
                                     static_cast<int>(T_), draws.empty() ? nullptr : &draws);
  const auto& routing = ws.routing();
  ASSERT_EQ(routing.slots(), r.slots);
  Index mismatches = 0;
  for (Index t = 0; t < T_; ++t) {
    for (Index j = 0; j < r.slots; ++j) {
      const auto i = static_cast<std::size_t>(t * r.slots + j);
      const bool same = routing.experts()(t, j) == r.topk_idx[i] &&
                        (routing.kept()(t, j) != 0) == (r.kept[i] != 0);
      if (!same && mismatches++ < 3) {
        ADD_FAILURE() << "token " << t << " slot " << j << ": expert " << routing.experts()(t, j)
                      << " kept " << int(routing.kept()(t, j)) << ", reference " << r.topk_idx[i]
                      << " kept " << r.kept[i];
      }
      if (same) {
        EXPECT_NEAR(routing.weights()(t, j), r.topk_weight[i],
                    weight_tol<T>() * (1 + std::abs(r.topk_weight[i])))
            << "token " << t << " slot " << j;
      }
    }
  }
  ASSERT_EQ(mismatches, 0);
  // Noisy top-k reports softmax(z) as its scores (the reference reports the gate vector).
  const std::vector<double> scores = noise ? softmax_rows(r.logits, T_, E) : r.scores;
  double score_err = 0;
  for (Index t = 0; t < T_; ++t) {
    for (Index e = 0; e < E; ++e) {
      score_err = std::max(score_err, std::abs(routing.scores()(t, e) -
                                               scores[static_cast<std::size_t>(t * E + e)]));
    }
  }
  EXPECT_LE(score_err, weight_tol<T>());
  double out_err = 0, out_max = 0;
  for (Index i = 0; i < y.size(); ++i) {
    out_err =
        std::max(out_err, std::abs(double(y.data()[i]) - r.output[static_cast<std::size_t>(i)]));
    out_max = std::max(out_max, std::abs(r.output[static_cast<std::size_t>(i)]));
  }
  EXPECT_LE(out_err, output_tol<T>() * (1 + out_max));
  expect_stats(ws.stats(), r, scores, T_, E);
}

std::string sizes(Index T, Index E, Index k) {
  return detail::concat("T = ", T, ", E = ", E, ", k = ", k);
}

template <class T>
class GatingTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(GatingTyped, Scalars);

const Index kTokens[] = {1, 7, 31, 129};
const Index kExperts[] = {8, 31, 64};
const Index kTopK[] = {1, 2, 4};

// ---------------------------------------------------------------------------------------------
// SoftmaxTopK: Mixtral / Qwen3 (renormalised), Qwen2 / OLMoE (raw probabilities), shared experts.

TYPED_TEST(GatingTyped, SoftmaxTopKMatchesReference) {
  std::uint64_t seed = 100;
  for (Index T : kTokens) {
    for (Index E : kExperts) {
      for (Index k : kTopK) {
        for (bool normalize : {true, false}) {
          SCOPED_TRACE(sizes(T, E, k) + (normalize ? ", normalised" : ", raw"));
          // Qwen2-MoE style gated shared expert on the raw-probability runs.
          const Problem p(T, E, k, ++seed, true, normalize ? 0 : 5, !normalize);
          ref::Config rc = p.ref_config();
          rc.family = ref::Family::topk;
          rc.norm_topk_prob = normalize;
          expect_matches_reference<TypeParam, gating::SoftmaxTopK>(
              p, gating::SoftmaxTopK::Options{normalize}, rc);
        }
      }
    }
  }
}

TEST(GatingPresets, SoftmaxTopKFamilies) {
  EXPECT_TRUE(gating::SoftmaxTopK::Options::mixtral().normalize);
  EXPECT_FALSE(gating::SoftmaxTopK::Options::qwen2_moe().normalize);
  EXPECT_TRUE(gating::SoftmaxTopK::Options::qwen3_moe().normalize);
  EXPECT_FALSE(gating::SoftmaxTopK::Options::olmoe().normalize);
  const auto v3 = gating::GroupLimitedTopK::Options::deepseek_v3(8, 4, 2.5);
  EXPECT_EQ(v3.scoring, gating::Scoring::sigmoid);
  EXPECT_EQ(v3.group_score, gating::GroupScore::top2_sum);
  EXPECT_TRUE(v3.normalize);
  EXPECT_FALSE(v3.hf_zero_group_mask);
  const auto v2 = gating::DeepSeekV2::Options::deepseek_v2(8, 3, 16.0);
  EXPECT_EQ(v2.scoring, gating::Scoring::softmax);
  EXPECT_EQ(v2.group_score, gating::GroupScore::max);
  EXPECT_FALSE(v2.normalize);
  EXPECT_TRUE(gating::GroupLimitedTopK::uses_bias);
  EXPECT_FALSE(gating::DeepSeekV2::uses_bias);
}

// Exact ties: equal logits go to the lower expert index, in every top-k policy.
TYPED_TEST(GatingTyped, EqualScoresGoToTheLowerExpertIndex) {
  using S = RouteScalar<TypeParam>;
  MoeConfig c;
  c.d_model = 1;
  c.d_ff = 1;
  c.num_experts = 6;
  c.top_k = 3;
  Routing<S> r;
  auto run = [&](const auto& policy) {
    r.resize(1, 6, policy.slots(c));
    const S z[6] = {0.5f, 1, 0.25f, 1, 0.5f, 1};
    for (Index e = 0; e < 6; ++e) r.logits()(0, e) = z[e];
    RouteContext<S> ctx;
    const S zero_bias[6] = {0, 0, 0, 0, 0, 0};
    ctx.selection_bias = zero_bias;
    policy.route(c, ctx, r);
    return std::vector<std::int32_t>{r.experts()(0, 0), r.experts()(0, 1), r.experts()(0, 2)};
  };
  const std::vector<std::int32_t> want = {1, 3, 5};
  EXPECT_EQ(run(gating::SoftmaxTopK()), want);
  EXPECT_EQ(run(gating::GroupLimitedTopK(gating::GroupLimitedTopK::Options::deepseek_v3(1, 1, 1))),
            want);
  EXPECT_EQ(run(gating::CapacityTopK(gating::CapacityTopK::Options::dropless())), want);
  EXPECT_EQ(run(gating::NoisyTopK()), want);
  // Group ties: groups {0,1}, {2,3}, {4,5} have max 1 each: the lowest kept group wins.
  gating::DeepSeekV2 v2(gating::DeepSeekV2::Options::deepseek_v2(3, 1, 1.0));
  c.top_k = 2;
  r.resize(1, 6, 2);
  for (Index e = 0; e < 6; ++e) r.logits()(0, e) = S(e % 2 == 1 ? 1 : 0);
  v2.route(c, RouteContext<S>{}, r);
  EXPECT_EQ(r.experts()(0, 0), 1);
  EXPECT_EQ(r.experts()(0, 1), 0);
}

// A token with NaN logits never produces an out-of-range expert, in any policy, and does not
// change the routing of the other tokens.
TYPED_TEST(GatingTyped, NaNLogitsKeepExpertsInRange) {
  using S = RouteScalar<TypeParam>;
  MoeConfig c;
  c.d_model = 1;
  c.d_ff = 1;
  c.num_experts = 8;
  c.top_k = 2;
  std::mt19937_64 rng(9);
  const RowMatrix<double> z = test::random_matrix<double>(5, 8, rng);
  const S bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto check = [&](const auto& policy) {
    Routing<S> clean, dirty;
    for (Routing<S>* r : {&clean, &dirty}) {
      r->resize(5, 8, policy.slots(c));
      r->logits() = z.cast<S>();
    }
    dirty.logits()(2, 3) = std::numeric_limits<S>::quiet_NaN();
    RouteContext<S> ctx;
    ctx.selection_bias = bias;
    policy.validate(c);
    policy.route(c, ctx, clean);
    policy.route(c, ctx, dirty);
    for (Index t = 0; t < 5; ++t) {
      for (Index j = 0; j < dirty.slots(); ++j) {
        const std::int32_t e = dirty.experts()(t, j);
        EXPECT_TRUE(e == -1 || (e >= 0 && e < 8)) << "token " << t << " slot " << j;
        if (dirty.kept()(t, j)) {
          EXPECT_GE(e, 0);
        }
        if (t != 2) {
          EXPECT_EQ(e, clean.experts()(t, j)) << "token " << t << " slot " << j;
        }
      }
    }
  };
  check(gating::SoftmaxTopK());
  check(gating::GroupLimitedTopK(gating::GroupLimitedTopK::Options::deepseek_v3(4, 2, 2.5)));
  check(gating::DeepSeekV2(gating::DeepSeekV2::Options::deepseek_v2(4, 2, 16.0)));
  check(gating::CapacityTopK(gating::CapacityTopK::Options::dropless()));
  check(gating::NoisyTopK());
}

// ---------------------------------------------------------------------------------------------
// Group-limited (DeepSeek-V3 / V2).

TYPED_TEST(GatingTyped, DeepSeekV3MatchesReference) {
  struct Grouping {
    Index E, n_group, topk_group;
    gating::GroupScore score;
  };
  const Grouping groupings[] = {{8, 4, 2, gating::GroupScore::top2_sum},
                                {31, 1, 1, gating::GroupScore::top2_sum},
                                {31, 31, 4, gating::GroupScore::max},
                                {64, 8, 3, gating::GroupScore::top2_sum}};
  std::uint64_t seed = 200;
  for (Index T : kTokens) {
    for (const Grouping& g : groupings) {
      for (Index k : kTopK) {
        if (k > g.topk_group * (g.E / g.n_group)) continue;
        for (bool hf_mask : {false, true}) {
          SCOPED_TRACE(sizes(T, g.E, k) + detail::concat(", n_group = ", g.n_group,
                                                         ", topk_group = ", g.topk_group,
                                                         hf_mask ? ", hf mask" : ""));
          const Problem p(T, g.E, k, ++seed, true, 4, false);  // DeepSeek: ungated shared
          auto o = gating::GroupLimitedTopK::Options::deepseek_v3(g.n_group, g.topk_group, 2.5);
          o.group_score = g.score;
          o.hf_zero_group_mask = hf_mask;
          ref::Config rc = p.ref_config();
          rc.family = ref::Family::group_limited;
          rc.scoring = ref::Scoring::sigmoid;
          rc.group_score =
              g.score == gating::GroupScore::max ? ref::GroupScore::max : ref::GroupScore::top2_sum;
          rc.n_group = static_cast<int>(g.n_group);
          rc.topk_group = static_cast<int>(g.topk_group);
          rc.routed_scaling_factor = 2.5;
          rc.norm_topk_prob = true;
          rc.hf_zero_group_mask = hf_mask;
          expect_matches_reference<TypeParam, gating::GroupLimitedTopK>(p, o, rc);
        }
      }
    }
  }
}

TYPED_TEST(GatingTyped, DeepSeekV2MatchesReference) {
  std::uint64_t seed = 300;
  for (Index T : kTokens) {
    for (Index E : {Index(8), Index(64)}) {
      for (Index k : kTopK) {
        SCOPED_TRACE(sizes(T, E, k));
        const Problem p(T, E, k, ++seed);
        const auto o = gating::DeepSeekV2::Options::deepseek_v2(4, 2, 16.0);
        ref::Config rc = p.ref_config();
        rc.family = ref::Family::group_limited;
        rc.scoring = ref::Scoring::softmax;
        rc.group_score = ref::GroupScore::max;
        rc.n_group = 4;
        rc.topk_group = 2;
        rc.routed_scaling_factor = 16.0;
        rc.norm_topk_prob = false;
        expect_matches_reference<TypeParam, gating::DeepSeekV2>(p, o, rc);
      }
    }
  }
}

// Biased scores below zero: excluded groups at -inf keep the choice inside the kept groups;
// Hugging Face's 0.0 fill makes every excluded expert beat them (DeepSeek-V3, FORMAT.md 5.4).
TYPED_TEST(GatingTyped, NegativeBiasedScoresMinusInfVersusHfZeroMask) {
  using S = RouteScalar<TypeParam>;
  MoeConfig c;
  c.d_model = 1;
  c.d_ff = 1;
  c.num_experts = 8;
  c.top_k = 3;
  // s = sigmoid(0) = 0.5 for every expert; choice = 0.5 + bias: group 0 (-0.1), group 1 (-0.2),
  // group 2 (-0.3), group 3 (-0.4). Group scores -0.2, -0.4, -0.6, -0.8: groups 0 and 1 kept.
  const S bias[8] = {S(-0.6), S(-0.6), S(-0.7), S(-0.7), S(-0.8), S(-0.8), S(-0.9), S(-0.9)};
  RouteContext<S> ctx;
  ctx.selection_bias = bias;
  auto route = [&](bool hf_mask) {
    auto o = gating::GroupLimitedTopK::Options::deepseek_v3(4, 2, 2.5);
    o.hf_zero_group_mask = hf_mask;
    gating::GroupLimitedTopK g(o);
    g.validate(c);
    Routing<S> r;
    r.resize(1, 8, 3);
    r.logits().setZero();
    g.route(c, ctx, r);
    std::vector<std::int32_t> idx;
    for (Index j = 0; j < 3; ++j) {
      idx.push_back(r.experts()(0, j));
      EXPECT_NEAR(r.weights()(0, j), 2.5 / 3, 1e-6);  // unbiased, renormalised, scaled
    }
    return idx;
  };
  EXPECT_EQ(route(false), (std::vector<std::int32_t>{0, 1, 2}));  // all inside groups 0 and 1
  EXPECT_EQ(route(true), (std::vector<std::int32_t>{4, 5, 6}));   // 0.0 beats every kept choice

  // The reference agrees on both.
  ref::Config rc;
  rc.d_model = 1;
  rc.d_ff = 1;
  rc.num_experts = 8;
  rc.top_k = 3;
  rc.family = ref::Family::group_limited;
  rc.scoring = ref::Scoring::sigmoid;
  rc.n_group = 4;
  rc.topk_group = 2;
  rc.routed_scaling_factor = 2.5;
  ref::Weights w;
  w.router.assign(8, 0.0);
  for (Index e = 0; e < 8; ++e) w.router_bias.push_back(double(bias[e]));
  w.gate.assign(8, {0.0});
  w.up.assign(8, {0.0});
  w.down.assign(8, {0.0});
  EXPECT_EQ(ref::forward(rc, w, {1.0}, 1).topk_idx, (std::vector<int>{0, 1, 2}));
  rc.hf_zero_group_mask = true;
  EXPECT_EQ(ref::forward(rc, w, {1.0}, 1).topk_idx, (std::vector<int>{4, 5, 6}));
}

TEST(GatingValidation, GroupLimitedMessages) {
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 4;
  c.num_experts = 10;
  c.top_k = 2;
  using G = gating::GroupLimitedTopK;
  auto check = [&](const G::Options& o, const std::string& message) {
    expect_error<config_error>([&] { G(o).validate(c); }, message);
  };
  check(G::Options::deepseek_v3(4, 2, 1.0),
        "moe: num_experts = 10 is not divisible by n_group = 4");
  c.num_experts = 16;
  check(G::Options::deepseek_v3(4, 5, 1.0), "moe: topk_group = 5 exceeds n_group = 4");
  check(G::Options::deepseek_v3(0, 1, 1.0), "moe: n_group = 0 must be positive");
  check(G::Options::deepseek_v3(4, 0, 1.0), "moe: topk_group = 0 must be positive");
  check(G::Options::deepseek_v3(16, 2, 1.0),
        "moe: group_score top2_sum needs at least 2 experts per group, num_experts / n_group = 1");
  c.top_k = 9;
  check(G::Options::deepseek_v3(4, 2, 1.0),
        "moe: top_k = 9 exceeds topk_group * experts_per_group = 2 * 4 = 8");
  c.top_k = 2;
  check(G::Options::deepseek_v3(4, 2, 0.0), "moe: routed_scaling_factor = 0 must be positive");
  check(G::Options::deepseek_v3(4, 2, std::numeric_limits<double>::infinity()),
        "moe: routed_scaling_factor = inf must be finite");
  EXPECT_NO_THROW(G(G::Options::deepseek_v3(4, 2, 2.5)).validate(c));

  // Through the block: a non-finite selection bias (MoeWeights::validate).
  std::mt19937_64 rng(1);
  auto w = test::random_weights<float>(c, rng, true, true);
  w.router_bias(3) = std::numeric_limits<float>::quiet_NaN();
  expect_error<value_error>(
      [&] { SparseMoeBlock<float, G> b(c, std::move(w), G::Options::deepseek_v3(4, 2, 2.5)); },
      "moe: router bias has non-finite values");
}

// ---------------------------------------------------------------------------------------------
// Capacity (Switch / GShard).

TYPED_TEST(GatingTyped, CapacityTopKMatchesReference) {
  using C = gating::CapacityTopK;
  std::uint64_t seed = 400;
  for (Index T : kTokens) {
    for (Index E : kExperts) {
      for (Index k : kTopK) {
        for (auto renorm :
             {C::Renormalize::none, C::Renormalize::before_drop, C::Renormalize::after_drop}) {
          for (double cf : {0.5, 1.0, 1.25}) {
            SCOPED_TRACE(sizes(T, E, k) +
                         detail::concat(", capacity_factor = ", cf, ", renormalize ", int(renorm)));
            const Problem p(T, E, k, ++seed, /*gated=*/false);
            C::Options o;
            o.capacity = C::Capacity::factor;
            o.capacity_factor = cf;
            o.renormalize = renorm;
            ref::Config rc = p.ref_config();
            rc.family = ref::Family::capacity_topk;
            rc.capacity = static_cast<long>(C(o).capacity(p.config, T));
            rc.norm_topk_prob = renorm == C::Renormalize::before_drop;
            rc.renormalize_after_drop = renorm == C::Renormalize::after_drop;
            expect_matches_reference<TypeParam, C, ReluMlp>(p, o, rc);
          }
        }
      }
    }
  }
}

TEST(GatingCapacity, CapacityForms) {
  using C = gating::CapacityTopK;
  MoeConfig c;
  c.num_experts = 8;
  c.top_k = 2;
  C::Options o = C::Options::gshard(1.25);
  EXPECT_EQ(C(o).capacity(c, 7), 3);  // ceil(1.25 * 2 * 7 / 8) = ceil(2.1875)
  o.min_capacity = 4;
  EXPECT_EQ(C(o).capacity(c, 7), 4);  // min_capacity
  o.min_capacity = 100;
  EXPECT_EQ(C(o).capacity(c, 7), 7);  // clamped to T
  o = C::Options::gshard(100.0);
  EXPECT_EQ(C(o).capacity(c, 129), 129);
  o = C::Options::gshard(1.0);
  EXPECT_EQ(C(o).capacity(c, 1), 1);  // ceil(2 / 8)
  EXPECT_EQ(C(o).capacity(c, 128), 32);
  c.top_k = 1;
  EXPECT_EQ(C(C::Options::switch_transformers(3)).capacity(c, 36), 3);
  EXPECT_EQ(C(C::Options::switch_transformers(100)).capacity(c, 5), 5);  // clamped to T
  EXPECT_EQ(C(C::Options::dropless()).capacity(c, 5), 5);
}

template <class S>
Routing<S> route_logits(const gating::CapacityTopK& g, const MoeConfig& c,
                        const std::vector<std::vector<double>>& z) {
  Routing<S> r;
  r.resize(static_cast<Index>(z.size()), c.num_experts, g.slots(c));
  for (Index t = 0; t < r.num_tokens(); ++t) {
    for (Index e = 0; e < c.num_experts; ++e) {
      r.logits()(t, e) =
          static_cast<S>(z[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)]);
    }
  }
  g.validate(c);
  g.route(c, RouteContext<S>{}, r);
  return r;
}

// Switch: first come, first served in token order; a dropped token keeps its expert and weight
// but is not executed, and its block output row is exactly zero (FORMAT.md 5.5).
TYPED_TEST(GatingTyped, SwitchFirstComeFirstServedAndZeroRows) {
  using T = TypeParam;
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 3;
  c.num_experts = 2;
  c.top_k = 1;
  std::mt19937_64 rng(3);
  auto w = test::random_weights<T>(c, rng, /*gated=*/false);
  // Every token prefers expert 0: x . router_0 > x . router_1.
  w.router.setZero();
  w.router(0, 0) = 1;
  RowMatrix<T> x = test::random_matrix<T>(6, 4, rng);
  for (Index t = 0; t < 6; ++t) x(t, 0) = T(1 + t);
  using C = gating::CapacityTopK;
  SparseMoeBlock<T, C, ReluMlp> block(c, std::move(w), C::Options::switch_transformers(2));
  RowMatrix<T> y(6, 4);
  Workspace<T> ws;
  block.forward(x, y, ws);
  const auto& r = ws.routing();
  for (Index t = 0; t < 6; ++t) {
    EXPECT_EQ(r.experts()(t, 0), 0);
    EXPECT_EQ(r.kept()(t, 0), t < 2 ? 1 : 0) << "token " << t;
    EXPECT_GT(r.weights()(t, 0), 0.5);  // the top-1 probability is still reported
    if (t >= 2) {
      EXPECT_TRUE((y.row(t).array() == T(0)).all()) << "token " << t;
    }
  }
  EXPECT_EQ(ws.stats().dropped, 4);
  EXPECT_EQ(ws.stats().dropped_tokens, 4);
  EXPECT_EQ(ws.stats().assignments, 2);
  EXPECT_EQ(ws.stats().dead_experts, 1);
  EXPECT_EQ(ws.stats().tokens_per_expert, (std::vector<Index>{2, 0}));
}

// GShard: all first choices are served before any second choice, even an earlier token's.
TYPED_TEST(GatingTyped, FirstChoicesBeforeSecondChoices) {
  using S = RouteScalar<TypeParam>;
  using C = gating::CapacityTopK;
  MoeConfig c;
  c.num_experts = 3;
  c.top_k = 2;
  C::Options o = C::Options::gshard();
  o.capacity = C::Capacity::absolute;
  o.expert_capacity = 2;
  // token 0: (e1, e0); tokens 1 and 2: (e0, e2).
  const auto r = route_logits<S>(C(o), c, {{1, 2, 0}, {2, 0, 1}, {2, 0, 1}});
  EXPECT_EQ(r.experts()(0, 0), 1);
  EXPECT_EQ(r.experts()(0, 1), 0);
  EXPECT_EQ(r.kept()(0, 0), 1);
  EXPECT_EQ(r.kept()(0, 1), 0);  // e0 is full with the first choices of tokens 1 and 2
  for (Index t = 1; t < 3; ++t) {
    EXPECT_EQ(r.kept()(t, 0), 1);
    EXPECT_EQ(r.kept()(t, 1), 1);
  }
  // after_drop: token 0's kept weight becomes 1; the dropped slot keeps its probability.
  EXPECT_NEAR(r.weights()(0, 0), 1.0, 1e-7);
  const double p0 = std::exp(1.0) / (std::exp(1.0) + std::exp(2.0) + 1.0);
  EXPECT_NEAR(r.weights()(0, 1), p0, 1e-6);
  // before_drop: the weights are fixed before dropping; none: raw probabilities.
  o.renormalize = C::Renormalize::before_drop;
  const auto rb = route_logits<S>(C(o), c, {{1, 2, 0}, {2, 0, 1}, {2, 0, 1}});
  const double p1 = std::exp(2.0) / (std::exp(1.0) + std::exp(2.0) + 1.0);
  EXPECT_NEAR(rb.weights()(0, 0), p1 / (p0 + p1), 1e-6);
  o.renormalize = C::Renormalize::none;
  const auto rn = route_logits<S>(C(o), c, {{1, 2, 0}, {2, 0, 1}, {2, 0, 1}});
  EXPECT_NEAR(rn.weights()(0, 0), p1, 1e-6);
  // Dropless: nothing dropped.
  const auto rd = route_logits<S>(C(C::Options::dropless()), c, {{1, 2, 0}, {2, 0, 1}, {2, 0, 1}});
  for (Index t = 0; t < 3; ++t) {
    for (Index j = 0; j < 2; ++j) EXPECT_EQ(rd.kept()(t, j), 1);
  }
}

TEST(GatingValidation, CapacityMessages) {
  using C = gating::CapacityTopK;
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 4;
  c.num_experts = 8;
  c.top_k = 1;
  expect_error<config_error>([&] { C(C::Options::switch_transformers(0)).validate(c); },
                             "moe: expert_capacity = 0 must be positive");
  expect_error<config_error>([&] { C(C::Options::gshard(0.0)).validate(c); },
                             "moe: capacity_factor = 0 must be positive");
  expect_error<config_error>([&] { C(C::Options::gshard(-0.5)).validate(c); },
                             "moe: capacity_factor = -0.5 must be positive");
  expect_error<config_error>(
      [&] { C(C::Options::gshard(std::numeric_limits<double>::quiet_NaN())).validate(c); },
      "moe: capacity_factor = nan must be finite");
  expect_error<config_error>([&] { C(C::Options::gshard(1.0, -1)).validate(c); },
                             "moe: min_capacity = -1 must be >= 0");
  EXPECT_NO_THROW(C(C::Options::dropless()).validate(c));
  // The block validates its options at construction.
  std::mt19937_64 rng(1);
  expect_error<config_error>(
      [&] {
        SparseMoeBlock<float, C, ReluMlp> b(c, test::random_weights<float>(c, rng, false),
                                            C::Options::switch_transformers(0));
      },
      "moe: expert_capacity = 0 must be positive");
}

// ---------------------------------------------------------------------------------------------
// Noisy top-k (Shazeer 2017).

TYPED_TEST(GatingTyped, NoisyTopKMatchesReferenceInTrainingAndInference) {
  std::uint64_t seed = 500;
  for (Index T : kTokens) {
    for (Index E : kExperts) {
      for (Index k : kTopK) {
        for (bool training : {true, false}) {
          SCOPED_TRACE(sizes(T, E, k) + (training ? ", training" : ", inference"));
          const Problem p(T, E, k, ++seed);
          ref::Config rc = p.ref_config();
          rc.family = ref::Family::noisy_topk;
          expect_matches_reference<TypeParam, gating::NoisyTopK>(p, {}, rc, training, seed);
        }
      }
    }
  }
}

TYPED_TEST(GatingTyped, NoisyTopKIsReproducibleAndNoiseFreeAtInference) {
  using T = TypeParam;
  const Problem p(31, 8, 2, 42);
  SparseMoeBlock<T, gating::NoisyTopK> noisy(p.config, p.weights<T>(false, true));
  SparseMoeBlock<T, gating::SoftmaxTopK> plain(p.config, p.weights<T>(false, false));
  const RowMatrix<T> x = p.x.cast<T>();
  auto run = [&](const auto& block, bool training, std::uint64_t seed, Workspace<T>& ws) {
    ws.set_training(training);
    ws.rng().seed(seed);
    RowMatrix<T> y(x.rows(), x.cols());
    block.forward(x, y, ws);
    return y;
  };
  Workspace<T> a, b, c, d;
  const RowMatrix<T> ya = run(noisy, true, 11, a), yb = run(noisy, true, 11, b);
  EXPECT_TRUE(ya == yb);  // same seed, same draws, same result
  EXPECT_TRUE(a.routing().experts() == b.routing().experts());
  const RowMatrix<T> yc = run(noisy, true, 12, c);
  EXPECT_FALSE(ya == yc);  // another seed routes differently
  // Inference: no draw, and the same routing as softmax top-k renormalised.
  const RowMatrix<T> yd = run(noisy, false, 11, d);
  std::mt19937_64 after = d.rng(), seeded(11);
  EXPECT_TRUE(after == seeded);  // the generator was not advanced
  Workspace<T> e;
  const RowMatrix<T> ye = run(plain, false, 0, e);
  EXPECT_TRUE(d.routing().experts() == e.routing().experts());
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  EXPECT_LE((yd - ye).cwiseAbs().maxCoeff(), tol);
  // scores() is softmax(z) over all experts in both modes.
  EXPECT_LE((a.routing().scores() - e.routing().scores()).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(GatingNoisy, DrawsAreStandardNormal) {
  std::mt19937_64 rng(5);
  std::vector<double> v(200001);
  gating::detail::standard_normal(rng, v.data(), static_cast<Index>(v.size()));
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= double(v.size());
  for (double x : v) var += (x - mean) * (x - mean);
  var /= double(v.size());
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(var, 1.0, 0.01);
  std::mt19937_64 again(5);
  std::vector<double> w(7);
  gating::detail::standard_normal(again, w.data(), 7);  // odd count: same prefix
  for (std::size_t i = 0; i < 7; ++i) EXPECT_EQ(w[i], v[i]);
}

TEST(GatingValidation, NoisyMessages) {
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 4;
  c.num_experts = 8;
  c.top_k = 2;
  gating::NoisyTopK::Options o;
  o.noise_epsilon = -1;
  expect_error<config_error>([&] { gating::NoisyTopK(o).validate(c); },
                             "moe: noise_epsilon = -1 must be finite and >= 0");
  Routing<float> r;
  r.resize(2, 8, 2);
  r.logits().setZero();
  RouteContext<float> ctx;
  ctx.training = true;
  expect_error<config_error>([&] { gating::NoisyTopK().route(c, ctx, r); },
                             "moe: noisy top-k in training needs noise logits, a noise draw "
                             "buffer and an rng");
  // The block needs the noise projection.
  std::mt19937_64 rng(1);
  expect_error<shape_error>(
      [&] { SparseMoeBlock<float, gating::NoisyTopK> b(c, test::random_weights<float>(c, rng)); },
      "moe: router noise weight has shape [0 x 0], expected [8 x 4]");
}

// ---------------------------------------------------------------------------------------------
// Expert choice (Zhou 2022).

TYPED_TEST(GatingTyped, ExpertChoiceMatchesReference) {
  std::uint64_t seed = 600;
  for (Index T : kTokens) {
    for (Index E : kExperts) {
      for (double cf : {0.5, 1.0, 2.0}) {
        SCOPED_TRACE(sizes(T, E, 1) + detail::concat(", capacity_factor = ", cf));
        const Problem p(T, E, 1, ++seed);
        ref::Config rc = p.ref_config();
        rc.family = ref::Family::expert_choice;
        rc.capacity_factor = cf;
        expect_matches_reference<TypeParam, gating::ExpertChoice>(
            p, gating::ExpertChoice::Options{cf}, rc);
      }
    }
  }
}

TYPED_TEST(GatingTyped, ExpertChoiceTokenCounts) {
  using T = TypeParam;
  for (Index tokens : kTokens) {
    for (double cf : {1.0, 2.0, 100.0}) {
      const Index E = 8;
      const Problem p(tokens, E, 1, 77);
      const gating::ExpertChoice::Options o{cf};
      SparseMoeBlock<T, gating::ExpertChoice> block(p.config, p.weights<T>(false, false), o);
      const Index c = gating::ExpertChoice(o).capacity(tokens, E);
      EXPECT_EQ(c, std::min(tokens, static_cast<Index>(std::ceil(cf * double(tokens) / 8))));
      RowMatrix<T> y(tokens, p.config.d_model);
      Workspace<T> ws;
      block.forward(p.x.cast<T>(), y, ws);
      const auto& s = ws.stats();
      EXPECT_EQ(s.tokens_per_expert, std::vector<Index>(8, c));  // every expert takes c tokens
      EXPECT_EQ(s.assignments, E * c);
      EXPECT_EQ(s.dropped, 0);
      EXPECT_EQ(s.dead_experts, 0);
      EXPECT_DOUBLE_EQ(s.imbalance, 1.0);
      EXPECT_DOUBLE_EQ(s.load_cv, 0.0);
      Index total = 0;
      for (Index t = 0; t < tokens; ++t) {
        for (Index j = 0; j < E; ++j) {
          const bool kept = ws.routing().kept()(t, j) != 0;
          EXPECT_EQ(ws.routing().experts()(t, j), kept ? j : -1);
          total += kept ? 1 : 0;
        }
      }
      EXPECT_EQ(total, E * c);
    }
  }
}

// Not causal: a later token can take an earlier token's expert.
TEST(GatingExpertChoice, RoutingOfATokenDependsOnLaterTokens) {
  MoeConfig c;
  c.num_experts = 2;
  c.top_k = 1;
  gating::ExpertChoice g;
  auto route = [&](const std::vector<std::vector<float>>& z) {
    Routing<float> r;
    r.resize(static_cast<Index>(z.size()), 2, 2);
    for (Index t = 0; t < r.num_tokens(); ++t) {
      for (Index e = 0; e < 2; ++e) r.logits()(t, e) = z[std::size_t(t)][std::size_t(e)];
    }
    g.route(c, RouteContext<float>{}, r);
    return r;
  };
  const auto a = route({{2, 0}, {0, 0}});  // c = 1: expert 0 takes token 0
  EXPECT_EQ(a.experts()(0, 0), 0);
  const auto b = route({{2, 0}, {3, 0}});  // a later, stronger token takes it
  EXPECT_EQ(b.experts()(0, 0), -1);
  EXPECT_EQ(b.experts()(1, 0), 0);
}

TEST(GatingValidation, ExpertChoiceMessages) {
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 4;
  c.num_experts = 8;
  c.top_k = 1;
  expect_error<config_error>(
      [&] { gating::ExpertChoice(gating::ExpertChoice::Options{0.0}).validate(c); },
      "moe: capacity_factor = 0 must be positive");
  expect_error<config_error>(
      [&] { gating::ExpertChoice(gating::ExpertChoice::Options{-2.0}).validate(c); },
      "moe: capacity_factor = -2 must be positive");
}

}  // namespace
}  // namespace moe
