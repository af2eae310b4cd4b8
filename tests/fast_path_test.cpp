// The block's fast path (small-batch kernel below kernels::small_batch_rows rows per expert,
// Eigen's GEMM above, (expert, column-block) tasks) against a plain per-token computation in
// double, over awkward sizes and row counts on both sides of the threshold; bitwise equality of
// every executor with the serial one; the workspace contract read by the backward pass.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;
using test::random_weights;

struct Shape {
  Index d_model, d_ff, num_experts, top_k, shared_d_ff;
  bool shared_gate;
};

std::string shape_name(const Shape& s) {
  return "d" + std::to_string(s.d_model) + "_ff" + std::to_string(s.d_ff) + "_E" +
         std::to_string(s.num_experts) + "_k" + std::to_string(s.top_k) + "_s" +
         std::to_string(s.shared_d_ff);
}

MoeConfig make_config(const Shape& s) {
  MoeConfig c;
  c.d_model = s.d_model;
  c.d_ff = s.d_ff;
  c.num_experts = s.num_experts;
  c.top_k = s.top_k;
  c.shared_d_ff = s.shared_d_ff;
  c.shared_expert_gate = s.shared_gate;
  return c;
}

/// One SwiGLU FFN on one row, in double, summing in index order.
template <class T>
std::vector<double> ffn_double(const ExpertStack<T>& w, Index e, const T* x) {
  const Index d = w.d_model(), f = w.d_ff();
  const auto gate = w.gate(e);
  const auto up = w.up(e);
  const auto down = w.w_out(e);
  std::vector<double> a(static_cast<std::size_t>(f)), y(static_cast<std::size_t>(d), 0.0);
  for (Index i = 0; i < f; ++i) {
    double g = 0, u = 0;
    for (Index c = 0; c < d; ++c) {
      g += double(gate(i, c)) * double(x[c]);
      u += double(up(i, c)) * double(x[c]);
    }
    a[static_cast<std::size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (Index o = 0; o < d; ++o) {
    double s = 0;
    for (Index i = 0; i < f; ++i) s += double(down(o, i)) * a[static_cast<std::size_t>(i)];
    y[static_cast<std::size_t>(o)] = s;
  }
  return y;
}

/// The block's output recomputed token by token in double from the routing it chose.
template <class T>
RowMatrix<double> plain_forward(const SparseMoeBlock<T>& block, const RowMatrix<T>& x,
                                const Workspace<T>& ws) {
  const MoeConfig& c = block.config();
  const auto& w = block.weights();
  RowMatrix<double> y = RowMatrix<double>::Zero(x.rows(), c.d_model);
  const auto experts = ws.routing().experts();
  const auto weights = ws.routing().weights();
  const auto kept = ws.routing().kept();
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index j = 0; j < ws.routing().slots(); ++j) {
      if (!kept(t, j)) continue;
      const auto ye = ffn_double(w.experts, experts(t, j), x.row(t).data());
      for (Index o = 0; o < c.d_model; ++o) {
        y(t, o) += double(weights(t, j)) * ye[static_cast<std::size_t>(o)];
      }
    }
    if (c.shared_d_ff > 0) {
      const auto ys = ffn_double(w.shared, 0, x.row(t).data());
      double g = 1.0;
      if (c.shared_expert_gate) {
        double z = 0;
        for (Index o = 0; o < c.d_model; ++o) z += double(x(t, o)) * double(w.shared_gate(0, o));
        g = 1.0 / (1.0 + std::exp(-z));
      }
      for (Index o = 0; o < c.d_model; ++o) y(t, o) += g * ys[static_cast<std::size_t>(o)];
    }
  }
  return y;
}

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

// d_model, d_ff, E, k, shared d_ff, shared gate. Awkward sizes (remainder lanes and tiles); a
// d_model large enough that the streaming path splits d_ff into several ~1 MiB blocks (1024
// floats * 2 rows * 128 columns); one expert with rows long enough that above ~190 rows (float)
// the input projection leaves the streaming kernel for Eigen's GEMM (x beyond stream_x_bytes),
// in several 256-column blocks; and one whose output projection does (d_ff 3200, ~60 rows).
const Shape kShapes[] = {
    {37, 29, 7, 2, 0, false},    {16, 45, 3, 1, 0, false},  {67, 300, 4, 2, 21, true},
    {1024, 300, 4, 2, 0, false}, {40, 24, 2, 1, 33, false}, {1024, 600, 1, 1, 0, false},
    {64, 3200, 1, 1, 0, false},
};
const Index kTokens[] = {1, 3, 8, 17, 40, 129, 250};

