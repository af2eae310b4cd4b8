// Huge batches: index and offset types that cannot overflow, the workspace memory formula, and
// 65,536 tokens through a Mixtral-quarter layer (d_model 1024, d_ff 3584, 8 experts, top-2).
//
// The 65,536-token test needs about 5.5 GB and ~3 TFLOP; it runs only when the environment sets
// MOE_HUGE_TESTS=1 (ctest -L huge does, see tests/CMakeLists.txt; .ci/run runs it in Release).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <type_traits>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;
using test::random_weights;

// ---- index types ------------------------------------------------------------------------------

// Every count, offset and row index is a signed 64-bit Index, and the element offsets computed
// from them (row * d_model, T * k * d_model) are products of Index values: no 32-bit intermediate.
static_assert(std::is_same_v<Index, std::ptrdiff_t> && sizeof(Index) == 8 && std::is_signed_v<Index>);
static_assert(std::is_same_v<Index, Eigen::Index>, "moe::Index must be Eigen's index type");
static_assert(std::is_same_v<decltype(DispatchPlan::num_rows), Index>);
static_assert(std::is_same_v<decltype(DispatchPlan::counts)::value_type, Index>);
static_assert(std::is_same_v<decltype(DispatchPlan::offsets)::value_type, Index>);
static_assert(std::is_same_v<decltype(DispatchPlan::row_token)::value_type, Index>);
static_assert(std::is_same_v<decltype(DispatchPlan::slot_row)::value_type, Index>);
static_assert(std::is_same_v<decltype(MoeConfig::d_model), Index>);
static_assert(std::is_same_v<decltype(MoeConfig::top_k), Index>);
static_assert(std::is_same_v<decltype(std::declval<Routing<float>>().num_tokens()), Index>);
// Expert ids are int32 (an expert count, not a token count, so 32 bits are plenty).
static_assert(std::is_same_v<ConstMap<std::int32_t>::Scalar, std::int32_t>);
// T * k * d_model for 2^20 tokens, top-8, d_model 4096: 2^35, beyond 32 bits, fits.
static_assert(Index(1) << 20 << 3 << 12 == Index(1) << 35);
static_assert(std::numeric_limits<Index>::max() / (Index(1) << 35) > (Index(1) << 20));

TEST(HugeIndexTypes, OffsetsBeyondTwoToThe31AreRepresentable) {
  // The offsets forward computes: r * d_model (gathered rows), t * outerStride (input rows).
  const Index num_rows = Index(1) << 21, d_model = 4096;  // 2^21 * 2^12 = 2^33 elements
  const Index last = (num_rows - 1) * d_model;
  EXPECT_GT(last, Index(std::numeric_limits<std::int32_t>::max()));
  EXPECT_EQ(last / d_model, num_rows - 1);
  EXPECT_EQ(static_cast<std::size_t>(last) + static_cast<std::size_t>(d_model),
            std::size_t(1) << 33);
}

// ---- the workspace memory formula -------------------------------------------------------------

/// The bytes a fresh workspace holds after one forward call (workspace.hpp's comment, made exact):
///   elements of T:    N * (d_model + I + d_model)                       gathered x, hidden, expert y
///                     + with a shared expert: T * (Is + d_model + 1)
///                     + training: N * d_ff + T * shared_d_ff
///   routing (RouteS): T * E * 2 (logits, scores) + T * k (weights); int32 T * k; uint8 T * k
///   plan (Index):     (E + E + 1 + E) + N * 2 + T * k                   counts, offsets, fill,
///                                                                       row_token/slot, slot_row
///   gating scratch:   E Index
template <class T>
std::size_t expected_workspace_bytes(const MoeConfig& c, Index num_tokens, bool gated,
                                     bool training) {
  using RouteS = RouteScalar<T>;
  const Index E = c.num_experts, k = c.top_k, d = c.d_model, N = num_tokens * k;
  const Index I = gated ? 2 * c.d_ff : c.d_ff;
  const Index Is = gated ? 2 * c.shared_d_ff : c.shared_d_ff;
  Index elements = N * (d + I + d);
  if (c.shared_d_ff > 0) elements += num_tokens * (Is + d + 1);
  if (training) elements += N * c.d_ff + num_tokens * c.shared_d_ff;
  std::size_t bytes = static_cast<std::size_t>(elements) * sizeof(T);
  bytes += static_cast<std::size_t>(num_tokens * E * 2 + num_tokens * k) * sizeof(RouteS);
  bytes += static_cast<std::size_t>(num_tokens * k) * (sizeof(std::int32_t) + 1);
  // Dispatch plan (counts, offsets, fill, row_token, row_slot, slot_row) and the task offsets of
  // the fast path: one job per routed expert (+1 for the shared expert), plus one.
  const Index jobs = E + (c.shared_d_ff > 0 ? 1 : 0);
  bytes += static_cast<std::size_t>(3 * E + 1 + 2 * N + num_tokens * k + E + jobs + 1) *
           sizeof(Index);
  return bytes;
}

