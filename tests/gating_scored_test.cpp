// The scored top-k policy (gating/scored_topk.hpp) and the sparsemixer (gating/sparsemixer.hpp)
// against plain, obviously-right versions written here from the formulas; their validation
// messages; the float32 mode (bitwise a float routing, widened); token-table selection.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "test_util.hpp"

namespace moe {
namespace {

using gating::BiasedScoredTopK;
using gating::ScoredTopK;
using gating::Scoring;
using gating::Selection;
using test::expect_error;

MoeConfig config_of(Index E, Index k) {
  MoeConfig c;
  c.d_model = 4;
  c.d_ff = 4;
  c.num_experts = E;
  c.top_k = k;
  return c;
}

/// Routes [T x E] logits with policy g; returns the routing.
template <class G, class S>
Routing<S> route(const G& g, const MoeConfig& c, const std::vector<S>& logits, Index T,
                 const typename std::vector<S>::value_type* bias = nullptr,
                 const std::vector<std::int64_t>* ids = nullptr,
                 const std::vector<std::int64_t>* table = nullptr, Index table_rows = 0) {
  g.validate(c);
  const Index E = static_cast<Index>(logits.size()) / T;
  Routing<S> r;
  r.resize(T, E, g.slots(c));
  std::copy(logits.begin(), logits.end(), r.logits().data());
  RouteContext<S> ctx;
  ctx.selection_bias = bias;
  if (ids != nullptr) {
    ctx.token_ids = ids->data();
    ctx.expert_table = table->data();
    ctx.expert_table_rows = table_rows;
  }
  g.route(c, ctx, r);
  return r;
}

std::vector<double> random_logits(Index n, std::uint64_t seed, double scale = 2.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (double& x : v) x = dist(rng);
  return v;
}

/// The plain version: indices of the k largest of v (ties to the lower index), descending.
std::vector<Index> plain_top_k(const std::vector<double>& v, Index k) {
  std::vector<Index> order(v.size());
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    return v[static_cast<std::size_t>(a)] > v[static_cast<std::size_t>(b)];
  });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

/// Expects the token's slots to hold exactly (experts, weights) as sets, weights to 1e-14.
template <class S>
void expect_slots(const Routing<S>& r, Index t, std::vector<Index> experts,
                  std::vector<double> weights) {
  std::vector<std::pair<Index, double>> want, got;
  for (std::size_t j = 0; j < experts.size(); ++j) want.emplace_back(experts[j], weights[j]);
  for (Index j = 0; j < r.slots(); ++j) {
    got.emplace_back(r.experts()(t, j), static_cast<double>(r.weights()(t, j)));
  }
  std::sort(want.begin(), want.end());
  std::sort(got.begin(), got.end());
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t j = 0; j < got.size(); ++j) {
    EXPECT_EQ(got[j].first, want[j].first) << "token " << t;
    EXPECT_NEAR(got[j].second, want[j].second, 1e-14 * (1 + std::abs(want[j].second)))
        << "token " << t;
  }
  // Slot order: descending weight.
  for (Index j = 1; j < r.slots(); ++j) EXPECT_GE(r.weights()(t, j - 1), r.weights()(t, j));
}

struct Sizes {
  Index E, k;
};
class ScoredSizes : public ::testing::TestWithParam<Sizes> {};

// Selection::logits: top-k of the logits, softmax over the chosen (gpt-oss) or a sigmoid each
// (Llama 4), optionally renormalised (Cohere2 sigmoid).
TEST_P(ScoredSizes, SelectedLogitsMatchPlainFormula) {
  const auto [E, k] = GetParam();
  const Index T = 7;
  const auto z = random_logits(T * E, 11 + static_cast<std::uint64_t>(E));
  const MoeConfig c = config_of(E, k);
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid}) {
    for (bool normalize : {false, true}) {
      ScoredTopK::Options o;
      o.selection = Selection::logits;
      o.scoring = scoring;
      o.normalize = normalize;
      o.normalize_epsilon = 0;
      o.routed_scaling_factor = 1.5;
      const auto r = route(ScoredTopK(o), c, z, T);
      for (Index t = 0; t < T; ++t) {
        const std::vector<double> row(z.begin() + t * E, z.begin() + (t + 1) * E);
        const auto idx = plain_top_k(row, k);
        std::vector<double> w;
        double zmax = -std::numeric_limits<double>::infinity(), sum = 0;
        for (Index e : idx) zmax = std::max(zmax, row[static_cast<std::size_t>(e)]);
        for (Index e : idx) {
          const double v = row[static_cast<std::size_t>(e)];
          w.push_back(scoring == Scoring::softmax ? std::exp(v - zmax) : sigmoid(v));
        }
        if (scoring == Scoring::softmax) {
          const double s = std::accumulate(w.begin(), w.end(), 0.0);
          for (double& x : w) x /= s;
        }
        sum = std::accumulate(w.begin(), w.end(), 0.0);
        for (double& x : w) x = (normalize ? x / sum : x) * 1.5;
        expect_slots(r, t, idx, w);
      }
      // scores() is the scoring over all experts (what the statistics read).
      if (scoring == Scoring::sigmoid) {
        EXPECT_DOUBLE_EQ(r.scores()(0, 0), sigmoid(z[0]));
      }
    }
  }
}