template <class T>
class FastPath : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(FastPath, Scalars);

// Rows per expert on both sides of the threshold: 1 to 129 tokens over 2 to 7 experts.
TYPED_TEST(FastPath, MatchesPlainDoubleComputation) {
  using T = TypeParam;
  for (const Shape& s : kShapes) {
    const MoeConfig c = make_config(s);
    std::mt19937_64 rng(11);
    const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
    Workspace<T> ws;
    for (Index n : kTokens) {
      // The double reference is slow beyond that.
      if (n * s.top_k * s.d_model * s.d_ff > Index(200) * 1024 * 1024) continue;
      const RowMatrix<T> x = random_matrix<T>(n, c.d_model, rng);
      RowMatrix<T> y(n, c.d_model);
      block.forward(x, y, ws);
      const RowMatrix<double> expected = plain_forward(block, x, ws);
      const double scale = 1 + expected.cwiseAbs().maxCoeff();
      const double err = (y.template cast<double>() - expected).cwiseAbs().maxCoeff();
      EXPECT_LT(err, tolerance<T>() * scale * std::sqrt(double(c.d_model + c.d_ff)))
          << shape_name(s) << " tokens " << n;
    }
  }
}

// Same tasks for every executor: pools of 1, 2 and 3 workers give the serial result bitwise.
TYPED_TEST(FastPath, EveryExecutorIsBitwiseSerial) {
  using T = TypeParam;
  ThreadPool pool1(1), pool2(2), pool3(3);
  for (const Shape& s : kShapes) {
    const MoeConfig c = make_config(s);
    std::mt19937_64 rng(12);
    const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
    Workspace<T> ws;
    for (Index n : kTokens) {
      const RowMatrix<T> x = random_matrix<T>(n, c.d_model, rng);
      RowMatrix<T> serial(n, c.d_model);
      block.forward(x, serial, ws);
      for (const Executor* ex :
           {static_cast<const Executor*>(&pool1), static_cast<const Executor*>(&pool2),
            static_cast<const Executor*>(&pool3)}) {
        RowMatrix<T> y(n, c.d_model);
        block.forward(x, y, ws, *ex);
        EXPECT_EQ(y, serial) << shape_name(s) << " tokens " << n << " workers "
                             << ex->num_workers();
      }
    }
  }
}

