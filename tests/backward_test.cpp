// Tests of moe/backward.hpp: central finite differences in double against block_backward for
// every differentiable gating policy, with shared experts, the balance losses and the z-loss;
// gradient accumulation; workspace checks and their messages.
#include "moe/backward.hpp"

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "fd_util.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;

/// One differentiable configuration: block type, weights, input, upstream gradient, losses.
template <class Gating, class Ffn>
struct FdProblem {
  using Block = SparseMoeBlock<double, Gating, Ffn>;
  MoeConfig config;
  typename Gating::Options options;
  MoeWeights<double> w;
  RowMatrix<double> x, dy;
  LossCoefficients coeffs;
  std::vector<double> mask;

  /// L = <y, dy> + weighted auxiliary losses, through block_backward's own loss values.
  double loss(const MoeWeights<double>& weights, const RowMatrix<double>& xin) const {
    Block block(config, weights, options);
    Workspace<double> ws;
    ws.set_training(true);
    RowMatrix<double> y(xin.rows(), config.d_model);
    block.forward(xin, y, ws);
    auto g = MoeGradients<double>::zeros_like(weights);
    RowMatrix<double> dx(xin.rows(), config.d_model);
    const LossValues v = block_backward(block, xin, dy, ws, g, dx, coeffs);
    return (y.array() * dy.array()).sum() + v.weighted(coeffs);
  }
};

/// Every parameter tensor of w (paired with the same tensor of g).
template <class T>
std::vector<std::pair<std::string, std::pair<RowMatrix<T>*, RowMatrix<T>*>>> tensors(
    MoeWeights<T>& w, MoeGradients<T>& g) {
  return {{"router", {&w.router, &g.router}},
          {"router_noise", {&w.router_noise, &g.router_noise}},
          {"experts.in", {&w.experts.stacked_in(), &g.experts.stacked_in()}},
          {"experts.out", {&w.experts.stacked_out(), &g.experts.stacked_out()}},
          {"shared.in", {&w.shared.stacked_in(), &g.shared.stacked_in()}},
          {"shared.out", {&w.shared.stacked_out(), &g.shared.stacked_out()}},
          {"shared_gate", {&w.shared_gate, &g.shared_gate}}};
}

