// Backward of the issue 12 families (gpt-oss, Llama 4, DeepSeek-V4 and its hash layers, the
// sigmoid + selection-bias families, Laguna, Step, JetMoE, Cohere2): block_backward against
// central finite differences in double on every parameter (biases included) and on x; the
// selection bias has no gradient; the clamped GLU derivatives on both sides of each clamp; the
// features still refused, with their messages.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moe/backward.hpp"
#include "moe/moe.hpp"

#include "fd_util.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;

/// One block, its data and loss L = <y, dy> + weighted auxiliary losses.
template <class Gating, class Ffn = SwiGLU>
struct Problem {
  using Block = SparseMoeBlock<double, Gating, Ffn>;
  MoeConfig config;
  typename Gating::Options options;  // the family's defaults
  MoeWeights<double> w;
  RowMatrix<double> x, dy;
  std::vector<std::int64_t> token_ids;  // hash routing only
  LossCoefficients coeffs;

  /// Forward + backward of weights on xin; the loss, and the gradients when g / dx are given.
  double run(const MoeWeights<double>& weights, const RowMatrix<double>& xin,
             MoeGradients<double>* g = nullptr, RowMatrix<double>* dx = nullptr,
             Workspace<double>* keep = nullptr) const {
    Block block(config, weights, options);
    Workspace<double> local;
    Workspace<double>& ws = keep ? *keep : local;
    ws.set_training(true);
    if (!token_ids.empty()) ws.set_token_ids(token_ids.data(), xin.rows());
    RowMatrix<double> y(xin.rows(), config.d_model);
    block.forward(xin, y, ws);
    auto grads = MoeGradients<double>::zeros_like(weights);
    RowMatrix<double> dxl(xin.rows(), config.d_model);
    const LossValues v = block_backward(block, xin, dy, ws, grads, dxl, coeffs);
    if (g) *g = std::move(grads);
    if (dx) *dx = dxl;
    return (y.array() * dy.array()).sum() + v.weighted(coeffs);
  }
};

/// A parameter tensor of the weights and its gradient, as flat arrays.
struct Param {
  std::string name;
  double* w;
  const double* g;
  Index n;
};

std::vector<Param> params(MoeWeights<double>& w, const MoeGradients<double>& g) {
  std::vector<Param> p;
  auto add = [&p](const char* name, auto& wt, const auto& gt) {
    if (wt.size() != 0) p.push_back({name, wt.data(), gt.data(), wt.size()});
  };
  add("router", w.router, g.router);
  add("router_logit_bias", w.router_logit_bias, g.router_logit_bias);
  add("experts.in", w.experts.stacked_in(), g.experts.stacked_in());
  add("experts.out", w.experts.stacked_out(), g.experts.stacked_out());
  add("experts.in_bias", w.experts.in_biases(), g.experts.in_biases());
  add("experts.out_bias", w.experts.out_biases(), g.experts.out_biases());
  add("shared.in", w.shared.stacked_in(), g.shared.stacked_in());
  add("shared.out", w.shared.stacked_out(), g.shared.stacked_out());
  add("shared.in_bias", w.shared.in_biases(), g.shared.in_biases());
  add("shared.out_bias", w.shared.out_biases(), g.shared.out_biases());
  add("shared_gate", w.shared_gate, g.shared_gate);
  add("output_bias", w.output_bias, g.output_bias);
  return p;
}

/// block_backward against central differences (step h, relative tolerance tol) on every
/// parameter and on x; the selection bias (router_bias) must leave the loss unchanged.
/// Returns the names of the tensors checked.
template <class Gating, class Ffn>
std::vector<std::string> check_fd(const Problem<Gating, Ffn>& p, double tol = 1e-7,
                                  double h = 1e-6) {
  MoeGradients<double> g;
  RowMatrix<double> dx;
  p.run(p.w, p.x, &g, &dx);
  MoeWeights<double> w = p.w;
  std::vector<std::string> names;
  int failures = 0;
  auto check = [&](const std::string& name, Index i, double analytic, double numeric) {
    if (std::abs(analytic - numeric) <= tol * (1 + std::abs(numeric))) return;
    if (++failures <= 10) {
      ADD_FAILURE() << name << "[" << i << "]: backward " << analytic << ", differences "
                    << numeric;
    }
  };
  for (const Param& q : params(w, g)) {
    names.push_back(q.name);
    for (Index i = 0; i < q.n; ++i) {
      const auto [lp, lm] = test::around(q.w[i], h, [&] { return p.run(w, p.x); });
      check(q.name, i, q.g[i], (lp - lm) / (2 * h));
    }
  }
  for (Index i = 0; i < w.router_bias.size(); ++i) {
    const auto [lp, lm] = test::around(w.router_bias[i], h, [&] { return p.run(w, p.x); });
    EXPECT_EQ(lp, lm) << "the selection bias " << i << " changed the loss";
  }
  RowMatrix<double> xp = p.x;
  for (Index i = 0; i < xp.size(); ++i) {
    const auto [lp, lm] = test::around(xp.data()[i], h, [&] { return p.run(p.w, xp); });
    check("x", i, dx.data()[i], (lp - lm) / (2 * h));
  }
  names.push_back("x");
  return names;
}

