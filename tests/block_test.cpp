// The sparse block against dense formulations of the same layer, and its input validation.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::expect_error;
using test::random_matrix;
using test::random_weights;

MoeConfig small_config(Index E = 8, Index k = 2) {
  MoeConfig c;
  c.d_model = 16;
  c.d_ff = 24;
  c.num_experts = E;
  c.top_k = k;
  return c;
}

/// One expert of the stack applied to one row, written out directly.
template <class T>
RowMatrix<T> expert_row(const ExpertStack<T>& w, Index e, const RowMatrix<T>& x) {
  RowMatrix<T> g = x * w.gate(e).transpose();
  RowMatrix<T> u = x * w.up(e).transpose();
  RowMatrix<T> a(g.rows(), g.cols());
  for (Index i = 0; i < g.size(); ++i) a.data()[i] = Silu::value(g.data()[i]) * u.data()[i];
  return a * w.w_out(e).transpose();
}

template <class T>
class BlockTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(BlockTyped, Scalars);

// With top_k == num_experts and renormalisation, the block is the full softmax mixture.
TYPED_TEST(BlockTyped, TopKEqualsNumExpertsIsDenseSoftmaxMixture) {
  using T = TypeParam;
  std::mt19937_64 rng(1);
  const MoeConfig c = small_config(5, 5);
  auto w = random_weights<T>(c, rng);
  const RowMatrix<T> x = random_matrix<T>(9, c.d_model, rng);
  RowMatrix<T> expected = RowMatrix<T>::Zero(9, c.d_model);
  for (Index t = 0; t < 9; ++t) {
    RowMatrix<T> xt = x.row(t);
    Vector<T> z = w.router * xt.transpose();
    Vector<T> p = (z.array() - z.maxCoeff()).exp();
    p /= p.sum();
    for (Index e = 0; e < c.num_experts; ++e) expected.row(t) += p(e) * expert_row(w.experts, e, xt);
  }
  SparseMoeBlock<T> block(c, std::move(w));
  Workspace<T> ws;
  RowMatrix<T> y(9, c.d_model);
  block.forward(x, y, ws);
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), tol * (1 + expected.cwiseAbs().maxCoeff()));
}

// With one expert the block is that expert's FFN (the routing weight is exactly 1).
TYPED_TEST(BlockTyped, OneExpertEqualsPlainFfn) {
  using T = TypeParam;
  std::mt19937_64 rng(2);
  const MoeConfig c = small_config(1, 1);
  auto w = random_weights<T>(c, rng);
  const RowMatrix<T> x = random_matrix<T>(7, c.d_model, rng);
  DenseFfn<T> dense(w.experts);
  SparseMoeBlock<T> block(c, std::move(w));
  Workspace<T> ws;
  RowMatrix<T> y(7, c.d_model), y_dense(7, c.d_model);
  block.forward(x, y, ws);
  dense.forward(x, y_dense, ws);
  // Same FFN path (kernel choice depends only on the row count), weight exactly 1: bitwise.
  EXPECT_EQ(y, y_dense);
  EXPECT_EQ(ws.routing().weights().minCoeff(), T(1));
}

TYPED_TEST(BlockTyped, PermutingTokensPermutesOutput) {
  using T = TypeParam;
  std::mt19937_64 rng(3);
  const MoeConfig c = small_config(8, 2);
  SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  const Index n = 31;
  const RowMatrix<T> x = random_matrix<T>(n, c.d_model, rng);
  std::vector<Index> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  RowMatrix<T> xp(n, c.d_model);
  for (Index i = 0; i < n; ++i) xp.row(i) = x.row(perm[static_cast<std::size_t>(i)]);
  Workspace<T> ws;
  RowMatrix<T> y(n, c.d_model), yp(n, c.d_model);
  block.forward(x, y, ws);
  block.forward(xp, yp, ws);
  for (Index i = 0; i < n; ++i) {
    // Each token's output is computed from its own row only, in the same order: bitwise equal.
    EXPECT_EQ(yp.row(i), y.row(perm[static_cast<std::size_t>(i)])) << "row " << i;
  }
}

TYPED_TEST(BlockTyped, ZeroTokensGiveEmptyOutput) {
  using T = TypeParam;
  std::mt19937_64 rng(4);
  const MoeConfig c = small_config();
  SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  Workspace<T> ws;
  RowMatrix<T> x(0, c.d_model), y(0, c.d_model);
  block.forward(x, y, ws);
  EXPECT_EQ(ws.routing().num_tokens(), 0);
  EXPECT_EQ(ws.stats().assignments, 0);
}

