// Self-tests of the scalar float64 MoE reference (tests/reference/reference_moe.hpp) on tiny cases
// whose expected values are worked out by hand in the comments (E = 1..4, D = 1 or 2, F = 1 or 2).
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "reference/reference_moe.hpp"

namespace {

using moe::ref::Activation;
using moe::ref::Config;
using moe::ref::Family;
using moe::ref::GroupScore;
using moe::ref::Result;
using moe::ref::Scoring;
using moe::ref::Weights;

constexpr double kTol = 1e-12;

double sig(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Config with D = 1, F = 1 plain ReLU experts: FFN_e(x) = d_e * relu(g_e * x).
Config plain_config(int E, int k, Family family = Family::topk) {
  Config c;
  c.d_model = 1;
  c.d_ff = 1;
  c.num_experts = E;
  c.top_k = k;
  c.family = family;
  c.gated = false;
  c.activation = Activation::relu;
  return c;
}

Weights plain_weights(const std::vector<double>& router, const std::vector<double>& g,
                      const std::vector<double>& d) {
  Weights w;
  w.router = router;
  for (std::size_t e = 0; e < g.size(); ++e) {
    w.gate.push_back({g[e]});
    w.down.push_back({d[e]});
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
TEST(RefMoeHelpers, ActivationsAtKnownPoints) {
  using moe::ref::detail::activate;
  EXPECT_NEAR(activate(Activation::silu, 1.0), 0.7310585786300049, 1e-15);    // 1 * sigmoid(1)
  EXPECT_NEAR(activate(Activation::silu, -2.0), -0.2384058440442351, 1e-15);  // -2 * sigmoid(-2)
  EXPECT_NEAR(activate(Activation::gelu, 1.0), 0.8413447460685429, 1e-15);    // Phi(1)
  EXPECT_NEAR(activate(Activation::gelu_tanh, 1.0), 0.8411919906082768, 1e-15);
  EXPECT_EQ(activate(Activation::relu, -1.0), 0.0);
  EXPECT_EQ(activate(Activation::relu, 2.5), 2.5);
  EXPECT_NEAR(moe::ref::detail::softplus(0.0), std::log(2.0), 1e-15);
  EXPECT_NEAR(moe::ref::detail::softplus(800.0), 800.0, 1e-12);  // no overflow
  EXPECT_NEAR(moe::ref::detail::normal_cdf(0.0), 0.5, 1e-15);
}

TEST(RefMoeHelpers, TopkDescendingTiesToLowerIndex) {
  using moe::ref::detail::topk_desc;
  EXPECT_EQ(topk_desc({1.0, 2.0, 2.0, 1.0}, 2), (std::vector<int>{1, 2}));
  EXPECT_EQ(topk_desc({1.0, 2.0, 2.0, 1.0}, 3), (std::vector<int>{1, 2, 0}));
  EXPECT_EQ(topk_desc({0.3, 0.5, 0.5, 0.1, 0.5}, 2), (std::vector<int>{1, 2}));
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(topk_desc({-inf, 0.1, -inf, -inf}, 3), (std::vector<int>{1, 0, 2}));
}

// E = 1, k = 1 (weight 1), D = 2, F = 2: checks the row-major [F x D] / [D x F] layouts.
TEST(RefMoeForward, ExpertLayoutGatedAndPlain) {
  Config c;
  c.d_model = 2;
  c.d_ff = 2;
  c.num_experts = 1;
  c.top_k = 1;
  c.activation = Activation::relu;
  Weights w;
  w.router = {0.3, -0.7};
  w.gate = {{1.0, 2.0, 1.0, 0.5}};   // rows (1, 2), (1, 0.5)
  w.up = {{0.5, 0.0, 1.0, 1.0}};     // rows (0.5, 0), (1, 1)
  w.down = {{1.0, -1.0, 2.0, 3.0}};  // rows (1, -1), (2, 3)
  const std::vector<double> x = {1.0, 2.0};
  // h = gate x = (5, 2); u = up x = (0.5, 3); a = relu(h) * u = (2.5, 6); y = down a = (-3.5, 23).
  Result r = moe::ref::forward(c, w, x, 1);
  ASSERT_EQ(r.output.size(), 2u);
  EXPECT_NEAR(r.output[0], -3.5, kTol);
  EXPECT_NEAR(r.output[1], 23.0, kTol);
  EXPECT_NEAR(r.logits[0], 0.3 - 1.4, kTol);
  EXPECT_EQ(r.topk_weight[0], 1.0);
  // Plain: a = relu(h) = (5, 2); y = (5 - 2, 10 + 6) = (3, 16).
  c.gated = false;
  r = moe::ref::forward(c, w, x, 1);
  EXPECT_NEAR(r.output[0], 3.0, kTol);
  EXPECT_NEAR(r.output[1], 16.0, kTol);
}

// Mixtral / Qwen3 (renormalised) and OLMoE / Qwen2 (raw probabilities).
TEST(RefMoeForward, SoftmaxTopkWithAndWithoutRenorm) {
  // x = 1, z = (0, ln 2, ln 3): p = (1/6, 2/6, 3/6); top-2 = (2, 1); FFN_e(1) = (10, 20, 30).
  Config c = plain_config(3, 2);
  Weights w = plain_weights({0.0, std::log(2.0), std::log(3.0)}, {1, 1, 1}, {10, 20, 30});
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.slots, 2);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{2, 1}));
  EXPECT_NEAR(r.scores[0], 1.0 / 6, kTol);
  EXPECT_NEAR(r.scores[2], 0.5, kTol);
  EXPECT_NEAR(r.topk_weight[0], 0.6, kTol);  // 0.5 / (0.5 + 1/3)
  EXPECT_NEAR(r.topk_weight[1], 0.4, kTol);
  EXPECT_EQ(r.kept, (std::vector<int>{1, 1}));
  EXPECT_NEAR(r.output[0], 0.6 * 30 + 0.4 * 20, kTol);

  c.norm_topk_prob = false;  // OLMoE / Qwen2-MoE: w = p
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_NEAR(r.topk_weight[0], 0.5, kTol);
  EXPECT_NEAR(r.topk_weight[1], 1.0 / 3, kTol);
  EXPECT_NEAR(r.output[0], 0.5 * 30 + 20.0 / 3, kTol);
}

TEST(RefMoeForward, EqualScoresGoToLowerExpertIndex) {
  Config c = plain_config(4, 2);
  // z = (1, 2, 2, 1) for x = 1: top-2 = (1, 2); with k = 3 then expert 0.
  Weights w = plain_weights({1, 2, 2, 1}, {1, 1, 1, 1}, {1, 2, 3, 4});
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{1, 2}));
  EXPECT_NEAR(r.topk_weight[0], 0.5, kTol);
  c.top_k = 3;
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{1, 2, 0}));
  // All equal: uniform probabilities, experts 0 and 1.
  c.top_k = 2;
  w.router = {0.5, 0.5, 0.5, 0.5};
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1}));
}

