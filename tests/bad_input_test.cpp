// Bad and extreme input: every row of the table in docs/reliability.md ("Bad input") is one test
// here (or a compile-fail test in tests/compile_fail/), with the message pinned where there is one.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::expect_error;
using test::random_matrix;
using test::random_weights;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

MoeConfig config(Index E = 8, Index k = 2) {
  MoeConfig c;
  c.d_model = 16;
  c.d_ff = 24;
  c.num_experts = E;
  c.top_k = k;
  return c;
}

template <class T>
void expect_indices_in_range(const Workspace<T>& ws, Index E) {
  const auto experts = ws.routing().experts();
  if (experts.size() == 0) return;
  EXPECT_GE(experts.minCoeff(), 0);
  EXPECT_LT(experts.maxCoeff(), E);
}

// ---- empty batch ------------------------------------------------------------------------------

TEST(BadInput, EmptyBatchGivesEmptyOutputAndEmptyRouting) {
  std::mt19937_64 rng(31);
  MoeConfig c = config();
  c.shared_d_ff = 8;
  c.shared_expert_gate = true;
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  const ThreadPool pool(2);
  Workspace<float> ws;
  RowMatrix<float> x(0, c.d_model), y(0, c.d_model);
  block.forward(x, y, ws, pool);
  EXPECT_EQ(ws.routing().num_tokens(), 0);
  EXPECT_EQ(ws.routing().experts().size(), 0);
  EXPECT_EQ(ws.plan().num_rows, 0);
  EXPECT_EQ(ws.stats().assignments, 0);
  EXPECT_EQ(ws.stats().dead_experts, c.num_experts);
  // An empty batch after a full one leaves nothing of the previous call visible.
  const RowMatrix<float> full = random_matrix<float>(5, c.d_model, rng);
  RowMatrix<float> y_full(5, c.d_model);
  block.forward(full, y_full, ws);
  block.forward(x, y, ws);
  EXPECT_EQ(ws.routing().num_tokens(), 0);
  EXPECT_EQ(ws.stats().assignments, 0);
}

TEST(BadInput, EmptyBatchWithWrongWidthIsStillRejected) {
  std::mt19937_64 rng(32);
  const MoeConfig c = config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  Workspace<float> ws;
  RowMatrix<float> x(0, 15), y(0, 16);
  expect_error<shape_error>([&] { block.forward(x, y, ws); },
                            "moe: x has shape [0 x 15], expected [0 x 16]");
}

// ---- wrong shapes ----------------------------------------------------------------------------

TEST(BadInput, WrongShapesAreRejectedBeforeAnyWork) {
  std::mt19937_64 rng(33);
  const MoeConfig c = config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  Workspace<float> ws;
  const RowMatrix<float> x = random_matrix<float>(5, 16, rng);
  RowMatrix<float> y(5, 16);
  block.forward(x, y, ws);  // a valid call first: the routing of the failed calls must not change
  const RowMatrix<float> routed_logits = ws.routing().logits();
  RowMatrix<float> wide(5, 17), y_short(4, 16), y_narrow(5, 15);
  expect_error<shape_error>([&] { block.forward(wide, y, ws); },
                            "moe: x has shape [5 x 17], expected [5 x 16]");
  expect_error<shape_error>([&] { block.forward(x, y_short, ws); },
                            "moe: y has shape [4 x 16], expected [5 x 16]");
  expect_error<shape_error>([&] { block.forward(x, y_narrow, ws); },
                            "moe: y has shape [5 x 15], expected [5 x 16]");
  EXPECT_EQ(ws.routing().logits(), routed_logits);
}