TEST(HugeWorkspace, BytesMatchTheFormula) {
  std::mt19937_64 rng(51);
  for (bool shared : {false, true}) {
    for (bool training : {false, true}) {
      MoeConfig c;
      c.d_model = 32;
      c.d_ff = 40;
      c.num_experts = 6;
      c.top_k = 2;
      if (shared) {
        c.shared_d_ff = 24;
        c.shared_expert_gate = true;
      }
      const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
      const Index n = 300;
      const RowMatrix<float> x = random_matrix<float>(n, c.d_model, rng);
      RowMatrix<float> y(n, c.d_model);
      Workspace<float> ws;
      ws.set_training(training);
      block.forward(x, y, ws);
      EXPECT_EQ(ws.bytes(), expected_workspace_bytes<float>(c, n, true, training))
          << "shared " << shared << ", training " << training;
      // A smaller batch afterwards allocates nothing (grow-only).
      const std::size_t held = ws.bytes();
      const RowMatrix<float> small = random_matrix<float>(7, c.d_model, rng);
      RowMatrix<float> y_small(7, c.d_model);
      block.forward(small, y_small, ws);
      EXPECT_EQ(ws.bytes(), held);
    }
  }
}

// Growth in small steps: std::vector's geometric growth may leave up to 2x the formula held.
TEST(HugeWorkspace, GrowthInStepsStaysWithinTwiceTheFormula) {
  std::mt19937_64 rng(52);
  MoeConfig c;
  c.d_model = 32;
  c.d_ff = 40;
  c.num_experts = 4;
  c.top_k = 2;
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  Workspace<float> ws;
  std::size_t max_ratio_permille = 0;
  for (Index n = 1; n <= 200; n += 13) {
    const RowMatrix<float> x = random_matrix<float>(n, c.d_model, rng);
    RowMatrix<float> y(n, c.d_model);
    block.forward(x, y, ws);
    const std::size_t formula = expected_workspace_bytes<float>(c, n, true, false);
    EXPECT_GE(ws.bytes(), formula);
    EXPECT_LE(ws.bytes(), 2 * formula) << n << " tokens";
    max_ratio_permille = std::max(max_ratio_permille, ws.bytes() * 1000 / formula);
  }
  RecordProperty("max_bytes_over_formula_permille", std::to_string(max_ratio_permille));
}

// ---- 65,536 tokens, Mixtral-quarter -----------------------------------------------------------

bool huge_tests_enabled() {
  const char* v = std::getenv("MOE_HUGE_TESTS");
  return v != nullptr && std::string(v) == "1";
}

TEST(HugeBatch, MixtralQuarter65536Tokens) {
  if (!huge_tests_enabled()) {
    GTEST_SKIP() << "set MOE_HUGE_TESTS=1 (ctest -L huge): needs ~5.5 GB and ~3 TFLOP";
  }
  MoeConfig c;
  c.d_model = 1024;
  c.d_ff = 3584;
  c.num_experts = 8;
  c.top_k = 2;
  const Index n = 65536;
  std::mt19937_64 rng(53);
  auto w = MoeWeights<float>::zeros(c);
  w.router = random_matrix<float>(c.num_experts, c.d_model, rng, 0.05);
  // Weights of the scale of a trained layer (std ~ 1/sqrt(fan_in)), filled cheaply.
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (Index i = 0; i < w.experts.stacked_in().size(); ++i) {
    w.experts.stacked_in().data()[i] = uniform(rng) * 0.054f;  // ~ sqrt(3 / 1024)
  }
  for (Index i = 0; i < w.experts.stacked_out().size(); ++i) {
    w.experts.stacked_out().data()[i] = uniform(rng) * 0.029f;  // ~ sqrt(3 / 3584)
  }
  const SparseMoeBlock<float> block(c, std::move(w));
  RowMatrix<float> x(n, c.d_model);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = uniform(rng);
  RowMatrix<float> y(n, c.d_model);
  Workspace<float> ws;
  const ThreadPool pool(2);
  const auto start = std::chrono::steady_clock::now();
  block.forward(x, y, ws, pool);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[ MEASURED ] 65536 tokens, Mixtral-quarter, 2 threads: %.1f s, workspace %.3f GiB\n",
              seconds, double(ws.bytes()) / double(1 << 30));
  RecordProperty("seconds", std::to_string(seconds));
  RecordProperty("workspace_bytes", std::to_string(ws.bytes()));

  EXPECT_EQ(ws.stats().assignments, n * c.top_k);
  EXPECT_EQ(ws.plan().offsets[static_cast<std::size_t>(c.num_experts)], n * c.top_k);
  EXPECT_EQ(ws.bytes(), expected_workspace_bytes<float>(c, n, true, false));
  EXPECT_TRUE(y.allFinite());
  // Spot checks across the whole batch (first, last, and rows whose gathered offsets are largest):
  // each token alone gives the same output up to rounding.
  Workspace<float> ws1;
  RowMatrix<float> y1(1, c.d_model);
  for (Index t : {Index(0), Index(1), n / 3, n / 2, n - 2, n - 1}) {
    const RowMatrix<float> xt = x.row(t);
    block.forward(xt, y1, ws1);
    const float scale = 1 + y.row(t).cwiseAbs().maxCoeff();
    EXPECT_LT((y1 - y.row(t)).cwiseAbs().maxCoeff(), 1e-4f * scale) << "token " << t;
  }
}

}  // namespace
}  // namespace moe