TEST(RefMoeForward, SigmoidScoringTopkRenorm) {
  // x = 1, z = (ln 3, 0): s = (0.75, 0.5); renormalised (0.6, 0.4).
  Config c = plain_config(2, 2);
  c.scoring = Scoring::sigmoid;
  Weights w = plain_weights({std::log(3.0), 0.0}, {1, 1}, {1, 10});
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_NEAR(r.scores[0], 0.75, kTol);
  EXPECT_NEAR(r.scores[1], 0.5, kTol);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1}));
  EXPECT_NEAR(r.topk_weight[0], 0.6, kTol);
  EXPECT_NEAR(r.output[0], 0.6 + 4.0, kTol);
}

// Qwen2-MoE: gated SwiGLU experts, no renorm, + sigmoid(shared_gate . x) * shared(x).
TEST(RefMoeForward, Qwen2SharedExpertWithSigmoidGate) {
  Config c;
  c.d_model = 1;
  c.d_ff = 1;
  c.num_experts = 2;
  c.top_k = 1;
  c.norm_topk_prob = false;
  c.shared_d_ff = 1;
  c.shared_gate = true;
  Weights w;
  w.router = {0.0, 0.0};  // p = (0.5, 0.5): expert 0 (tie), weight 0.5
  w.gate = {{0.5}, {9.0}};
  w.up = {{2.0}, {9.0}};
  w.down = {{3.0}, {9.0}};
  w.shared_gate_proj = {1.0};
  w.shared_up = {-1.0};
  w.shared_down = {4.0};
  w.shared_gate_weight = {0.25};
  const double x = 2.0;
  auto silu = [](double z) { return z * sig(z); };
  const double routed = 0.5 * 3.0 * silu(0.5 * x) * (2.0 * x);
  const double shared = sig(0.25 * x) * 4.0 * silu(1.0 * x) * (-1.0 * x);
  Result r = moe::ref::forward(c, w, {x}, 1);
  EXPECT_EQ(r.topk_idx[0], 0);
  EXPECT_NEAR(r.topk_weight[0], 0.5, kTol);
  EXPECT_NEAR(r.output[0], routed + shared, kTol);
  // DeepSeek-style ungated shared expert.
  c.shared_gate = false;
  r = moe::ref::forward(c, w, {x}, 1);
  EXPECT_NEAR(r.output[0], routed + 4.0 * silu(x) * (-x), kTol);
}

