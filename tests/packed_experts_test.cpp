// The sparse block with packed routed experts (PackedExperts: weights packed at construction,
// activation fused into the packed GEMM's epilogue) against the fp32 block: same outputs within
// fp32 rounding over decode and prefill token counts, gated and plain FFNs, a shared expert;
// bitwise the same for every executor (tasks sized from the number of workers).
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

double nmse(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
  const double num = (got.cast<double>() - ref.cast<double>()).squaredNorm();
  const double den = ref.cast<double>().squaredNorm();
  return den > 0 ? num / den : num;
}

template <class Ffn>
void expect_packed_matches_native(const MoeConfig& cfg, unsigned seed) {
  std::mt19937_64 rng(seed);
  const MoeWeights<float> w = test::random_weights<float>(cfg, rng, Ffn::gated);
  const SparseMoeBlock<float, gating::Mixtral, Ffn> native(cfg, w);
  const SparseMoeBlock<float, gating::Mixtral, Ffn, PackedExperts> packed(cfg, w);
  EXPECT_TRUE(packed.weights().experts.empty());
  EXPECT_EQ(packed.experts().num_experts(), cfg.num_experts);
  Workspace<float> ws;
  for (Index tokens : {1, 7, 31, 129, 600}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, cfg.d_model, rng);
    RowMatrix<float> y_native(tokens, cfg.d_model), y_packed(tokens, cfg.d_model);
    native.forward(x, y_native, ws);
    packed.forward(x, y_packed, ws);
    // Both sum the same products in a different order (and Eigen's exp vs the packet exp of the
    // fused SwiGLU agree to an ulp): fp32 rounding, NMSE far below 1e-10.
    EXPECT_LT(nmse(y_packed, y_native), 1e-10) << tokens << " tokens";
    EXPECT_TRUE(y_packed.allFinite());
  }
}

TEST(PackedExperts, SwiGluBlockMatchesNativeBlock) {
  MoeConfig cfg;
  cfg.d_model = 72;
  cfg.d_ff = 100;  // not a multiple of the pair group (16) nor of the panel width
  cfg.num_experts = 7;
  cfg.top_k = 2;
  expect_packed_matches_native<SwiGLU>(cfg, 21);
}

TEST(PackedExperts, GeGluAndPlainBlocksMatchNativeBlocks) {
  MoeConfig cfg;
  cfg.d_model = 33;
  cfg.d_ff = 129;
  cfg.num_experts = 5;
  cfg.top_k = 3;
  expect_packed_matches_native<GeGLU>(cfg, 22);
  expect_packed_matches_native<ReluMlp>(cfg, 23);
}

TEST(PackedExperts, WithSharedExpertMatchesNativeBlock) {
  MoeConfig cfg;
  cfg.d_model = 64;
  cfg.d_ff = 48;
  cfg.num_experts = 6;
  cfg.top_k = 2;
  cfg.shared_d_ff = 96;
  expect_packed_matches_native<SwiGLU>(cfg, 24);
}

// Tasks of the packed experts are sized from the number of workers when an expert is hot; the
// output must not change, bit for bit, with the executor.
TEST(PackedExperts, BitwiseIdenticalForEveryExecutor) {
  MoeConfig cfg;
  cfg.d_model = 256;
  cfg.d_ff = 384;
  cfg.num_experts = 4;
  cfg.top_k = 1;
  std::mt19937_64 rng(25);
  const MoeWeights<float> w = test::random_weights<float>(cfg, rng);
  const SparseMoeBlock<float, gating::Mixtral, SwiGLU, PackedExperts> block(cfg, w);
  ThreadPool pool2(2), pool3(3), pool8(8);
  for (Index tokens : {1, 5, 64, 300}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, cfg.d_model, rng);
    RowMatrix<float> serial(tokens, cfg.d_model);
    Workspace<float> ws;
    block.forward(x, serial, ws);
    const Executor* executors[] = {&pool2, &pool3, &pool8};
    for (const Executor* ex : executors) {
      RowMatrix<float> y(tokens, cfg.d_model);
      Workspace<float> ws_ex;
      block.forward(x, y, ws_ex, *ex);
      EXPECT_EQ(std::memcmp(y.data(), serial.data(), sizeof(float) * std::size_t(y.size())), 0)
          << tokens << " tokens, " << ex->num_workers() << " workers";
    }
  }
}

}  // namespace
}  // namespace moe