TEST(BadInput, WeightShapesAreRejectedAtConstruction) {
  std::mt19937_64 rng(34);
  const MoeConfig c = config();
  auto w = random_weights<float>(c, rng);
  w.router = RowMatrix<float>::Zero(8, 15);
  expect_error<shape_error>([&] { SparseMoeBlock<float>(c, std::move(w)); },
                            "moe: router weight has shape [8 x 15], expected [8 x 16]");
  MoeConfig shared = c;
  shared.shared_d_ff = 8;
  expect_error<shape_error>(
      [&] { SparseMoeBlock<float>(shared, random_weights<float>(c, rng)); },
      "moe: shared experts hold 0 experts of d_model 0, d_ff 0 (gated), expected 1 experts of "
      "d_model 16, d_ff 8 (gated)");
  // Plain (ReluMlp) weights handed to a gated (SwiGLU) block.
  expect_error<shape_error>(
      [&] { SparseMoeBlock<float>(c, random_weights<float>(c, rng, /*gated=*/false)); },
      "moe: routed experts hold 8 experts of d_model 16, d_ff 24 (plain), expected 8 experts of "
      "d_model 16, d_ff 24 (gated)");
}

// A strided view (columns of a wider matrix) and a row-vector expression are accepted without a
// copy and give the same result as a compact matrix. Column-major input does not compile: see
// tests/compile_fail/ (ctest: compile_fail_col_major_x, compile_fail_wrong_scalar).
TEST(BadInput, StridedAndRowVectorInputsAreAccepted) {
  std::mt19937_64 rng(35);
  const MoeConfig c = config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  Workspace<float> ws;
  const RowMatrix<float> wide = random_matrix<float>(6, 40, rng);
  const RowMatrix<float> compact = wide.middleCols(3, c.d_model);
  RowMatrix<float> y(6, c.d_model), y_strided(6, c.d_model);
  block.forward(compact, y, ws);
  block.forward(wide.middleCols(3, c.d_model), y_strided, ws);
  EXPECT_EQ(y, y_strided);
  const Eigen::Matrix<float, 1, Eigen::Dynamic> token = compact.row(2);
  RowMatrix<float> y_token(1, c.d_model);
  block.forward(token, y_token, ws);
  RowMatrix<float> y_one(1, c.d_model);
  const RowMatrix<float> one = compact.row(2);
  block.forward(one, y_one, ws);
  EXPECT_EQ(y_token, y_one);
}

// ---- non-finite values -----------------------------------------------------------------------

template <class T>
class BadInputTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(BadInputTyped, Scalars);

// NaN, +Inf or -Inf in a token's input: that token's output is non-finite; every other token's
// routing and output are bitwise unchanged; every expert index stays in [0, E).
TYPED_TEST(BadInputTyped, NonFiniteInputPoisonsOnlyItsToken) {
  using T = TypeParam;
  std::mt19937_64 rng(36);
  const MoeConfig c = config();
  const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  const ThreadPool pool(3);
  RowMatrix<T> x = random_matrix<T>(40, c.d_model, rng);
  RowMatrix<T> clean(40, c.d_model), y(40, c.d_model);
  Workspace<T> ws;
  block.forward(x, clean, ws, pool);
  const auto clean_experts = ws.routing().experts().eval();
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  x(3, 0) = nan;
  x(11, 7) = inf;
  x(12, 15) = -inf;
  x.row(30).setConstant(nan);
  block.forward(x, y, ws, pool);
  expect_indices_in_range(ws, c.num_experts);
  for (Index t = 0; t < 40; ++t) {
    if (t == 3 || t == 11 || t == 12 || t == 30) {
      EXPECT_FALSE(y.row(t).allFinite()) << "token " << t;
    } else {
      EXPECT_EQ(y.row(t), clean.row(t)) << "token " << t;
      EXPECT_EQ(ws.routing().experts().row(t), clean_experts.row(t)) << "token " << t;
    }
  }
}

// NaN in the router weights would make every token's routing NaN: refused at construction.
TEST(BadInput, NaNInRouterWeightsIsRejected) {
  std::mt19937_64 rng(37);
  const MoeConfig c = config();
  auto w = random_weights<float>(c, rng);
  w.router(5, 9) = kNaN;
  test::expect_error<value_error>([&] { SparseMoeBlock<float>(c, std::move(w)); },
                                  "moe: router weight has non-finite values");
}