// Routing weights: descending, summing to one, and agreeing with the stored logits.
TYPED_TEST(BlockTyped, RoutingIsExposedAndRenormalised) {
  using T = TypeParam;
  std::mt19937_64 rng(5);
  const MoeConfig c = small_config(8, 3);
  auto w = random_weights<T>(c, rng);
  const RowMatrix<T> router = w.router;
  SparseMoeBlock<T> block(c, std::move(w));
  const RowMatrix<T> x = random_matrix<T>(17, c.d_model, rng);
  Workspace<T> ws;
  RowMatrix<T> y(17, c.d_model);
  block.forward(x, y, ws);
  const auto& r = ws.routing();
  const RowMatrix<T> logits = x * router.transpose();
  EXPECT_LT((r.logits() - logits).cwiseAbs().maxCoeff(), 1e-5);
  for (Index t = 0; t < 17; ++t) {
    EXPECT_NEAR(r.weights().row(t).sum(), 1.0, 1e-6);
    for (Index j = 1; j < 3; ++j) EXPECT_GE(r.weights()(t, j - 1), r.weights()(t, j));
  }
  EXPECT_EQ(ws.stats().assignments, 17 * 3);
}

TEST(Block, TiesGoToTheLowerExpertIndex) {
  const MoeConfig c = small_config(6, 2);
  auto w = MoeWeights<double>::zeros(c);  // zero router: all logits equal
  SparseMoeBlock<double> block(c, std::move(w));
  Workspace<double> ws;
  RowMatrix<double> x = RowMatrix<double>::Ones(3, c.d_model), y(3, c.d_model);
  block.forward(x, y, ws);
  for (Index t = 0; t < 3; ++t) {
    EXPECT_EQ(ws.routing().experts()(t, 0), 0);
    EXPECT_EQ(ws.routing().experts()(t, 1), 1);
    EXPECT_DOUBLE_EQ(ws.routing().weights()(t, 0), 0.5);
  }
}

TEST(Block, WrongInputWidthIsRejected) {
  std::mt19937_64 rng(6);
  const MoeConfig c = small_config();
  SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  Workspace<float> ws;
  RowMatrix<float> x(5, 15), y(5, 16);
  expect_error<shape_error>([&] { block.forward(x, y, ws); },
                            "moe: x has shape [5 x 15], expected [5 x 16]");
  RowMatrix<float> x2(5, 16), y2(4, 16);
  expect_error<shape_error>([&] { block.forward(x2, y2, ws); },
                            "moe: y has shape [4 x 16], expected [5 x 16]");
}

TEST(Block, WeightShapesMustAgreeWithConfig) {
  std::mt19937_64 rng(7);
  const MoeConfig c = small_config();
  auto w = random_weights<float>(c, rng);
  w.router = RowMatrix<float>::Zero(7, 16);
  expect_error<shape_error>([&] { SparseMoeBlock<float>(c, std::move(w)); },
                            "moe: router weight has shape [7 x 16], expected [8 x 16]");
  MoeConfig bigger = c;
  bigger.d_ff = 32;
  expect_error<shape_error>(
      [&] { SparseMoeBlock<float>(bigger, random_weights<float>(c, rng)); },
      "moe: routed experts hold 8 experts of d_model 16, d_ff 24 (gated), expected 8 experts of "
      "d_model 16, d_ff 32 (gated)");
  ExpertStack<float> stack(2, 16, 24, true);
  expect_error<shape_error>(
      [&] {
        stack.set_gated(1, RowMatrix<float>::Zero(24, 16), RowMatrix<float>::Zero(24, 15),
                        RowMatrix<float>::Zero(16, 24));
      },
      "moe: expert 1 up weight has shape [24 x 15], expected [24 x 16]");
}

// Documented behaviour: a non-finite input row poisons only its own output row.
TEST(Block, NonFiniteInputStaysInItsRow) {
  std::mt19937_64 rng(8);
  const MoeConfig c = small_config();
  SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  RowMatrix<float> x = random_matrix<float>(6, c.d_model, rng);
  Workspace<float> ws;
  RowMatrix<float> clean(6, c.d_model), y(6, c.d_model);
  block.forward(x, clean, ws);
  x(2, 3) = std::numeric_limits<float>::quiet_NaN();
  x(4, 0) = std::numeric_limits<float>::infinity();
  block.forward(x, y, ws);
  for (Index t : {0, 1, 3, 5}) EXPECT_EQ(y.row(t), clean.row(t)) << "token " << t;
  EXPECT_FALSE(y.row(2).allFinite());
  EXPECT_FALSE(y.row(4).allFinite());
  const auto experts = ws.routing().experts();
  EXPECT_GE(experts.minCoeff(), 0);
  EXPECT_LT(experts.maxCoeff(), c.num_experts);
}