// Training mode keeps the buffers the backward pass reads: x_rows, hidden (pre-activation), act,
// y_rows in plan row order, and the shared expert's buffers; inference gives the same output.
TYPED_TEST(FastPath, TrainingWorkspaceContract) {
  using T = TypeParam;
  const Shape s{67, 300, 4, 2, 21, true};
  const MoeConfig c = make_config(s);
  std::mt19937_64 rng(13);
  const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  ThreadPool pool(2);
  for (Index n : {Index(5), Index(60)}) {
    const RowMatrix<T> x = random_matrix<T>(n, c.d_model, rng);
    Workspace<T> train, infer;
    train.set_training(true);
    RowMatrix<T> y(n, c.d_model), y_infer(n, c.d_model);
    block.forward(x, y, train, pool);
    block.forward(x, y_infer, infer, pool);
    EXPECT_EQ(y, y_infer);
    const DispatchPlan& plan = train.plan();
    const auto& w = block.weights().experts;
    const Index N = plan.num_rows, d = c.d_model, f = c.d_ff, in = 2 * f;
    const ConstMap<T> x_rows(moe::detail::WorkspaceAccess::x_rows(train).data(), N, d);
    const ConstMap<T> hidden(moe::detail::WorkspaceAccess::hidden(train).data(), N, in);
    const ConstMap<T> act(moe::detail::WorkspaceAccess::act(train).data(), N, f);
    const ConstMap<T> y_rows(moe::detail::WorkspaceAccess::y_rows(train).data(), N, d);
    for (Index e = 0; e < c.num_experts; ++e) {
      for (Index r = plan.offsets[std::size_t(e)]; r < plan.offsets[std::size_t(e) + 1]; ++r) {
        EXPECT_EQ(x_rows.row(r), x.row(plan.row_token[std::size_t(r)]));
        const RowMatrix<T> h = x_rows.row(r) * w.w_in(e).transpose();
        EXPECT_LT((hidden.row(r) - h).cwiseAbs().maxCoeff(), 100 * tolerance<T>());
        for (Index i = 0; i < f; ++i) {
          // Vectorised exp: within a few ulps of the scalar formula.
          const T expected = Silu::value(hidden(r, i)) * hidden(r, f + i);
          EXPECT_NEAR(act(r, i), expected,
                      8 * std::numeric_limits<T>::epsilon() *
                          (std::abs(expected) + std::abs(hidden(r, f + i))));
        }
        const RowMatrix<T> yr = act.row(r) * w.w_out(e).transpose();
        EXPECT_LT((y_rows.row(r) - yr).cwiseAbs().maxCoeff(), 100 * tolerance<T>());
      }
    }
    const auto& sw = block.weights().shared;
    const ConstMap<T> s_hidden(moe::detail::WorkspaceAccess::shared_hidden(train).data(), n,
                               2 * s.shared_d_ff);
    const ConstMap<T> s_act(moe::detail::WorkspaceAccess::shared_act(train).data(), n,
                            s.shared_d_ff);
    const ConstMap<T> s_y(moe::detail::WorkspaceAccess::shared_y(train).data(), n, d);
    const RowMatrix<T> sh = x * sw.w_in(0).transpose();
    EXPECT_LT((s_hidden - sh).cwiseAbs().maxCoeff(), 100 * tolerance<T>());
    const RowMatrix<T> sy = s_act * sw.w_out(0).transpose();
    EXPECT_LT((s_y - sy).cwiseAbs().maxCoeff(), 100 * tolerance<T>());
    for (Index t = 0; t < n; ++t) {
      const T z = x.row(t).dot(block.weights().shared_gate.row(0));
      EXPECT_NEAR(moe::detail::WorkspaceAccess::shared_gate(train).data()[t],
                  T(1) / (T(1) + std::exp(-z)), 1e-6);
    }
  }
}

// Batch invariance: a token computed alone (streaming kernel) against the same token inside a
// batch where its experts get enough rows for Eigen's GEMM in both products. Not bitwise
// (different summation orders); the difference is a few float ulps of the output's scale.
TEST(FastPath, BatchInvarianceAcrossTheThreshold) {
  const Shape s{1024, 1024, 2, 1, 0, false};
  const MoeConfig c = make_config(s);
  std::mt19937_64 rng(14);
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng, true));
  const Index n = 512;
  const RowMatrix<float> x = random_matrix<float>(n, c.d_model, rng);
  Workspace<float> ws;
  RowMatrix<float> y(n, c.d_model);
  block.forward(x, y, ws);
  for (Index e = 0; e < c.num_experts; ++e) {
    const Index rows = ws.plan().counts[std::size_t(e)];
    ASSERT_FALSE(use_stream<float>(rows, c.d_model));
    ASSERT_FALSE(use_stream<float>(rows, c.d_ff));
  }
  double max_rel = 0, sum_sq = 0, ref_sq = 0;
  for (Index t = 0; t < 128; ++t) {
    const RowMatrix<float> xt = x.row(t);
    RowMatrix<float> yt(1, c.d_model);
    block.forward(xt, yt, ws);
    const double scale = y.row(t).cwiseAbs().maxCoeff();
    max_rel = std::max(max_rel, double((yt - y.row(t)).cwiseAbs().maxCoeff()) / scale);
    sum_sq += (yt - y.row(t)).template cast<double>().squaredNorm();
    ref_sq += y.row(t).template cast<double>().squaredNorm();
  }
  std::printf(
      "[ batch invariance ] small path vs GEMM path, float: max |diff| / max |y| = %.3g, "
      "NMSE = %.3g\n",
      max_rel, sum_sq / ref_sq);
  EXPECT_LT(max_rel, 1e-5);
}

}  // namespace
}  // namespace moe