// ---------------------------------------------------------------------------------------------
// DeepSeek-V3: sigmoid, choice = s + bias, group score = sum of top-2, weights unbiased, renorm,
// x routed_scaling_factor.
Config deepseek_v3_config() {
  Config c = plain_config(4, 2, Family::group_limited);
  c.scoring = Scoring::sigmoid;
  c.n_group = 2;
  c.topk_group = 1;
  c.group_score = GroupScore::top2_sum;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

TEST(RefMoeGroupLimited, DeepSeekV3BiasSelectsWeightsStayUnbiased) {
  Config c = deepseek_v3_config();
  const double l3 = std::log(3.0);
  // s = sigmoid(ln 3, 0, -ln 3, 0) = (0.75, 0.5, 0.25, 0.5).
  Weights w = plain_weights({l3, 0.0, -l3, 0.0}, {1, 1, 1, 1}, {1, 10, 100, 1000});
  // Without bias: groups {0,1} = 1.25, {2,3} = 0.75 -> group 0; experts (0, 1), w = (0.6, 0.4)*2.5.
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1}));
  EXPECT_NEAR(r.topk_weight[0], 1.5, kTol);
  EXPECT_NEAR(r.topk_weight[1], 1.0, kTol);
  EXPECT_NEAR(r.output[0], 1.5 + 10.0, kTol);
  // Bias (0, 0, 0.5, 0.3): c = (0.75, 0.5, 0.75, 0.8); groups 1.25 vs 1.55 -> group 1;
  // top-2 of c in group 1: (3, 2); weights s = (0.5, 0.25) -> (2/3, 1/3) * 2.5.
  w.router_bias = {0.0, 0.0, 0.5, 0.3};
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{3, 2}));
  EXPECT_NEAR(r.topk_weight[0], 2.5 * 2.0 / 3.0, kTol);
  EXPECT_NEAR(r.topk_weight[1], 2.5 / 3.0, kTol);
  EXPECT_NEAR(r.scores[2], 0.25, kTol);  // scores stay unbiased
  EXPECT_NEAR(r.output[0], 2.5 * (2.0 / 3.0 * 1000 + 1.0 / 3.0 * 100), 1e-10);
}

TEST(RefMoeGroupLimited, SlotsOrderedByWeightNotByBiasedChoice) {
  // One group; s = (0.25, 0.75), bias (1, 0): choice (1.25, 0.75) but weights order (1, 0).
  Config c = deepseek_v3_config();
  c.num_experts = 2;
  c.n_group = 1;
  c.routed_scaling_factor = 1.0;
  const double l3 = std::log(3.0);
  Weights w = plain_weights({-l3, l3}, {1, 1}, {1, 1});
  w.router_bias = {1.0, 0.0};
  c.top_k = 1;  // the bias picks expert 0 alone
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0}));
  EXPECT_NEAR(r.topk_weight[0], 1.0, kTol);  // 0.25 / (0.25 + 1e-20)
  c.top_k = 2;
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{1, 0}));
  EXPECT_NEAR(r.topk_weight[0], 0.75, kTol);
  EXPECT_NEAR(r.topk_weight[1], 0.25, kTol);
}