TEST(Block, WorkspaceIsReusedAcrossBatchSizes) {
  std::mt19937_64 rng(9);
  const MoeConfig c = small_config();
  SparseMoeBlock<double> block(c, random_weights<double>(c, rng));
  Workspace<double> ws, fresh;
  for (Index n : {1, 64, 7, 129, 3}) {
    const RowMatrix<double> x = random_matrix<double>(n, c.d_model, rng);
    RowMatrix<double> y(n, c.d_model), y_fresh(n, c.d_model);
    block.forward(x, y, ws);
    Workspace<double> one_shot;
    block.forward(x, y_fresh, one_shot);
    EXPECT_EQ(y, y_fresh) << n << " tokens";
  }
}

// The allocating first-use overload is the workspace overload on a fresh workspace, bitwise; the
// float defaults (Mixtral gating, SwiGLU, native storage) need no template argument but T.
TEST(Block, AllocatingForwardEqualsWorkspaceForward) {
  std::mt19937_64 rng(10);
  const MoeConfig c = small_config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  static_assert(std::is_same_v<SparseMoeBlock<float>::GatingPolicy, gating::Mixtral>);
  static_assert(std::is_same_v<SparseMoeBlock<float>::FfnKind, SwiGLU>);
  static_assert(std::is_same_v<SparseMoeBlock<float>::ExpertStorage, NativeExperts>);
  for (Index n : {1, 7, 31, 129}) {
    const RowMatrix<float> x = random_matrix<float>(n, c.d_model, rng);
    const RowMatrix<float> y = block.forward(x);
    RowMatrix<float> expected(n, c.d_model);
    Workspace<float> ws;
    block.forward(x, expected, ws);
    ASSERT_EQ(y.rows(), n);
    EXPECT_EQ(y, expected) << n << " tokens";
  }
  const RowMatrix<float> wrong = random_matrix<float>(3, c.d_model + 1, rng);
  expect_error<shape_error>([&] { (void)block.forward(wrong); },
                            "moe: x has shape [3 x 17], expected [3 x 16]");
}

// y may be a block of rows of a larger row-major matrix (an Eigen expression, not only a Ref).
TEST(Block, OutputMayBeABlockOfRows) {
  std::mt19937_64 rng(11);
  const MoeConfig c = small_config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  const RowMatrix<float> x = random_matrix<float>(5, c.d_model, rng);
  RowMatrix<float> big = RowMatrix<float>::Zero(9, c.d_model);
  Workspace<float> ws;
  block.forward(x, big.middleRows(2, 5), ws);
  EXPECT_EQ(RowMatrix<float>(big.middleRows(2, 5)), block.forward(x));
  EXPECT_EQ(big.topRows(2).cwiseAbs().maxCoeff(), 0.0f);
}

TEST(Config, InvalidSizesAreRejected) {
  MoeConfig c = small_config();
  c.top_k = 0;
  expect_error<config_error>([&] { c.validate(); }, "moe: top_k = 0 must be positive");
  c.top_k = 9;
  expect_error<config_error>([&] { c.validate(); }, "moe: top_k = 9 exceeds num_experts = 8");
  c = small_config();
  c.d_model = 0;
  expect_error<config_error>([&] { c.validate(); }, "moe: d_model = 0 must be positive");
  c = small_config();
  c.d_ff = 0;
  expect_error<config_error>([&] { c.validate(); }, "moe: d_ff = 0 must be positive");
  c = small_config();
  c.num_experts = 0;
  expect_error<config_error>([&] { c.validate(); }, "moe: num_experts = 0 must be positive");
  c = small_config();
  c.shared_expert_gate = true;
  expect_error<config_error>([&] { c.validate(); },
                             "moe: shared_expert_gate is set but shared_d_ff = 0 (no shared expert)");
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// Expert choice leaves some tokens with no expert at all: counted as unrouted, not dropped.
TEST(RoutingStats, CountsTokensNoExpertChose) {
  std::mt19937_64 rng(10);
  MoeConfig c = small_config(4, 1);
  gating::ExpertChoice::Options o;
  o.capacity_factor = 0.5;  // c = ceil(0.5 * 16 / 4) = 2 tokens per expert: at most 8 of 16 routed
  SparseMoeBlock<double, gating::ExpertChoice> block(c, test::random_weights<double>(c, rng), o);
  const RowMatrix<double> x = test::random_matrix<double>(16, c.d_model, rng);
  RowMatrix<double> y(16, c.d_model);
  Workspace<double> ws;
  block.forward(x, y, ws);
  Index none = 0;
  for (Index t = 0; t < 16; ++t) {
    if ((ws.routing().kept().row(t).array() == 0).all()) {
      ++none;
      EXPECT_EQ(y.row(t).cwiseAbs().maxCoeff(), 0.0) << "token " << t;
    }
  }
  EXPECT_GE(none, 8);
  EXPECT_EQ(ws.stats().unrouted_tokens, none);
  EXPECT_EQ(ws.stats().dropped_tokens, 0);
  EXPECT_EQ(ws.stats().assignments, 8);
}

}  // namespace
}  // namespace moe