template <class Gating, class Ffn = SwiGLU>
Problem<Gating, Ffn> make(std::uint64_t seed, Index tokens, Index E, Index k, Index shared_d_ff,
                          bool with_bias) {
  std::mt19937_64 rng(seed);
  Problem<Gating, Ffn> p;
  p.config.d_model = 6;
  p.config.d_ff = 5;
  p.config.num_experts = E;
  p.config.top_k = k;
  p.config.shared_d_ff = shared_d_ff;
  p.w = test::random_weights<double>(p.config, rng, Ffn::gated, with_bias);
  p.w.router *= 2.0;  // spread the routing so no selection sits within h of a tie
  p.x = random_matrix<double>(tokens, p.config.d_model, rng);
  p.dy = random_matrix<double>(tokens, p.config.d_model, rng);
  return p;
}

void add_expert_biases(ExpertStack<double>& s, std::mt19937_64& rng) {
  s.add_biases();
  s.in_biases() = random_matrix<double>(s.num_experts(), s.in_rows(), rng, 0.1);
  s.out_biases() = random_matrix<double>(s.num_experts(), s.d_model(), rng, 0.1);
}

/// How the routed experts' kept pre-activations sit around the clamps of o: entries on each
/// side, and the distance of the nearest to a kink (central differences need it > h).
struct ClampSides {
  Index gate_clamped = 0, gate_free = 0, up_clamped = 0, up_free = 0;
  double nearest = std::numeric_limits<double>::infinity();
};

template <class Gating, class Ffn>
ClampSides clamp_sides(const Problem<Gating, Ffn>& p) {
  Workspace<double> ws;
  p.run(p.w, p.x, nullptr, nullptr, &ws);
  const GluOptions& o = p.config.expert_glu;
  const Index f = p.config.d_ff, N = ws.plan().num_rows;
  const double* h = detail::WorkspaceAccess::hidden(std::as_const(ws)).data();
  ClampSides c;
  for (Index r = 0; r < N; ++r) {
    for (Index i = 0; i < f; ++i) {
      const double g = h[r * 2 * f + i], u = h[r * 2 * f + f + i];
      const double gk = o.clamp_after_activation ? Silu::value(g) : g;
      (gk > o.limit ? c.gate_clamped : c.gate_free)++;
      (std::abs(u) > o.limit ? c.up_clamped : c.up_free)++;
      c.nearest = std::min({c.nearest, std::abs(gk - o.limit), std::abs(std::abs(u) - o.limit)});
    }
  }
  return c;
}

void expect_both_sides(const ClampSides& c) {
  EXPECT_GT(c.gate_clamped, 0);
  EXPECT_GT(c.gate_free, 0);
  EXPECT_GT(c.up_clamped, 0);
  EXPECT_GT(c.up_free, 0);
  EXPECT_GT(c.nearest, 1e-4) << "an entry sits at a kink: choose another seed";
}

bool has(const std::vector<std::string>& names, const std::string& n) {
  return std::find(names.begin(), names.end(), n) != names.end();
}

// ---- the clamped GLU's derivatives, element by element ------------------------------------

double glu_value(double g, double u, const GluOptions& o) {
  const double uc = std::min(std::max(u, -o.limit), o.limit) + o.up_offset;
  if (o.clamp_after_activation) return std::min(Silu::value(g), o.limit) * uc;
  const double gc = std::min(g, o.limit);
  return gc / (1 + std::exp(-o.alpha * gc)) * uc;
}