TEST(RefMoeGroupLimited, HfZeroMaskQuirkDiffersFromMinusInf) {
  // s = 0.5 everywhere; bias (0, -0.8, -0.6, -0.7): c = (0.5, -0.3, -0.1, -0.2).
  // Groups: {0,1} = 0.2, {2,3} = -0.3 -> keep group 0.
  // -inf mask: (0, 1). Zero mask: masked c = (0.5, -0.3, 0, 0) -> (0, 2): 0.0 beats -0.3 and
  // the tie between excluded 2 and 3 goes to 2.
  Config c = deepseek_v3_config();
  c.routed_scaling_factor = 1.0;
  Weights w = plain_weights({0, 0, 0, 0}, {1, 1, 1, 1}, {1, 10, 100, 1000});
  w.router_bias = {0.0, -0.8, -0.6, -0.7};
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1}));
  EXPECT_NEAR(r.topk_weight[0], 0.5, kTol);
  EXPECT_NEAR(r.output[0], 0.5 * 1 + 0.5 * 10, kTol);
  c.hf_zero_group_mask = true;
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 2}));
  EXPECT_NEAR(r.topk_weight[1], 0.5, kTol);
  EXPECT_NEAR(r.output[0], 0.5 * 1 + 0.5 * 100, kTol);
}

TEST(RefMoeGroupLimited, DeepSeekV2MaxGroupScoreNoRenormScaled) {
  // Softmax, exp(z) = (7, 1, 6, 6) / 20: p = (0.35, 0.05, 0.3, 0.3).
  // max: groups 0.35 vs 0.3 -> group 0 -> (0, 1), w = p * 16 = (5.6, 0.8).
  // top2_sum: 0.4 vs 0.6 -> group 1 -> (2, 3) tie -> (2, 3), w = 4.8 each.
  Config c = plain_config(4, 2, Family::group_limited);
  c.n_group = 2;
  c.topk_group = 1;
  c.group_score = GroupScore::max;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 16.0;
  Weights w = plain_weights({std::log(7.0), 0.0, std::log(6.0), std::log(6.0)}, {1, 1, 1, 1},
                            {1, 10, 100, 1000});
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1}));
  EXPECT_NEAR(r.topk_weight[0], 5.6, kTol);
  EXPECT_NEAR(r.topk_weight[1], 0.8, kTol);
  EXPECT_NEAR(r.output[0], 5.6 + 8.0, 1e-10);
  c.group_score = GroupScore::top2_sum;
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{2, 3}));
  EXPECT_NEAR(r.topk_weight[0], 4.8, kTol);
  EXPECT_NEAR(r.topk_weight[1], 4.8, kTol);
}

TEST(RefMoeGroupLimited, EqualGroupScoresGoToLowerGroup) {
  // p = (1, 4, 2, 3) / 10; top2_sum: 0.5 vs 0.5 -> group 0 -> (1, 0).
  Config c = plain_config(4, 2, Family::group_limited);
  c.n_group = 2;
  c.topk_group = 1;
  c.norm_topk_prob = false;
  Weights w =
      plain_weights({0.0, std::log(4.0), std::log(2.0), std::log(3.0)}, {1, 1, 1, 1}, {1, 1, 1, 1});
  Result r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{1, 0}));
  EXPECT_NEAR(r.topk_weight[0], 0.4, kTol);
  EXPECT_NEAR(r.topk_weight[1], 0.1, kTol);
}