// Selection::scores with a bias on softmax scores (ERNIE, LongCat), L_p renormalisation (DBRX),
// the clamp of the denominator (ERNIE moe_norm_min) and sqrt(softplus) scores (DeepSeek-V4).
TEST_P(ScoredSizes, BiasedScoresAndNormalisationsMatchPlainFormula) {
  const auto [E, k] = GetParam();
  const Index T = 5;
  const auto z = random_logits(T * E, 101 + static_cast<std::uint64_t>(E));
  const auto b = random_logits(E, 7, 0.1);
  const MoeConfig c = config_of(E, k);
  struct Variant {
    Scoring scoring;
    double p, eps, min;
  };
  for (const Variant v :
       {Variant{Scoring::softmax, 1.0, 0.0, 0.0}, Variant{Scoring::softmax, 2.0, 0.0, 0.0},
        Variant{Scoring::sigmoid, 1.0, 1e-6, 0.0}, Variant{Scoring::softmax, 1.0, 0.0, 0.9},
        Variant{Scoring::sqrt_softplus, 1.0, 1e-20, 0.0}}) {
    BiasedScoredTopK::Options o;
    o.scoring = v.scoring;
    o.normalize_p = v.p;
    o.normalize_epsilon = v.eps;
    o.normalize_min = v.min;
    o.routed_scaling_factor = 2.5;
    const auto r = route(BiasedScoredTopK(o), c, z, T, b.data());
    for (Index t = 0; t < T; ++t) {
      std::vector<double> s(static_cast<std::size_t>(E));
      const double* row = z.data() + t * E;
      const double zmax = *std::max_element(row, row + E);
      double total = 0;
      for (Index e = 0; e < E; ++e) total += std::exp(row[e] - zmax);
      for (Index e = 0; e < E; ++e) {
        const double x = row[e];
        s[static_cast<std::size_t>(e)] = v.scoring == Scoring::softmax ? std::exp(x - zmax) / total
                                         : v.scoring == Scoring::sigmoid
                                             ? sigmoid(x)
                                             : std::sqrt(std::log1p(std::exp(x)));
      }
      std::vector<double> choice(s);
      for (Index e = 0; e < E; ++e)
        choice[static_cast<std::size_t>(e)] += b[static_cast<std::size_t>(e)];
      const auto idx = plain_top_k(choice, k);
      double norm = 0;
      for (Index e : idx) norm += std::pow(s[static_cast<std::size_t>(e)], v.p);
      norm = std::pow(norm, 1.0 / v.p);
      const double denominator = std::max(norm + v.eps, v.min);
      std::vector<double> w;
      for (Index e : idx) w.push_back(s[static_cast<std::size_t>(e)] / denominator * 2.5);
      expect_slots(r, t, idx, w);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Awkward, ScoredSizes,
                         ::testing::Values(Sizes{1, 1}, Sizes{7, 2}, Sizes{31, 4}, Sizes{129, 8}),
                         [](const auto& info) {
                           return "E" + std::to_string(info.param.E) + "_k" +
                                  std::to_string(info.param.k);
                         });

// float32 in a double routing is a float routing, widened: bitwise, for every scoring and
// selection (logits given in float, so both start from the same values).
TEST(ScoredTopK, Float32ModeIsTheFloatRoutingWidened) {
  const Index T = 31, E = 16, k = 4;
  const auto z64 = random_logits(T * E, 5);
  std::vector<float> zf(z64.begin(), z64.end());
  const std::vector<double> zd(zf.begin(), zf.end());
  const MoeConfig c = config_of(E, k);
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrt_softplus}) {
    for (Selection selection : {Selection::scores, Selection::logits}) {
      for (Index groups : {Index(1), Index(4)}) {
        if (selection == Selection::logits && groups > 1) continue;
        ScoredTopK::Options o;
        o.scoring = scoring;
        o.selection = selection;
        o.n_group = groups;
        o.topk_group = groups > 1 ? 2 : 1;
        o.routed_scaling_factor = 2.5;
        const auto rf = route(ScoredTopK(o), c, zf, T);
        o.float32 = true;
        const auto rd = route(ScoredTopK(o), c, zd, T);
        for (Index t = 0; t < T; ++t) {
          for (Index j = 0; j < k; ++j) {
            ASSERT_EQ(rd.experts()(t, j), rf.experts()(t, j));
            ASSERT_EQ(rd.weights()(t, j), static_cast<double>(rf.weights()(t, j)));
          }
          for (Index e = 0; e < E; ++e) {
            ASSERT_EQ(rd.scores()(t, e), static_cast<double>(rf.scores()(t, e)));
          }
        }
      }
    }
  }
}