TEST(FamilyBackward, ClampedGluDerivativesOnBothSidesOfEveryClamp) {
  GluOptions gpt_oss;
  gpt_oss.limit = 7;
  gpt_oss.up_offset = 1;
  gpt_oss.alpha = 1.702;
  GluOptions deepseek_v4;
  deepseek_v4.limit = 7;
  GluOptions step;
  step.limit = 7;
  step.clamp_after_activation = true;
  const double h = 1e-6;
  // gate below / above 7 (silu(g) crosses 7 near g = 7.006); up inside / beyond +-7.
  for (const GluOptions& o : {gpt_oss, deepseek_v4, step}) {
    for (double g : {-3.1, 0.4, 6.5, 7.5, 9.0}) {
      for (double u : {-8.2, -2.5, 0.7, 6.9, 7.3}) {
        double dg = 0, du = 0;
        detail::clamped_glu_derivatives<Silu>(g, u, o, dg, du);
        const double ng = (glu_value(g + h, u, o) - glu_value(g - h, u, o)) / (2 * h);
        const double nu = (glu_value(g, u + h, o) - glu_value(g, u - h, o)) / (2 * h);
        EXPECT_NEAR(dg, ng, 1e-7 * (1 + std::abs(ng))) << "g " << g << " u " << u;
        EXPECT_NEAR(du, nu, 1e-7 * (1 + std::abs(nu))) << "g " << g << " u " << u;
        if (g > 7.1) {
          EXPECT_EQ(dg, 0.0) << "clamped gate, g " << g;
        }
        if (std::abs(u) > 7) {
          EXPECT_EQ(du, 0.0) << "clamped up, u " << u;
        }
      }
    }
  }
}

// ---- gpt-oss --------------------------------------------------------------------------------

// Router logit bias (a gradient), softmax over the selected logits, clamped SwiGLU with the +1
// offset and alpha 1.702, biases on both projections; gate/up are de-interleaved at load, so the
// gradients come in the stack's layout (gate rows, then up rows).
TEST(FamilyBackward, GptOssLogitBiasClampedSwiGluExpertBiases) {
  for (Index tokens : {1, 7}) {
    SCOPED_TRACE(tokens);
    auto p = make<gating::GptOss>(100 + static_cast<std::uint64_t>(tokens), tokens, 5, 2, 0, false);
    std::mt19937_64 rng(7);
    p.w.router_logit_bias = random_matrix<double>(5, 1, rng, 0.5);
    add_expert_biases(p.w.experts, rng);
    p.config.expert_glu.limit = 0.4;  // small enough that the clamps bite on this data
    p.config.expert_glu.up_offset = 1.0;
    p.config.expert_glu.alpha = 1.702;
    if (tokens > 1) expect_both_sides(clamp_sides(p));
    const auto names = check_fd(p);
    EXPECT_TRUE(has(names, "router_logit_bias"));
    EXPECT_TRUE(has(names, "experts.in_bias"));
    EXPECT_TRUE(has(names, "experts.out_bias"));
  }
}

TEST(FamilyBackward, GptOssWithTheLossesAndAPool) {
  auto p = make<gating::GptOss>(3, 31, 7, 3, 0, false);
  std::mt19937_64 rng(8);
  p.w.router_logit_bias = random_matrix<double>(7, 1, rng, 0.5);
  add_expert_biases(p.w.experts, rng);
  p.config.expert_glu.limit = 0.5;
  p.config.expert_glu.up_offset = 1.0;
  p.config.expert_glu.alpha = 1.702;
  p.coeffs.aux = 0.4;
  p.coeffs.z = 0.2;
  expect_both_sides(clamp_sides(p));
  check_fd(p);
  // A thread pool gives the same gradients, bitwise.
  using Block = decltype(p)::Block;
  const Block block(p.config, p.w, p.options);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(p.x.rows(), 6), dx1(p.x.rows(), 6), dx2(p.x.rows(), 6);
  block.forward(p.x, y, ws);
  auto g1 = MoeGradients<double>::zeros_like(p.w), g2 = g1;
  BackwardWorkspace<double> bws;
  block_backward(block, p.x, p.dy, ws, g1, dx1, p.coeffs, bws);
  ThreadPool pool(3);
  block_backward(block, p.x, p.dy, ws, g2, dx2, p.coeffs, bws, pool);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(g1.experts.in_biases(), g2.experts.in_biases());
  EXPECT_EQ(g1.experts.out_biases(), g2.experts.out_biases());
  EXPECT_EQ(g1.router_logit_bias, g2.router_logit_bias);
  EXPECT_EQ(g1.experts.stacked_in(), g2.experts.stacked_in());
}