// ---------------------------------------------------------------------------------------------
TEST(RefMoeCapacity, SwitchFirstComeFirstServedDroppedRowIsZero) {
  // k = 1, no renorm, capacity 2. z_t = (x_t, -x_t): tokens 0, 1, 2 -> expert 0, token 3 -> 1.
  // pmax = sigmoid(2 |x|). Token 2 is the third for expert 0: dropped, zero output.
  Config c = plain_config(2, 1, Family::capacity_topk);
  c.norm_topk_prob = false;
  c.capacity = 2;
  Weights w = plain_weights({1.0, -1.0}, {1.0, -1.0}, {1.0, 1.0});
  const std::vector<double> x = {1.0, 2.0, 3.0, -1.0};
  Result r = moe::ref::forward(c, w, x, 4);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 0, 0, 1}));
  EXPECT_EQ(r.kept, (std::vector<int>{1, 1, 0, 1}));
  EXPECT_NEAR(r.topk_weight[2], sig(6.0), kTol);  // a dropped token keeps its weight
  EXPECT_NEAR(r.output[0], sig(2.0) * 1.0, kTol);
  EXPECT_NEAR(r.output[1], sig(4.0) * 2.0, kTol);
  EXPECT_EQ(r.output[2], 0.0);
  EXPECT_NEAR(r.output[3], sig(2.0) * 1.0, kTol);
  EXPECT_EQ(moe::ref::expert_counts(r, 2), (std::vector<double>{2.0, 1.0}));
  // No limit: nothing dropped. Capacity 0: everything dropped.
  c.capacity = -1;
  r = moe::ref::forward(c, w, x, 4);
  EXPECT_EQ(r.kept, (std::vector<int>{1, 1, 1, 1}));
  EXPECT_NEAR(r.output[2], sig(6.0) * 3.0, kTol);
  c.capacity = 0;
  r = moe::ref::forward(c, w, x, 4);
  EXPECT_EQ(r.kept, (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ(r.output, (std::vector<double>{0, 0, 0, 0}));
}

TEST(RefMoeCapacity, FirstChoicesBeforeSecondChoices) {
  // E = 3, D = 2, k = 2, capacity 1. Router rows (2, 0), (1, 2), (0, 1).
  // t0 = (1, 0): z = (2, 1, 0) -> (0, 1); t1 = (0, 1): z = (0, 2, 1) -> (1, 2).
  // Pass 1 (first choices): t0 -> 0 kept, t1 -> 1 kept. Pass 2: t0 -> 1 dropped (full), t1 -> 2
  // kept. By position alone t0's second choice would have taken expert 1 before t1. Experts: gate
  // (1, 1), down (c, c) with c = (1, 10, 100): FFN_e(t) = c_e * (1, 1) here.
  Config c;
  c.d_model = 2;
  c.d_ff = 1;
  c.num_experts = 3;
  c.top_k = 2;
  c.family = Family::capacity_topk;
  c.gated = false;
  c.activation = Activation::relu;
  c.capacity = 1;
  Weights w;
  w.router = {2, 0, 1, 2, 0, 1};
  for (double ce : {1.0, 10.0, 100.0}) {
    w.gate.push_back({1.0, 1.0});
    w.down.push_back({ce, ce});
  }
  const std::vector<double> x = {1.0, 0.0, 0.0, 1.0};
  Result r = moe::ref::forward(c, w, x, 2);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1, 1, 2}));
  EXPECT_EQ(r.kept, (std::vector<int>{1, 0, 1, 1}));
  const double e = std::exp(1.0);
  const double w_hi = e / (e + 1.0), w_lo = 1.0 / (e + 1.0);  // renormalised before dropping
  EXPECT_NEAR(r.topk_weight[0], w_hi, kTol);
  EXPECT_NEAR(r.topk_weight[1], w_lo, kTol);
  EXPECT_NEAR(r.output[0], w_hi * 1.0, kTol);
  EXPECT_NEAR(r.output[1], w_hi * 1.0, kTol);
  EXPECT_NEAR(r.output[2], w_hi * 10.0 + w_lo * 100.0, 1e-10);
  // GShard: renormalise after dropping: token 0 keeps one slot of weight 1.
  c.renormalize_after_drop = true;
  r = moe::ref::forward(c, w, x, 2);
  EXPECT_NEAR(r.topk_weight[0], 1.0, kTol);
  EXPECT_NEAR(r.topk_weight[1], w_lo, kTol);  // the dropped slot keeps its weight
  EXPECT_NEAR(r.output[0], 1.0, kTol);
  EXPECT_NEAR(r.output[2], w_hi * 10.0 + w_lo * 100.0, 1e-10);
}

// ---------------------------------------------------------------------------------------------
TEST(RefMoeNoisyTopk, NoiseChangesSelectionWeightsAreSoftmaxOfKeptH) {
  // x = 1: clean = (1, 2, 3); W_noise = 0 -> std = softplus(0) = ln 2; noise = (2, 0, -1):
  // H = (1 + 2 ln 2, 2, 3 - ln 2) = (2.386, 2, 2.307) -> top-2 (0, 2);
  // weights softmax(H0, H2): w0 = sigmoid(H0 - H2).
  Config c = plain_config(3, 2, Family::noisy_topk);
  Weights w = plain_weights({1, 2, 3}, {1, 1, 1}, {1, 10, 100});
  w.router_noise = {0, 0, 0};
  const std::vector<double> noise = {2.0, 0.0, -1.0};
  const double l2 = std::log(2.0);
  const double h0 = 1 + 2 * l2, h2 = 3 - l2;
  Result r = moe::ref::forward(c, w, {1.0}, 1, &noise);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 2}));
  EXPECT_NEAR(r.topk_weight[0], sig(h0 - h2), kTol);
  EXPECT_NEAR(r.topk_weight[1], sig(h2 - h0), kTol);
  EXPECT_NEAR(r.logits[2], 3.0, kTol);  // clean logits
  EXPECT_NEAR(r.scores[0], sig(h0 - h2), kTol);
  EXPECT_EQ(r.scores[1], 0.0);  // G(x) is zero outside the kept experts
  EXPECT_NEAR(r.output[0], sig(h0 - h2) * 1 + sig(h2 - h0) * 100, 1e-10);
  const std::vector<double> H = moe::ref::noisy_logits(c, w, {1.0}, 1, &noise);
  EXPECT_NEAR(H[0], h0, kTol);
  EXPECT_NEAR(H[1], 2.0, kTol);
  EXPECT_NEAR(moe::ref::noise_stddev(c, w, {1.0}, 1)[1], l2, kTol);
  // Without noise: top-2 of the clean logits (2, 1), weights softmax(3, 2).
  r = moe::ref::forward(c, w, {1.0}, 1);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{2, 1}));
  EXPECT_NEAR(r.topk_weight[0], sig(1.0), kTol);
}