/// Compares block_backward with central differences (step h) on every parameter and input.
template <class Gating, class Ffn>
void check_fd(FdProblem<Gating, Ffn> p, double tol = 2e-8, double h = 1e-6) {
  using Block = typename FdProblem<Gating, Ffn>::Block;
  Block block(p.config, p.w, p.options);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(p.x.rows(), p.config.d_model);
  block.forward(p.x, y, ws);
  auto g = MoeGradients<double>::zeros_like(p.w);
  RowMatrix<double> dx(p.x.rows(), p.config.d_model);
  block_backward(block, p.x, p.dy, ws, g, dx, p.coeffs);

  double worst = 0;
  std::string worst_name;
  auto check = [&](const std::string& name, double analytic, double numeric) {
    const double err = std::abs(analytic - numeric) / (1 + std::abs(numeric));
    if (err > worst) {
      worst = err;
      worst_name = name;
    }
    EXPECT_NEAR(analytic, numeric, tol * (1 + std::abs(numeric))) << name;
  };
  MoeWeights<double> w = p.w;
  for (auto& [name, pair] : tensors(w, g)) {
    RowMatrix<double>& wt = *pair.first;
    const RowMatrix<double>& gt = *pair.second;
    for (Index i = 0; i < wt.size(); ++i) {
      const auto [lp, lm] = test::around(wt.data()[i], h, [&] { return p.loss(w, p.x); });
      check(name + "[" + std::to_string(i) + "]", gt.data()[i], (lp - lm) / (2 * h));
    }
  }
  RowMatrix<double> xp = p.x;
  for (Index i = 0; i < xp.size(); ++i) {
    const auto [lp, lm] = test::around(xp.data()[i], h, [&] { return p.loss(p.w, xp); });
    check("x[" + std::to_string(i) + "]", dx.data()[i], (lp - lm) / (2 * h));
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", worst);
  ::testing::Test::RecordProperty("worst_fd_error", buf);
  SCOPED_TRACE("worst " + worst_name);
}

template <class Gating, class Ffn = SwiGLU>
FdProblem<Gating, Ffn> make_problem(std::uint64_t seed, Index T, Index d, Index f, Index E, Index k,
                                    Index shared_d_ff, bool shared_gate, bool with_bias = false,
                                    bool with_noise = false) {
  std::mt19937_64 rng(seed);
  FdProblem<Gating, Ffn> p;
  p.config.d_model = d;
  p.config.d_ff = f;
  p.config.num_experts = E;
  p.config.top_k = k;
  p.config.shared_d_ff = shared_d_ff;
  p.config.shared_expert_gate = shared_gate;
  p.w = test::random_weights<double>(p.config, rng, Ffn::gated, with_bias, with_noise);
  p.w.router *= 2.0;  // spread the routing so no selection sits within h of a tie
  p.x = random_matrix<double>(T, d, rng);
  p.dy = random_matrix<double>(T, d, rng);
  return p;
}

TEST(BackwardFd, SoftmaxTopKRenormalisedWithAuxAndZ) {
  auto p = make_problem<gating::SoftmaxTopK>(1, 9, 6, 5, 5, 2, 0, false);
  p.options.normalize = true;
  p.coeffs.aux = 0.7;
  p.coeffs.z = 0.3;
  check_fd(p);
}

TEST(BackwardFd, SoftmaxTopKRawWeightsGatedSharedExpert) {
  // Qwen2-MoE: no renormalisation, sigmoid-gated shared expert.
  auto p = make_problem<gating::SoftmaxTopK>(2, 8, 6, 4, 6, 3, 5, true);
  p.options.normalize = false;
  p.coeffs.aux = 0.5;
  check_fd(p);
}

TEST(BackwardFd, SoftmaxTopKMaskedMegaBlocksLossPlainFfn) {
  auto p = make_problem<gating::SoftmaxTopK, GeluMlp>(3, 10, 5, 7, 4, 2, 3, false);
  p.mask = {1, 1, 0, 1, 1, 1, 0, 0, 1, 1};
  p.coeffs.aux = 1.3;
  p.coeffs.normalization = BalanceNormalization::megablocks;
  p.coeffs.token_mask = p.mask.data();
  p.coeffs.z = 0.1;
  check_fd(p);
}

TEST(BackwardFd, SoftmaxTopKGeGluTop1) {
  auto p = make_problem<gating::SoftmaxTopK, GeGLU>(4, 7, 4, 3, 3, 1, 0, false);
  p.coeffs.aux = 0.4;
  p.coeffs.aux_loss = AuxLoss::switch_top1;
  p.coeffs.seq_len = 7;
  check_fd(p);
}

TEST(BackwardFd, DeepSeekSequenceLossThroughSoftmaxRouting) {
  auto p = make_problem<gating::SoftmaxTopK>(5, 8, 4, 3, 6, 2, 0, false);
  p.coeffs.aux = 0.9;
  p.coeffs.aux_loss = AuxLoss::deepseek_sequence;
  p.coeffs.seq_len = 4;
  check_fd(p);
}

TEST(BackwardFd, DeepSeekV3SigmoidGroupsBiasScalingSharedExpert) {
  using G = gating::GroupLimitedTopK;
  auto p = make_problem<G>(11, 9, 6, 4, 8, 3, 5, false, /*with_bias=*/true);
  p.options = G::Options::deepseek_v3(/*n_group=*/4, /*topk_group=*/2, /*scaling=*/2.5);
  p.coeffs.aux = 0.6;
  p.coeffs.aux_loss = AuxLoss::deepseek_sequence;
  p.coeffs.seq_len = 3;
  p.coeffs.z = 0.2;
  check_fd(p);
}

TEST(BackwardFd, DeepSeekV3WithoutRenormalisation) {
  using G = gating::GroupLimitedTopK;
  auto p = make_problem<G>(12, 7, 5, 4, 6, 2, 0, false, true);
  p.options = G::Options::deepseek_v3(3, 2, 1.7, /*norm_topk_prob=*/false);
  check_fd(p);
}

TEST(BackwardFd, DeepSeekV2SoftmaxMaxGroupScaled) {
  using G = gating::DeepSeekV2;
  auto p = make_problem<G>(13, 8, 5, 4, 6, 2, 4, true);
  p.options = G::Options::deepseek_v2(3, 2, 16.0);
  p.coeffs.aux = 0.3;
  check_fd(p);
}

TEST(BackwardFd, SwitchTop1WithDroppedTokens) {
  using G = gating::CapacityTopK;
  auto p = make_problem<G, ReluMlp>(14, 12, 5, 6, 4, 1, 0, false);
  p.options = G::Options::switch_transformers(/*expert_capacity=*/2);
  p.coeffs.aux = 0.5;
  p.coeffs.aux_loss = AuxLoss::switch_top1;
  p.coeffs.seq_len = 6;
  p.coeffs.z = 0.25;
  // The case must drop tokens, or it would not test what it claims.
  SparseMoeBlock<double, G, ReluMlp> block(p.config, p.w, p.options);
  Workspace<double> ws;
  RowMatrix<double> y(12, 5);
  block.forward(p.x, y, ws);
  ASSERT_GT(ws.stats().dropped_tokens, 2);
  check_fd(p);
}

TEST(BackwardFd, GShardTop2RenormalisedAfterDrop) {
  using G = gating::CapacityTopK;
  auto p = make_problem<G>(15, 12, 5, 4, 4, 2, 3, true);
  p.options = G::Options::gshard(/*capacity_factor=*/0.75);
  p.coeffs.aux = 0.5;
  SparseMoeBlock<double, G> block(p.config, p.w, p.options);
  Workspace<double> ws;
  RowMatrix<double> y(12, 5);
  block.forward(p.x, y, ws);
  ASSERT_GT(ws.stats().dropped, 0);
  check_fd(p);
}

TEST(BackwardFd, CapacityTopKRenormalisedBeforeDrop) {
  using G = gating::CapacityTopK;
  auto p = make_problem<G>(16, 10, 5, 4, 4, 2, 0, false);
  p.options = G::Options::gshard(0.75);
  p.options.renormalize = G::Renormalize::before_drop;
  check_fd(p);
}

TEST(BackwardFd, NoisyTopKWithImportanceAndLoadLosses) {
  using G = gating::NoisyTopK;
  auto p = make_problem<G>(17, 10, 5, 4, 5, 2, 0, false, false, /*with_noise=*/true);
  p.coeffs.aux = 0;
  p.coeffs.importance = 0.7;
  p.coeffs.load = 0.9;
  p.coeffs.z = 0.1;
  check_fd(p);
}

TEST(BackwardFd, NoisyTopKWithNoiseEpsilonSharedExpert) {
  using G = gating::NoisyTopK;
  auto p = make_problem<G>(18, 8, 5, 4, 6, 3, 3, true, false, true);
  p.options.noise_epsilon = 0.01;
  p.coeffs.importance = 0.4;
  p.coeffs.load = 0.4;
  check_fd(p);
}

TEST(BackwardFd, ExpertChoice) {
  using G = gating::ExpertChoice;
  auto p = make_problem<G>(19, 10, 5, 4, 4, 1, 3, false);
  p.options.capacity_factor = 1.5;
  p.coeffs.z = 0.3;
  check_fd(p);
}

TEST(Backward, AccumulatesIntoGradients) {
  auto p = make_problem<gating::SoftmaxTopK>(6, 5, 4, 3, 4, 2, 3, true);
  SparseMoeBlock<double, gating::SoftmaxTopK> block(p.config, p.w);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(5, 4), dx(5, 4);
  block.forward(p.x, y, ws);
  auto g1 = MoeGradients<double>::zeros_like(p.w);
  auto g2 = MoeGradients<double>::zeros_like(p.w);
  BackwardWorkspace<double> bws;
  block_backward(block, p.x, p.dy, ws, g1, dx, {}, bws);
  block_backward(block, p.x, p.dy, ws, g2, dx, {}, bws);
  block_backward(block, p.x, p.dy, ws, g2, dx, {}, bws);
  EXPECT_LT((g2.experts.stacked_in() - 2 * g1.experts.stacked_in()).cwiseAbs().maxCoeff(), 1e-14);
  EXPECT_LT((g2.router - 2 * g1.router).cwiseAbs().maxCoeff(), 1e-14);
  EXPECT_LT((g2.shared_gate - 2 * g1.shared_gate).cwiseAbs().maxCoeff(), 1e-14);
  g2.set_zero();
  EXPECT_EQ(g2.max_abs(), 0.0);
}

TEST(Backward, ThreadPoolGivesTheSameGradients) {
  auto p = make_problem<gating::SoftmaxTopK>(7, 40, 8, 6, 8, 2, 5, true);
  SparseMoeBlock<double, gating::SoftmaxTopK> block(p.config, p.w);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(40, 8), dx1(40, 8), dx2(40, 8);
  block.forward(p.x, y, ws);
  auto g1 = MoeGradients<double>::zeros_like(p.w);
  auto g2 = MoeGradients<double>::zeros_like(p.w);
  BackwardWorkspace<double> b1, b2;
  LossCoefficients c;
  c.aux = 0.1;
  block_backward(block, p.x, p.dy, ws, g1, dx1, c, b1);
  ThreadPool pool(3);
  block_backward(block, p.x, p.dy, ws, g2, dx2, c, b2, pool);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(g1.experts.stacked_in(), g2.experts.stacked_in());
  EXPECT_EQ(g1.shared.stacked_out(), g2.shared.stacked_out());
  EXPECT_EQ(g1.router, g2.router);
}

TEST(Backward, FloatAgreesWithDouble) {
  auto p = make_problem<gating::SoftmaxTopK>(8, 12, 8, 6, 4, 2, 4, true);
  SparseMoeBlock<double, gating::SoftmaxTopK> bd(p.config, p.w);
  MoeWeights<float> wf = MoeWeights<float>::zeros(p.config, true);
  wf.router = p.w.router.cast<float>();
  wf.experts.stacked_in() = p.w.experts.stacked_in().cast<float>();
  wf.experts.stacked_out() = p.w.experts.stacked_out().cast<float>();
  wf.shared.stacked_in() = p.w.shared.stacked_in().cast<float>();
  wf.shared.stacked_out() = p.w.shared.stacked_out().cast<float>();
  wf.shared_gate = p.w.shared_gate.cast<float>();
  SparseMoeBlock<float, gating::SoftmaxTopK> bf(p.config, wf);
  Workspace<double> wsd;
  Workspace<float> wsf;
  wsd.set_training(true);
  wsf.set_training(true);
  RowMatrix<double> yd(12, 8), dxd(12, 8);
  RowMatrix<float> yf(12, 8), dxf(12, 8);
  const RowMatrix<float> xf = p.x.cast<float>(), dyf = p.dy.cast<float>();
  bd.forward(p.x, yd, wsd);
  bf.forward(xf, yf, wsf);
  auto gd = MoeGradients<double>::zeros_like(p.w);
  auto gf = MoeGradients<float>::zeros_like(wf);
  LossCoefficients c;
  c.aux = 0.2;
  c.z = 0.1;
  block_backward(bd, p.x, p.dy, wsd, gd, dxd, c);
  block_backward(bf, xf, dyf, wsf, gf, dxf, c);
  EXPECT_LT((dxf.cast<double>() - dxd).cwiseAbs().maxCoeff(), 1e-4);
  EXPECT_LT((gf.router.cast<double>() - gd.router).cwiseAbs().maxCoeff(), 1e-4);
  EXPECT_LT(
      (gf.experts.stacked_in().cast<double>() - gd.experts.stacked_in()).cwiseAbs().maxCoeff(),
      1e-4);
}

TEST(Backward, RefusesAnInferenceWorkspace) {
  auto p = make_problem<gating::SoftmaxTopK>(9, 4, 4, 3, 4, 2, 0, false);
  SparseMoeBlock<double, gating::SoftmaxTopK> block(p.config, p.w);
  Workspace<double> ws;
  RowMatrix<double> y(4, 4), dx(4, 4);
  block.forward(p.x, y, ws);
  auto g = MoeGradients<double>::zeros_like(p.w);
  test::expect_error<config_error>(
      [&] { block_backward(block, p.x, p.dy, ws, g, dx); },
      "moe: block_backward needs a workspace filled by forward() in training mode (call "
      "ws.set_training(true) before forward)");
}

TEST(Backward, RefusesMismatchedShapes) {
  auto p = make_problem<gating::SoftmaxTopK>(10, 4, 4, 3, 4, 2, 0, false);
  SparseMoeBlock<double, gating::SoftmaxTopK> block(p.config, p.w);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(4, 4), dx(4, 4);
  block.forward(p.x, y, ws);
  auto g = MoeGradients<double>::zeros_like(p.w);
  std::mt19937_64 rng(1);
  const RowMatrix<double> x5 = random_matrix<double>(5, 4, rng);
  const RowMatrix<double> dy5(5, 4);
  RowMatrix<double> dx5(5, 4);
  test::expect_error<shape_error>(
      [&] { block_backward(block, x5, dy5, ws, g, dx5); },
      "moe: block_backward: the workspace holds the routing of 4 tokens x 4 experts x 2 slots, "
      "expected 5 x 4 x 2 (run forward on the same x and block first)");
  const RowMatrix<double> dy3(4, 3);
  test::expect_error<shape_error>([&] { block_backward(block, p.x, dy3, ws, g, dx); },
                                  "moe: dy has shape [4 x 3], expected [4 x 4]");
  auto bad = MoeGradients<double>::zeros_like(p.w);
  bad.router.resize(3, 4);
  test::expect_error<shape_error>(
      [&] { block_backward(block, p.x, p.dy, ws, bad, dx); },
      "moe: gradient of the router weight has shape [3 x 4], expected [4 x 4]");
}

TEST(Backward, RefusesShazeerLossesOnOtherGatings) {
  auto p = make_problem<gating::SoftmaxTopK>(20, 4, 4, 3, 4, 2, 0, false);
  SparseMoeBlock<double, gating::SoftmaxTopK> block(p.config, p.w);
  Workspace<double> ws;
  ws.set_training(true);
  RowMatrix<double> y(4, 4), dx(4, 4);
  block.forward(p.x, y, ws);
  auto g = MoeGradients<double>::zeros_like(p.w);
  LossCoefficients c;
  c.importance = 0.1;
  test::expect_error<config_error>(
      [&] { block_backward(block, p.x, p.dy, ws, g, dx, c); },
      "moe: LossCoefficients::importance and load apply to noisy top-k gating only");
}

}  // namespace
}  // namespace moe