// Mistral 4: excluded groups filled with 0 (hf_zero_group_mask) vs -inf. With positive softmax
// scores both choose inside the kept groups; once every kept score is below 0 (a negative bias)
// the 0 fill picks an excluded expert.
TEST(ScoredTopK, ZeroGroupMaskPicksExcludedExpertsOnlyBelowZero) {
  const MoeConfig c = config_of(8, 2);
  // Groups {0..3}, {4..7}: group 0 wins (top-2 sums), group 1 excluded.
  const std::vector<double> z = {3, 2, 1, 0, -1, -2, -3, -4};
  const std::vector<double> bias = {-5, -5, -5, -5, -5, -5, -5, -5};
  BiasedScoredTopK::Options o;
  o.n_group = 2;
  o.topk_group = 1;
  const auto inf_mask = route(BiasedScoredTopK(o), c, z, 1, bias.data());
  EXPECT_EQ(inf_mask.experts()(0, 0), 0);
  EXPECT_EQ(inf_mask.experts()(0, 1), 1);
  o.hf_zero_group_mask = true;
  const auto zero_mask = route(BiasedScoredTopK(o), c, z, 1, bias.data());
  EXPECT_EQ(zero_mask.experts()(0, 0), 4);
  EXPECT_EQ(zero_mask.experts()(0, 1), 5);
}

// DeepSeek-V4 hash layers: the experts are the table row of the token id; the weights are the
// chosen scores renormalised.
TEST(ScoredTopK, TokenTableSelection) {
  const Index E = 7, k = 3, T = 4, rows = 5;
  const MoeConfig c = config_of(E, k);
  const auto z = random_logits(T * E, 9);
  const std::vector<std::int64_t> table = {0, 1, 2, 6, 5, 4, 3, 0, 6, 1, 2, 3, 4, 5, 6};
  const std::vector<std::int64_t> ids = {4, 0, 2, 4};
  ScoredTopK::Options o;
  o.scoring = Scoring::sqrt_softplus;
  o.selection = Selection::token_table;
  o.routed_scaling_factor = 1.5;
  const auto r = route(ScoredTopK(o), c, z, T, nullptr, &ids, &table, rows);
  for (Index t = 0; t < T; ++t) {
    std::vector<Index> idx;
    std::vector<double> w;
    double sum = 0;
    for (Index j = 0; j < k; ++j) {
      const Index e = static_cast<Index>(
          table[static_cast<std::size_t>(ids[static_cast<std::size_t>(t)] * k + j)]);
      idx.push_back(e);
      w.push_back(std::sqrt(std::log1p(std::exp(z[static_cast<std::size_t>(t * E + e)]))));
      sum += w.back();
    }
    for (double& x : w) x = x / (sum + 1e-20) * 1.5;
    expect_slots(r, t, idx, w);
  }
  // Errors: no ids, an id past the table, a table entry past the experts.
  expect_error<config_error>([&] { route(ScoredTopK(o), c, z, T); },
                             "moe: Selection::token_table needs the token ids and the expert table "
                             "(RouteContext::token_ids, expert_table)");
  const std::vector<std::int64_t> bad_ids = {4, 0, 5, 1};
  expect_error<value_error>([&] { route(ScoredTopK(o), c, z, T, nullptr, &bad_ids, &table, rows); },
                            "moe: token 2 has id 5, outside the expert table's 5 rows");
  std::vector<std::int64_t> bad_table = table;
  bad_table[1] = 7;
  expect_error<value_error>([&] { route(ScoredTopK(o), c, z, T, nullptr, &ids, &bad_table, rows); },
                            "moe: expert table row 0 names expert 7, outside [0, 7)");
}