// ---------------------------------------------------------------------------------------------
TEST(RefMoeExpertChoice, EachExpertTakesItsTopCTokens) {
  // T = 3, E = 2, cf = 1: c = ceil(3 / 2) = 2. z_t = (x_t, -x_t), x = (1, -1, 0.5):
  // S[:, 0] = sigmoid(2x) = (s(2), s(-2), s(1)) -> tokens 0, 2; S[:, 1] = (s(-2), s(2), s(-1)) ->
  // tokens 1, 2. FFN_0(x) = relu(x), FFN_1(x) = 10 relu(-x).
  Config c = plain_config(2, 1, Family::expert_choice);
  Weights w = plain_weights({1.0, -1.0}, {1.0, -1.0}, {1.0, 10.0});
  const std::vector<double> x = {1.0, -1.0, 0.5};
  Result r = moe::ref::forward(c, w, x, 3);
  EXPECT_EQ(r.slots, 2);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, -1, -1, 1, 0, 1}));
  EXPECT_EQ(r.kept, (std::vector<int>{1, 0, 0, 1, 1, 1}));
  EXPECT_NEAR(r.topk_weight[0], sig(2.0), kTol);
  EXPECT_EQ(r.topk_weight[1], 0.0);
  EXPECT_NEAR(r.topk_weight[4], sig(1.0), kTol);
  EXPECT_NEAR(r.topk_weight[5], sig(-1.0), kTol);
  EXPECT_NEAR(r.output[0], sig(2.0) * 1.0, kTol);
  EXPECT_NEAR(r.output[1], sig(2.0) * 10.0, kTol);
  EXPECT_NEAR(r.output[2], sig(1.0) * 0.5, kTol);
}

TEST(RefMoeExpertChoice, TiesToLowerTokenAndCapacityClamp) {
  // All scores 0.5: each expert takes tokens 0 and 1; token 2 is never chosen (zero output).
  Config c = plain_config(2, 1, Family::expert_choice);
  Weights w = plain_weights({0.0, 0.0}, {1.0, 1.0}, {1.0, 10.0});
  const std::vector<double> x = {1.0, 2.0, 3.0};
  Result r = moe::ref::forward(c, w, x, 3);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1, 0, 1, -1, -1}));
  EXPECT_NEAR(r.output[0], 0.5 * 1 + 0.5 * 10, kTol);
  EXPECT_EQ(r.output[2], 0.0);
  // cf = 10: ceil(15) clamped to T = 3: every expert takes every token.
  c.capacity_factor = 10.0;
  r = moe::ref::forward(c, w, x, 3);
  EXPECT_EQ(r.topk_idx, (std::vector<int>{0, 1, 0, 1, 0, 1}));
  EXPECT_NEAR(r.output[2], 0.5 * 3 + 0.5 * 30, kTol);
  EXPECT_EQ(moe::ref::expert_choice_capacity(1.0, 3, 2), 2);
  EXPECT_EQ(moe::ref::expert_choice_capacity(1.0, 4, 2), 2);
  EXPECT_EQ(moe::ref::expert_choice_capacity(1.25, 4, 2), 3);  // ceil(2.5)
  EXPECT_EQ(moe::ref::expert_choice_capacity(0.0, 4, 2), 0);
  EXPECT_EQ(moe::ref::expert_choice_capacity(10.0, 3, 2), 3);
}