// ---- Llama 4 -------------------------------------------------------------------------------

// The routing weight (sigmoid of the selected logit) scales the expert input; shared expert.
// HF rounds the router to float32: the gradient check runs the router in double.
TEST(FamilyBackward, Llama4WeightOnTheExpertInputSharedExpert) {
  for (Index tokens : {1, 7}) {
    SCOPED_TRACE(tokens);
    auto p = make<gating::Llama4>(200 + static_cast<std::uint64_t>(tokens), tokens, 5, 1, 4, false);
    p.config.weight_expert_input = true;
    p.options.float32 = false;
    check_fd(p);
  }
  auto p = make<gating::Llama4>(210, 7, 7, 2, 3, false);
  p.config.weight_expert_input = true;
  p.options.float32 = false;
  p.coeffs.z = 0.3;
  const auto names = check_fd(p);
  EXPECT_TRUE(has(names, "shared.in"));
}

// ---- DeepSeek-V4 ---------------------------------------------------------------------------

template <class G, class = void>
struct has_router_bias_gradient : std::false_type {};
template <class G>
struct has_router_bias_gradient<G, std::void_t<decltype(std::declval<G&>().router_bias)>>
    : std::true_type {};
static_assert(!has_router_bias_gradient<MoeGradients<double>>::value,
              "the selection bias has no gradient, so MoeGradients has no member for it");

// sqrt(softplus) scores, the selection bias (no gradient: the loss does not move with it), the
// clamp before silu on routed and shared experts, routed scaling 1.5.
TEST(FamilyBackward, DeepSeekV4SqrtSoftplusSelectionBiasClampScaling) {
  auto p = make<gating::DeepSeekV4>(300, 7, 7, 2, 4, /*with_bias=*/true);
  p.config.expert_glu.limit = 0.4;
  p.config.shared_glu = p.config.expert_glu;
  EXPECT_EQ(p.options.routed_scaling_factor, 1.5);
  EXPECT_EQ(p.options.scoring, gating::Scoring::sqrt_softplus);
  expect_both_sides(clamp_sides(p));
  p.coeffs.aux = 0.3;
  p.coeffs.aux_loss = AuxLoss::deepseek_sequence;
  check_fd(p);
}

// Hash layers: the experts come from the token-id table (no gradient); the weights are the
// sqrt(softplus) scores of the router, so the router gets one.
TEST(FamilyBackward, DeepSeekV4HashLayerTableRouting) {
  auto p = make<gating::DeepSeekV4Hash>(400, 7, 7, 2, 4, false);
  p.config.expert_glu.limit = 0.4;
  p.config.shared_glu = p.config.expert_glu;
  std::mt19937_64 rng(9);
  const Index rows = 11;
  p.w.expert_table.resize(rows, 2);
  std::vector<std::int64_t> experts(7);
  for (Index r = 0; r < rows; ++r) {
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    p.w.expert_table(r, 0) = experts[0];
    p.w.expert_table(r, 1) = experts[1];
  }
  p.token_ids = {3, 0, 10, 3, 7, 1, 5};
  const auto names = check_fd(p);
  EXPECT_TRUE(has(names, "router"));
}

// ---- sigmoid + selection bias families and the other scored routers --------------------------

template <class G>
void check_family(std::uint64_t seed, Index shared_d_ff, bool bias) {
  SCOPED_TRACE(seed);
  auto p = make<G>(seed, 9, 8, 2, shared_d_ff, bias);
  p.options.float32 = false;  // HF's float32 steps are differentiated as if exact
  p.coeffs.aux = 0.2;
  check_fd(p);
}

TEST(FamilyBackward, SigmoidSelectionBiasFamilies) {
  {
    auto p = make<gating::DeepSeekV32>(500, 9, 8, 3, 4, true);
    p.options.float32 = false;
    p.options.n_group = 4;
    p.options.topk_group = 2;
    check_fd(p);
  }
  check_family<gating::Glm4Moe>(501, 4, true);
  check_family<gating::MiniMaxM2>(502, 0, true);
  check_family<gating::Lfm2Moe>(503, 0, true);
  check_family<gating::Afmoe>(504, 3, true);
  check_family<gating::HyV3>(505, 3, true);
  check_family<gating::Ernie4_5Moe>(506, 0, true);  // softmax + selection bias, norm min
}