// LongCat zero experts: the routing holds E + Z experts; an index >= E may be chosen.
TEST(ScoredTopK, ZeroExpertsAreScoredAndChosen) {
  const MoeConfig c = config_of(4, 2);
  BiasedScoredTopK::Options o;
  o.scoring = Scoring::softmax;
  o.normalize = false;
  o.zero_experts = 2;
  EXPECT_EQ(BiasedScoredTopK(o).num_scored(c), 6);
  const std::vector<double> z = {0, 0, 0, 0, 5, 4};
  const std::vector<double> bias(6, 0.0);
  const auto r = route(BiasedScoredTopK(o), c, z, 1, bias.data());
  EXPECT_EQ(r.num_experts(), 6);
  EXPECT_EQ(r.experts()(0, 0), 4);
  EXPECT_EQ(r.experts()(0, 1), 5);
}

TEST(ScoredTopK, ValidationMessages) {
  MoeConfig c = config_of(16, 2);
  auto check = [&](const ScoredTopK::Options& o, const std::string& message) {
    expect_error<config_error>([&] { ScoredTopK(o).validate(c); }, message);
  };
  ScoredTopK::Options o;
  o.normalize_p = 0;
  check(o, "moe: normalize_p = 0 must be positive");
  o = {};
  o.normalize_epsilon = -1;
  check(o, "moe: normalize_epsilon = -1 must be finite and >= 0");
  o = {};
  o.normalize_min = std::numeric_limits<double>::infinity();
  check(o, "moe: normalize_min = inf must be finite and >= 0");
  o = {};
  o.routed_output_scale = 0;
  check(o, "moe: routed_output_scale = 0 must be positive");
  o = {};
  o.zero_experts = -1;
  check(o, "moe: zero_experts = -1 must be >= 0");
  o = {};
  o.n_group = 4;
  o.topk_group = 2;
  o.selection = Selection::logits;
  check(o,
        "moe: n_group = 4 needs Selection::scores and no zero experts (group-limited routing "
        "chooses from the scores of the routed experts)");
  o.selection = Selection::scores;
  EXPECT_NO_THROW(ScoredTopK(o).validate(c));
  // One group of one expert: top-2 sum is not asked for, so no error.
  c = config_of(1, 1);
  EXPECT_NO_THROW(ScoredTopK(ScoredTopK::Options{}).validate(c));
  expect_error<config_error>(
      [&] {
        Routing<double> r;
        r.resize(1, 1, 1);
        BiasedScoredTopK(BiasedScoredTopK::Options{}).route(c, RouteContext<double>{}, r);
      },
      "moe: scored top-k needs a selection bias");
}

// The hooks the router and the block read, for any policy.
TEST(ScoredTopK, RouterAndBlockHooks) {
  EXPECT_EQ(gating::routed_output_scale(gating::Laguna()), 2.5);
  EXPECT_EQ(gating::routed_output_scale(gating::Step3p7()), 2.5);
  EXPECT_EQ(gating::routed_output_scale(gating::Mixtral()), 1.0);
  EXPECT_EQ(gating::routed_output_scale(gating::SwitchTop1()), 1.0);
  gating::LongcatFlash::Options o;
  o.zero_experts = 2;
  EXPECT_EQ(gating::zero_experts(gating::LongcatFlash(o)), 2);
  EXPECT_EQ(gating::zero_experts(gating::LongcatFlash()), 0);
  EXPECT_EQ(gating::zero_experts(gating::PhiMoe()), 0);
}

// ---- sparsemixer ------------------------------------------------------------------------------