// ---------------------------------------------------------------------------------------------
TEST(RefMoeLosses, UniformRoutingHfGivesKMegaBlocksOne) {
  const int T = 4, E = 4, k = 2;
  const std::vector<double> z(T * E, 0.0);
  EXPECT_NEAR(moe::ref::hf_load_balancing_loss(z, T, E, k), 2.0, kTol);
  EXPECT_NEAR(moe::ref::megablocks_load_balancing_loss(z, T, E, k), 1.0, kTol);
  EXPECT_NEAR(moe::ref::switch_load_balancing_loss(z, {0, 1, 3, 3}, 2, 2, E), 1.0, kTol);
  EXPECT_NEAR(moe::ref::deepseek_seq_balance_loss(z, {0, 1, 0, 2, 3, 3, 1, 2}, 2, 2, E, k), 1.0,
              kTol);
  EXPECT_NEAR(moe::ref::router_z_loss(z, T, E), std::log(4.0) * std::log(4.0), kTol);
}

TEST(RefMoeLosses, HfLoadBalancingWithTokenMask) {
  // p_0 = (0.75, 0.25) -> expert 0; p_1 = (0.25, 0.75) -> expert 1; k = 1.
  // No mask: count (1, 1)/2, P (1, 1)/2 -> 2 * (0.25 + 0.25) = 1.
  // Mask (1, 0): count (1, 0), P (0.75, 0.25), N = 1 -> 2 * 0.75 = 1.5.
  const double l3 = std::log(3.0);
  const std::vector<double> z = {l3, 0.0, 0.0, l3};
  const std::vector<double> mask = {1.0, 0.0};
  EXPECT_NEAR(moe::ref::hf_load_balancing_loss(z, 2, 2, 1), 1.0, kTol);
  EXPECT_NEAR(moe::ref::hf_load_balancing_loss(z, 2, 2, 1, &mask), 1.5, kTol);
  EXPECT_NEAR(moe::ref::megablocks_load_balancing_loss(z, 2, 2, 1, &mask), 1.5, kTol);
  // k = 2 with E = 2: every expert counted once per token; HF = 2 x MegaBlocks.
  EXPECT_NEAR(moe::ref::hf_load_balancing_loss(z, 2, 2, 2, &mask), 2.0, kTol);
  EXPECT_NEAR(moe::ref::megablocks_load_balancing_loss(z, 2, 2, 2, &mask), 1.0, kTol);
}

TEST(RefMoeLosses, SwitchGroupsByBatchRow) {
  // B = 2, S = 2, E = 2. Row 0: p = (0.75, 0.25) twice, idx 0; row 1: p = (0.25, 0.75), idx 1.
  // Grouped: mean of (0.75, 0, 0, 0.75) = 0.375, x E^2 = 1.5. Flattened (B = 1): f = P = (.5, .5)
  // -> mean 0.25 x 4 = 1.
  const double l3 = std::log(3.0);
  const std::vector<double> z = {l3, 0, l3, 0, 0, l3, 0, l3};
  const std::vector<int> idx = {0, 0, 1, 1};
  EXPECT_NEAR(moe::ref::switch_load_balancing_loss(z, idx, 2, 2, 2), 1.5, kTol);
  EXPECT_NEAR(moe::ref::switch_load_balancing_loss(z, idx, 1, 4, 2), 1.0, kTol);
  // z-loss: logsumexp(ln 3, 0) = ln 4 for every token.
  EXPECT_NEAR(moe::ref::router_z_loss(z, 4, 2), std::log(4.0) * std::log(4.0), kTol);
  const std::vector<double> z2 = {1.0, 1.0, 0.0, 0.0};  // (1 + ln 2)^2 and (ln 2)^2
  const double l2 = std::log(2.0);
  EXPECT_NEAR(moe::ref::router_z_loss(z2, 2, 2), ((1 + l2) * (1 + l2) + l2 * l2) / 2, kTol);
}