// Laguna: soft-capped logits, routed output x 2.5; Step: clamp after silu (routed and shared),
// routed output x 2.5.
TEST(FamilyBackward, LagunaSoftcapAndStepRoutedOutputScale) {
  {
    auto p = make<gating::Laguna>(600, 7, 6, 2, 0, true);
    p.options.float32 = false;
    p.config.router_logit_softcap = 1.5;  // about the size of the logits: the cap bends them
    p.coeffs.z = 0.5;
    check_fd(p);
  }
  auto p = make<gating::Step3p7>(601, 7, 6, 2, 4, true);
  p.options.float32 = false;
  p.config.expert_glu.limit = 0.2;
  p.config.expert_glu.clamp_after_activation = true;
  p.config.shared_glu.limit = 0.25;
  p.config.shared_glu.clamp_after_activation = true;
  expect_both_sides(clamp_sides(p));
  check_fd(p);
}

// JetMoE: softmax over the selected logits, expert biases and the output bias; Cohere2: the
// shared expert averaged with the routed output.
TEST(FamilyBackward, JetMoeOutputBiasAndCohere2Average) {
  {
    auto p = make<gating::JetMoe>(700, 7, 5, 2, 0, false);
    p.options.float32 = false;
    std::mt19937_64 rng(10);
    add_expert_biases(p.w.experts, rng);
    p.w.output_bias = random_matrix<double>(6, 1, rng, 0.3);
    const auto names = check_fd(p);
    EXPECT_TRUE(has(names, "output_bias"));
  }
  auto p = make<gating::Cohere2Moe>(701, 7, 5, 2, 4, false);
  p.options.float32 = false;
  p.config.shared_combine = SharedCombine::average;
  check_fd(p);
}

// ---- float blocks ---------------------------------------------------------------------------

/// A float block on the same data gives the double gradients to float accuracy (the clamped GLU,
/// the biases and the weighted input in T = float).
template <class Gating>
void expect_float_agrees(const Problem<Gating>& p) {
  MoeWeights<float> wf = MoeWeights<float>::zeros(p.config, true);
  wf.router = p.w.router.template cast<float>();
  wf.router_logit_bias = p.w.router_logit_bias.template cast<float>();
  wf.experts.stacked_in() = p.w.experts.stacked_in().template cast<float>();
  wf.experts.stacked_out() = p.w.experts.stacked_out().template cast<float>();
  if (p.w.experts.has_biases()) {
    wf.experts.add_biases();
    wf.experts.in_biases() = p.w.experts.in_biases().template cast<float>();
    wf.experts.out_biases() = p.w.experts.out_biases().template cast<float>();
  }
  wf.shared.stacked_in() = p.w.shared.stacked_in().template cast<float>();
  wf.shared.stacked_out() = p.w.shared.stacked_out().template cast<float>();
  const SparseMoeBlock<float, Gating> bf(p.config, wf, p.options);
  Workspace<float> ws;
  ws.set_training(true);
  const RowMatrix<float> x = p.x.template cast<float>(), dy = p.dy.template cast<float>();
  RowMatrix<float> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  bf.forward(x, y, ws);
  auto gf = MoeGradients<float>::zeros_like(wf);
  block_backward(bf, x, dy, ws, gf, dx, p.coeffs);
  MoeGradients<double> gd;
  RowMatrix<double> dxd;
  p.run(p.w, p.x, &gd, &dxd);
  auto near = [](const auto& f, const auto& d, const char* what) {
    ASSERT_EQ(f.size(), d.size()) << what;
    if (d.size() == 0) return;
    const double scale = 1 + d.cwiseAbs().maxCoeff();
    EXPECT_LT((f.template cast<double>() - d).cwiseAbs().maxCoeff(), 1e-5 * scale) << what;
  };
  near(dx, dxd, "dx");
  near(gf.router, gd.router, "router");
  near(gf.experts.stacked_in(), gd.experts.stacked_in(), "experts.in");
  near(gf.experts.stacked_out(), gd.experts.stacked_out(), "experts.out");
  near(gf.experts.in_biases(), gd.experts.in_biases(), "experts.in_bias");
  near(gf.router_logit_bias, gd.router_logit_bias, "router_logit_bias");
  near(gf.shared.stacked_in(), gd.shared.stacked_in(), "shared.in");
}