/// The plain version, written from the formula (FORMAT.md section 6, phimoe).
std::pair<std::vector<Index>, std::vector<double>> plain_sparsemixer(const double* z, Index E,
                                                                     double eps) {
  auto masked_softmax = [&](const std::vector<double>& v, double top, Index at) {
    double sum = 0;
    for (Index e = 0; e < E; ++e) {
      const double scale = std::max(std::abs(z[e]), top);
      const bool masked =
          (top - z[e]) / scale > 2 * eps || std::isinf(v[static_cast<std::size_t>(e)]);
      if (!masked) sum += std::exp(v[static_cast<std::size_t>(e)] - top);
    }
    return std::exp(v[static_cast<std::size_t>(at)] - top) / sum;
  };
  std::vector<double> v(z, z + E);
  const Index i1 = plain_top_k(v, 1)[0];
  const double w1 = masked_softmax(v, v[static_cast<std::size_t>(i1)], i1);
  v[static_cast<std::size_t>(i1)] = -std::numeric_limits<double>::infinity();
  const Index i2 = plain_top_k(v, 1)[0];
  const double w2 = masked_softmax(v, v[static_cast<std::size_t>(i2)], i2);
  return {{i1, i2}, {w1, w2}};
}

TEST(Sparsemixer, MatchesPlainFormula) {
  for (Index E : {Index(2), Index(7), Index(31), Index(129)}) {
    for (double eps : {0.0, 0.01, 0.3, 10.0}) {
      const Index T = 7;
      const auto z = random_logits(T * E, 17 + static_cast<std::uint64_t>(E), 1.0);
      const MoeConfig c = config_of(E, 2);
      gating::PhiMoe::Options o;
      o.jitter_eps = eps;
      const auto r = route(gating::PhiMoe(o), c, z, T);
      for (Index t = 0; t < T; ++t) {
        const auto [idx, w] = plain_sparsemixer(z.data() + t * E, E, eps);
        expect_slots(r, t, idx, w);
      }
    }
  }
  EXPECT_EQ(gating::PhiMoe::Options().jitter_eps, 0.01);
}

TEST(Sparsemixer, ValidationMessages) {
  expect_error<config_error>([&] { gating::Sparsemixer().validate(config_of(8, 3)); },
                             "moe: sparsemixer routes top_k = 2, got top_k = 3");
  gating::Sparsemixer::Options o;
  o.jitter_eps = -0.5;
  expect_error<config_error>([&] { gating::Sparsemixer(o).validate(config_of(8, 2)); },
                             "moe: jitter_eps = -0.5 must be finite and >= 0");
}

// ---- backward: central finite differences in double ------------------------------------------

/// L(z) = sum over kept slots of C[t, expert] * w: a cotangent keyed by expert, so a reordering of
/// slots does not change L. Returns L and fills dweights = dL/dw for the routing.
template <class G>
double slot_loss(const G& g, const MoeConfig& c, const std::vector<double>& z, Index T,
                 const std::vector<double>& C, const std::vector<double>* bias,
                 const std::vector<std::int64_t>* ids, const std::vector<std::int64_t>* table,
                 Index rows, Routing<double>* out = nullptr,
                 std::vector<double>* dweights = nullptr) {
  const auto r = route(g, c, z, T, bias ? bias->data() : nullptr, ids, table, rows);
  const Index E = r.num_experts(), k = r.slots();
  double L = 0;
  if (dweights) dweights->assign(static_cast<std::size_t>(T * k), 0.0);
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      if (!r.kept()(t, j)) continue;
      const double cj = C[static_cast<std::size_t>(t * E + r.experts()(t, j))];
      L += cj * r.weights()(t, j);
      if (dweights) (*dweights)[static_cast<std::size_t>(t * k + j)] = cj;
    }
  }
  if (out) *out = r;
  return L;
}