TEST(RefMoeLosses, DeepSeekSequenceWiseBalance) {
  // Sequence 0: z = (ln 3, 0) twice: s = (0.75, 0.5) -> s' = (0.6, 0.4); both tokens choose 0:
  // f = E/(k S) count = (2, 0); L0 = 2 * 0.6 = 1.2.
  // Sequence 1: z = (0, 0): s' = (0.5, 0.5); both choose 1: f = (0, 2); L1 = 1.0. Mean 1.1.
  const double l3 = std::log(3.0);
  const std::vector<double> z = {l3, 0, l3, 0, 0, 0, 0, 0};
  EXPECT_NEAR(moe::ref::deepseek_seq_balance_loss(z, {0, 0, 1, 1}, 2, 2, 2, 1), 1.1, kTol);
  EXPECT_NEAR(moe::ref::deepseek_seq_balance_loss(z, {0, 0, 1, 1}, 1, 4, 2, 1),
              // one sequence of 4: f = (1, 1), P = ((0.6 + 0.6 + 0.5 + 0.5) / 4, ...) = (.55, .45)
              1.0, kTol);
}

TEST(RefMoeLosses, ShazeerImportanceAndLoad) {
  // Importance (2, 0): mean 1, population variance 1 -> CV^2 = 1 (the sample variance would give
  // 2).
  EXPECT_NEAR(moe::ref::shazeer_importance_loss({1, 0, 1, 0}, 2, 2), 1.0, kTol);
  EXPECT_NEAR(moe::ref::shazeer_importance_loss({0.5, 0.5, 0.5, 0.5}, 2, 2), 0.0, kTol);
  // The noisy top-k case above: clean (1, 2, 3), std ln 2, H = (1 + 2 ln 2, 2, 3 - ln 2), k = 2.
  // kth_excluding: i = 0 -> 2nd of (2, 3 - ln 2) = 2; i = 1 -> 2nd of (1 + 2 ln 2, 3 - ln 2) =
  // 3 - ln 2; i = 2 -> 2nd of (1 + 2 ln 2, 2) = 2.
  const double l2 = std::log(2.0);
  auto Phi = [](double v) { return 0.5 * std::erfc(-v / std::sqrt(2.0)); };
  const double P0 = Phi((1.0 - 2.0) / l2), P1 = Phi((2.0 - (3.0 - l2)) / l2),
               P2 = Phi((3.0 - 2.0) / l2);
  const double mean = (P0 + P1 + P2) / 3;
  const double var =
      ((P0 - mean) * (P0 - mean) + (P1 - mean) * (P1 - mean) + (P2 - mean) * (P2 - mean)) / 3;
  const std::vector<double> clean = {1, 2, 3}, H = {1 + 2 * l2, 2, 3 - l2}, sd = {l2, l2, l2};
  EXPECT_NEAR(moe::ref::shazeer_load_loss(clean, H, sd, 1, 3, 2), var / (mean * mean), kTol);
  EXPECT_NEAR(moe::ref::cv_squared({1, 2, 3}), (2.0 / 3.0) / 4.0, kTol);
}

TEST(RefMoeLosses, AuxFreeBiasUpdate) {
  // Mean load 2: expert 0 overloaded (down), 1 underloaded (up), 2 balanced (unchanged).
  const std::vector<double> b = moe::ref::aux_free_bias_update({0.5, 0.0, -0.5}, {3, 1, 2}, 0.1);
  EXPECT_NEAR(b[0], 0.4, kTol);
  EXPECT_NEAR(b[1], 0.1, kTol);
  EXPECT_EQ(b[2], -0.5);
}

TEST(RefMoeForward, RejectsInconsistentSetups) {
  Config c = plain_config(4, 2, Family::capacity_topk);
  Weights w = plain_weights({0, 0, 0, 0}, {1, 1, 1, 1}, {1, 1, 1, 1});
  w.router_bias = {0, 0, 0, 0};
  EXPECT_THROW(moe::ref::forward(c, w, {1.0}, 1), std::invalid_argument);  // bias unused there
  w.router_bias.clear();
  c.family = Family::group_limited;
  c.n_group = 3;  // does not divide 4
  EXPECT_THROW(moe::ref::forward(c, w, {1.0}, 1), std::invalid_argument);
  c.n_group = 4;
  c.group_score = GroupScore::max;
  c.topk_group = 1;  // one expert left, k = 2
  EXPECT_THROW(moe::ref::forward(c, w, {1.0}, 1), std::invalid_argument);
  c = plain_config(4, 5);  // k > E
  EXPECT_THROW(moe::ref::forward(c, w, {1.0}, 1), std::invalid_argument);
  c = plain_config(4, 2);
  EXPECT_THROW(moe::ref::forward(c, w, {1.0, 2.0}, 1), std::invalid_argument);  // x size
}

}  // namespace