TEST(FamilyBackward, FloatAgreesWithDouble) {
  auto gpt = make<gating::GptOss>(1000, 31, 7, 2, 0, false);
  std::mt19937_64 rng(14);
  gpt.w.router_logit_bias = random_matrix<double>(7, 1, rng, 0.5);
  add_expert_biases(gpt.w.experts, rng);
  gpt.config.expert_glu.limit = 0.5;
  gpt.config.expert_glu.up_offset = 1.0;
  gpt.config.expert_glu.alpha = 1.702;
  expect_both_sides(clamp_sides(gpt));
  expect_float_agrees(gpt);
  auto llama = make<gating::Llama4>(1001, 31, 7, 1, 4, false);
  llama.config.weight_expert_input = true;
  expect_float_agrees(llama);  // the router in float32, as HF
}

// ---- gradients layout and refusals ---------------------------------------------------------

TEST(FamilyBackward, GradientsHaveTheBiasesOfTheWeights) {
  auto p = make<gating::GptOss>(800, 3, 5, 2, 4, false);
  std::mt19937_64 rng(11);
  add_expert_biases(p.w.experts, rng);
  p.w.router_logit_bias = random_matrix<double>(5, 1, rng);
  auto g = MoeGradients<double>::zeros_like(p.w);
  EXPECT_EQ(g.experts.in_biases().rows(), 5);
  EXPECT_EQ(g.experts.in_biases().cols(), 10);
  EXPECT_EQ(g.experts.out_biases().cols(), 6);
  EXPECT_FALSE(g.shared.has_biases());
  EXPECT_EQ(g.router_logit_bias.size(), 5);
  EXPECT_EQ(g.output_bias.size(), 0);
  g.experts.in_biases().setConstant(2.0);
  g.router_logit_bias.setConstant(-3.0);
  EXPECT_EQ(g.max_abs(), 3.0);
  g.set_zero();
  EXPECT_EQ(g.max_abs(), 0.0);
  auto bad = MoeGradients<double>::zeros_like(p.w);
  bad.router_logit_bias.resize(4);
  test::expect_error<shape_error>(
      [&] { bad.check_like(p.w); },
      "moe: gradient of the router logit bias has shape [4 x 1], expected [5 x 1]");
}

template <class Ffn = SwiGLU>
void expect_refused(const MoeConfig& c, const MoeWeights<double>& w, const std::string& what) {
  SparseMoeBlock<double, gating::SoftmaxTopK, Ffn> block(c, w);
  std::mt19937_64 rng(12);
  const RowMatrix<double> x = random_matrix<double>(3, c.d_model, rng);
  RowMatrix<double> y(3, c.d_model), dx(3, c.d_model);
  Workspace<double> ws;
  ws.set_training(true);
  block.forward(x, y, ws);
  auto g = MoeGradients<double>::zeros_like(block.weights());
  test::expect_error<config_error>([&] { block_backward(block, x, y, ws, g, dx); },
                                   "moe: block_backward does not differentiate " + what +
                                       " yet (the families that use it run inference only)");
}

TEST(FamilyBackward, RefusesWhatItDoesNotDifferentiate) {
  auto p = make<gating::SoftmaxTopK>(900, 3, 5, 2, 4, false);
  {
    auto w = p.w;
    w.router_input_scale = Vector<double>::Ones(6);
    expect_refused(p.config, w, "the router input norm");
  }
  {
    auto w = p.w;
    w.expert_weight_scale = Vector<double>::Ones(5);
    expect_refused(p.config, w, "a per-expert weight scale");
  }
  {
    MoeConfig c = p.config;
    c.combine_in_float32 = true;
    expect_refused(c, p.w, "the float32 shared-expert combine");
  }
  {
    auto w = p.w;
    w.expert_input_norm = Vector<double>::Ones(6);
    expect_refused(p.config, w, "norms around the experts");
  }
  {
    MoeConfig c = p.config;
    c.latent_dim = 3;
    std::mt19937_64 rng(13);
    auto w = MoeWeights<double>::zeros(c, /*gated=*/false);
    w.router = random_matrix<double>(5, 6, rng);
    w.latent_in = random_matrix<double>(3, 6, rng);
    w.latent_out = random_matrix<double>(6, 3, rng);
    expect_refused<Relu2Mlp>(c, w, "a latent projection");
  }
}

}  // namespace
}  // namespace moe