template <class G>
void expect_backward_matches_fd(const G& g, const MoeConfig& c, Index T, Index E_scored,
                                std::uint64_t seed, const std::vector<double>* bias = nullptr,
                                const std::vector<std::int64_t>* ids = nullptr,
                                const std::vector<std::int64_t>* table = nullptr, Index rows = 0) {
  auto z = random_logits(T * E_scored, seed, 1.0);
  const auto C = random_logits(T * E_scored, seed + 1, 1.0);
  Routing<double> r;
  std::vector<double> dweights;
  slot_loss(g, c, z, T, C, bias, ids, table, rows, &r, &dweights);
  std::vector<double> dz(static_cast<std::size_t>(T * E_scored), 0.0);
  g.backward(c, r, dweights.data(), dz.data());
  const double h = 1e-6;
  double worst = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double z0 = z[i];
    z[i] = z0 + h;
    const double up = slot_loss(g, c, z, T, C, bias, ids, table, rows);
    z[i] = z0 - h;
    const double down = slot_loss(g, c, z, T, C, bias, ids, table, rows);
    z[i] = z0;
    const double fd = (up - down) / (2 * h);
    worst = std::max(worst, std::abs(fd - dz[i]) / (1e-3 + std::abs(fd)));
    EXPECT_NEAR(dz[i], fd, 1e-6 * (1 + std::abs(fd))) << "logit " << i;
  }
  EXPECT_LT(worst, 1e-5);
}

TEST(ScoredTopKBackward, EveryVariantMatchesFiniteDifferences) {
  const Index T = 7, E = 16, k = 4;
  const MoeConfig c = config_of(E, k);
  const auto b = random_logits(E, 3, 0.1);
  // DeepSeek-V3 style: sigmoid, bias, top-2-sum groups, + 1e-20, scaled.
  expect_backward_matches_fd(BiasedScoredTopK(BiasedScoredTopK::Options::deepseek_v3(4, 2, 2.5)), c,
                             T, E, 1, &b);
  BiasedScoredTopK::Options o;
  // ERNIE: softmax scores, bias, clamp of the denominator (active for a large minimum).
  o.scoring = Scoring::softmax;
  o.normalize_epsilon = 0;
  for (double minimum : {1e-12, 0.9}) {
    o.normalize_min = minimum;
    expect_backward_matches_fd(BiasedScoredTopK(o), c, T, E, 2, &b);
  }
  // DeepSeek-V4: sqrt(softplus), bias, + 1e-20, x 1.5; LFM2: sigmoid, + 1e-6.
  o = {};
  o.scoring = Scoring::sqrt_softplus;
  o.routed_scaling_factor = 1.5;
  expect_backward_matches_fd(BiasedScoredTopK(o), c, T, E, 3, &b);
  o = {};
  o.normalize_epsilon = 1e-6;
  expect_backward_matches_fd(BiasedScoredTopK(o), c, T, E, 4, &b);
  // DBRX: L_p renormalisation, p = 1 and 2, softmax, no bias.
  for (double p : {1.0, 2.0, 3.5}) {
    ScoredTopK::Options d;
    d.scoring = Scoring::softmax;
    d.normalize_p = p;
    d.normalize_epsilon = 0;
    expect_backward_matches_fd(ScoredTopK(d), c, T, E, 5, nullptr);
  }
  // gpt-oss / Granite (softmax of the chosen logits), Llama 4 (sigmoid of the chosen), Cohere2
  // sigmoid renormalised.
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid}) {
    for (bool normalize : {false, true}) {
      ScoredTopK::Options l;
      l.selection = Selection::logits;
      l.scoring = scoring;
      l.normalize = normalize;
      l.normalize_epsilon = 0;
      expect_backward_matches_fd(ScoredTopK(l), c, T, E, 6, nullptr);
    }
  }
  // DeepSeek-V4 hash layers: the token table chooses, the scores weigh.
  const std::vector<std::int64_t> table = {0, 5, 9, 15, 1, 2, 3, 4, 8, 7, 6, 14};
  const std::vector<std::int64_t> ids = {0, 1, 2, 1, 0, 2, 2};
  ScoredTopK::Options h;
  h.scoring = Scoring::sqrt_softplus;
  h.selection = Selection::token_table;
  h.routed_scaling_factor = 1.5;
  expect_backward_matches_fd(ScoredTopK(h), c, T, E, 7, nullptr, &ids, &table, 3);
  // LongCat: softmax over E + Z, bias, no renormalisation.
  BiasedScoredTopK::Options z;
  z.scoring = Scoring::softmax;
  z.normalize = false;
  z.zero_experts = 3;
  z.routed_scaling_factor = 2.5;
  const auto bz = random_logits(E + 3, 8, 0.1);
  expect_backward_matches_fd(BiasedScoredTopK(z), c, T, E + 3, 9, &bz);
}

}  // namespace
}  // namespace moe