// NaN in one expert's weights: only the tokens routed to that expert are non-finite.
TEST(BadInput, NaNInOneExpertPoisonsOnlyItsTokens) {
  std::mt19937_64 rng(38);
  const MoeConfig c = config();
  auto w = random_weights<float>(c, rng);
  w.experts.w_out(4)(0, 0) = kNaN;
  const SparseMoeBlock<float> block(c, std::move(w));
  const RowMatrix<float> x = random_matrix<float>(64, c.d_model, rng);
  RowMatrix<float> y(64, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  int poisoned = 0;
  for (Index t = 0; t < 64; ++t) {
    const auto e = ws.routing().experts().row(t);
    const bool uses_4 = e(0) == 4 || e(1) == 4;
    poisoned += uses_4;
    EXPECT_EQ(y.row(t).allFinite(), !uses_4) << "token " << t;
  }
  EXPECT_GT(poisoned, 0);
}

// ---- routing edge cases ----------------------------------------------------------------------

// All-equal logits (zero router): ties go to the lower expert index, equal weights 1/k.
TEST(BadInput, AllEqualLogitsTieToTheLowerIndex) {
  const MoeConfig c = config(6, 3);
  const SparseMoeBlock<float> block(c, MoeWeights<float>::zeros(c));
  std::mt19937_64 rng(39);
  const RowMatrix<float> x = random_matrix<float>(4, c.d_model, rng);
  RowMatrix<float> y(4, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  for (Index t = 0; t < 4; ++t) {
    for (Index j = 0; j < 3; ++j) {
      EXPECT_EQ(ws.routing().experts()(t, j), j);
      EXPECT_FLOAT_EQ(ws.routing().weights()(t, j), 1.0f / 3);
    }
  }
  EXPECT_EQ(ws.stats().dead_experts, 3);
}

// k = E: every token visits every expert once, slots in descending weight, weights sum to 1.
TEST(BadInput, TopKEqualToNumExpertsRoutesEveryTokenEverywhere) {
  std::mt19937_64 rng(40);
  const MoeConfig c = config(5, 5);
  const SparseMoeBlock<double> block(c, random_weights<double>(c, rng));
  const RowMatrix<double> x = random_matrix<double>(13, c.d_model, rng);
  RowMatrix<double> y(13, c.d_model);
  Workspace<double> ws;
  block.forward(x, y, ws);
  for (Index e = 0; e < 5; ++e) EXPECT_EQ(ws.plan().counts[static_cast<std::size_t>(e)], 13);
  for (Index t = 0; t < 13; ++t) {
    auto experts = ws.routing().experts().row(t).eval();
    std::sort(experts.data(), experts.data() + 5);
    for (Index e = 0; e < 5; ++e) EXPECT_EQ(experts(e), e);
    EXPECT_NEAR(ws.routing().weights().row(t).sum(), 1.0, 1e-12);
    for (Index j = 1; j < 5; ++j) EXPECT_GE(ws.routing().weights()(t, j - 1), ws.routing().weights()(t, j));
  }
  EXPECT_TRUE(y.allFinite());
}

// E = 1 (k = 1) and T = 1: weight exactly 1, the output is the plain FFN, bitwise.
TEST(BadInput, OneExpertAndOneToken) {
  std::mt19937_64 rng(41);
  const MoeConfig c = config(1, 1);
  auto w = random_weights<float>(c, rng);
  const DenseFfn<float> dense(w.experts);
  const SparseMoeBlock<float> block(c, std::move(w));
  const RowMatrix<float> x = random_matrix<float>(1, c.d_model, rng);
  RowMatrix<float> y(1, c.d_model), y_dense(1, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  dense.forward(x, y_dense, ws);
  EXPECT_EQ(y, y_dense);
  EXPECT_EQ(ws.routing().experts()(0, 0), 0);
  EXPECT_EQ(ws.routing().weights()(0, 0), 1.0f);
  EXPECT_EQ(ws.stats().assignments, 1);
}

// T = 1 with many experts: the token alone equals its row in a batch up to rounding (the
// batch-invariance section of docs/reliability.md says when the bits differ).
TEST(BadInput, OneTokenMatchesItsRowInABatch) {
  std::mt19937_64 rng(42);
  const MoeConfig c = config(8, 2);
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  const RowMatrix<float> x = random_matrix<float>(20, c.d_model, rng);
  RowMatrix<float> y(20, c.d_model), y1(1, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  const auto experts = ws.routing().experts().eval();
  for (Index t = 0; t < 20; ++t) {
    const RowMatrix<float> xt = x.row(t);
    block.forward(xt, y1, ws);
    EXPECT_EQ(ws.routing().experts().row(0), experts.row(t));
    EXPECT_LT((y1 - y.row(t)).cwiseAbs().maxCoeff(), 1e-5f * (1 + y.row(t).cwiseAbs().maxCoeff()));
  }
}

// Logits near the float limits: router weights scaled by 1e30 give logits of order 1e30 (finite in
// float); softmax subtracts the maximum first, so nothing overflows: one-hot scores, finite output.
TEST(BadInput, HugeLogitsDoNotOverflowSoftmax) {
  std::mt19937_64 rng(43);
  const MoeConfig c = config(8, 2);
  auto w = random_weights<float>(c, rng);
  w.router *= 1e30f;
  const SparseMoeBlock<float> block(c, std::move(w));
  const RowMatrix<float> x = random_matrix<float>(16, c.d_model, rng);
  RowMatrix<float> y(16, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  const auto& r = ws.routing();
  EXPECT_TRUE(r.logits().allFinite());
  EXPECT_GT(r.logits().cwiseAbs().maxCoeff(), 1e29f);
  EXPECT_TRUE(r.scores().allFinite());
  EXPECT_TRUE(r.weights().allFinite());
  EXPECT_TRUE(y.allFinite());
  for (Index t = 0; t < 16; ++t) {
    EXPECT_EQ(r.weights()(t, 0), 1.0f);  // the gap between logits is ~1e30: exp underflows to 0
    EXPECT_EQ(r.weights()(t, 1), 0.0f);
  }
}

// Logits at +-FLT_MAX and -inf: still finite scores (-inf gets weight 0). A logit that overflows
// to +inf makes the softmax inf - inf = NaN for that token only (as PyTorch's softmax does).
TEST(BadInput, InfiniteLogitsStayInTheirToken) {
  const MoeConfig c = config(4, 2);
  auto w = MoeWeights<float>::zeros(c);
  const float big = std::numeric_limits<float>::max();
  w.router(0, 0) = big;   // logit = big * x0
  w.router(1, 1) = -big;  // logit = -big * x1
  w.router(2, 2) = 1;
  const SparseMoeBlock<float> block(c, std::move(w));
  RowMatrix<float> x = RowMatrix<float>::Zero(3, c.d_model);
  x(0, 0) = 1;                 // logits [FLT_MAX, 0, 0, 0]
  x(0, 1) = 1;                 //        [FLT_MAX, -FLT_MAX, 0, 0]
  x(1, 1) = 4;                 // logit 1 = -4 FLT_MAX = -inf: [0, -inf, 0, 0]
  x(2, 0) = 4;                 // logit 0 = +inf: NaN scores for token 2
  RowMatrix<float> y(3, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  const auto& r = ws.routing();
  expect_indices_in_range(ws, c.num_experts);
  EXPECT_TRUE(r.scores().row(0).allFinite());
  EXPECT_EQ(r.experts()(0, 0), 0);
  EXPECT_EQ(r.weights()(0, 0), 1.0f);
  EXPECT_EQ(r.logits()(1, 1), -kInf);
  EXPECT_EQ(r.scores()(1, 1), 0.0f);
  EXPECT_TRUE(r.weights().row(1).allFinite());
  EXPECT_FALSE(r.scores().row(2).allFinite());
  EXPECT_TRUE(y.row(0).allFinite());
  EXPECT_TRUE(y.row(1).allFinite());
  EXPECT_FALSE(y.row(2).allFinite());
}

// ---- capacity (Switch / GShard) ---------------------------------------------------------------

using Switch = SparseMoeBlock<float, gating::CapacityTopK, ReluMlp>;

TEST(BadInput, CapacityZeroIsRejected) {
  std::mt19937_64 rng(44);
  const MoeConfig c = config(4, 1);
  expect_error<config_error>(
      [&] {
        Switch(c, random_weights<float>(c, rng, false),
               gating::CapacityTopK::Options::switch_transformers(0));
      },
      "moe: expert_capacity = 0 must be positive");
  auto gshard = gating::CapacityTopK::Options::gshard(0.0);
  expect_error<config_error>([&] { Switch(c, random_weights<float>(c, rng, false), gshard); },
                             "moe: capacity_factor = 0 must be positive");
  gshard.capacity_factor = std::numeric_limits<double>::infinity();
  expect_error<config_error>([&] { Switch(c, random_weights<float>(c, rng, false), gshard); },
                             "moe: capacity_factor = inf must be finite");
}

// A capacity above T is clamped to T: nothing is dropped, the result is the dropless one, bitwise.
TEST(BadInput, CapacityAboveTokenCountDropsNothing) {
  std::mt19937_64 rng(45);
  const MoeConfig c = config(4, 1);
  const auto w = random_weights<float>(c, rng, false);
  const Switch capped(c, w, gating::CapacityTopK::Options::switch_transformers(1000));
  const Switch dropless(c, w, gating::CapacityTopK::Options::dropless());
  const RowMatrix<float> x = random_matrix<float>(30, c.d_model, rng);
  RowMatrix<float> y(30, c.d_model), y_free(30, c.d_model);
  Workspace<float> ws;
  capped.forward(x, y, ws);
  EXPECT_EQ(ws.stats().dropped, 0);
  dropless.forward(x, y_free, ws);
  EXPECT_EQ(y, y_free);
}

// Capacity 1 with every token preferring one expert: the first token is kept, the others are
// dropped (kept = 0, zero output row); a NaN token still takes a place in the priority order.
TEST(BadInput, CapacityOneKeepsTheFirstTokenAndNaNTokensTakeAPlace) {
  const MoeConfig c = config(4, 1);
  std::mt19937_64 rng(46);
  auto w = random_weights<float>(c, rng, false);
  w.router.setZero();  // all logits equal: every token's first choice is expert 0
  const Switch block(c, std::move(w), gating::CapacityTopK::Options::switch_transformers(1));
  RowMatrix<float> x = random_matrix<float>(5, c.d_model, rng);
  RowMatrix<float> y(5, c.d_model);
  Workspace<float> ws;
  block.forward(x, y, ws);
  EXPECT_EQ(ws.routing().kept()(0, 0), 1);
  for (Index t = 1; t < 5; ++t) {
    EXPECT_EQ(ws.routing().kept()(t, 0), 0) << "token " << t;
    EXPECT_EQ(y.row(t), RowMatrix<float>::Zero(1, c.d_model)) << "token " << t;
  }
  EXPECT_EQ(ws.stats().dropped, 4);
  // Token 0 NaN: it is first in the priority order and takes expert 0's only place.
  x(0, 0) = kNaN;
  block.forward(x, y, ws);
  expect_indices_in_range(ws, c.num_experts);
  EXPECT_EQ(ws.routing().kept()(0, 0), 1);
  EXPECT_FALSE(y.row(0).allFinite());
  for (Index t = 1; t < 5; ++t) EXPECT_EQ(ws.routing().kept()(t, 0), 0) << "token " << t;
}

}  // namespace
}  // namespace moe
