// The sparse block with packed routed experts (PackedExperts: weights packed at construction,
// activation fused into the packed GEMM's epilogue) against the fp32 block: same outputs within
// fp32 rounding over decode and prefill token counts, gated and plain FFNs, a shared expert;
// bitwise the same for every executor (tasks sized from the number of workers).
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

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

// Prefill packs each expert's gathered x once per forward (GroupedRows::prepared) and shares it
// across the input phase's column tasks. The block's output equals, bit for bit, the same pieces
// run with no shared packing (rows.prepared = nullptr: every task packs its own copy), on awkward
// sizes (d_model 72 and 7 experts: packed regions padded to whole register tiles per expert),
// serially and on a pool; a reserved workspace does not grow.
TEST(PackedExperts, SharedPackedXEqualsPerTaskPacking) {
  MoeConfig cfg;
  cfg.d_model = 72;
  cfg.d_ff = 200;
  cfg.num_experts = 7;
  cfg.top_k = 2;
  std::mt19937_64 rng(26);
  const SparseMoeBlock<float, gating::Mixtral, SwiGLU, PackedExperts> block(
      cfg, test::random_weights<float>(cfg, rng));
  ThreadPool pool(3);
  for (Index tokens : {Index(7), Index(31), Index(129)}) {
    for (const Executor* ex : {&serial_executor(), static_cast<const Executor*>(&pool)}) {
      const RowMatrix<float> x = test::random_matrix<float>(tokens, cfg.d_model, rng);
      RowMatrix<float> y(tokens, cfg.d_model);
      Workspace<float> ws;
      block.reserve(ws, tokens, ex->num_workers());
      const std::size_t reserved = ws.bytes();
      block.forward(x, y, ws, *ex);
      EXPECT_EQ(ws.bytes(), reserved) << tokens;
      const DispatchPlan& plan = ws.plan();
      const Index N = plan.num_rows, d = cfg.d_model, in = block.experts().in_rows();
      EXPECT_EQ(prepared_bytes(block.experts(), N) > 0, N > kernels::small_batch_rows);
      std::vector<float> x_rows(std::size_t(N * d)), hidden(std::size_t(N * in)),
          y_rows(std::size_t(N * d));
      gather_rows<float>(x, plan, x_rows.data());
      Index max_rows = 0;
      for (Index e = 0; e < cfg.num_experts; ++e) max_rows = std::max(max_rows, plan.counts[e]);
      const Index stride = decode_scratch_floats(block.experts(), max_rows);
      std::vector<float> scratch(std::size_t(stride * ex->num_workers()));
      GroupedRows<float> rows;
      rows.x = x_rows.data();
      rows.offsets = plan.offsets.data();
      rows.counts = plan.counts.data();
      rows.hidden = hidden.data();
      rows.act = hidden.data();
      rows.ld_act = in;
      rows.y = y_rows.data();
      rows.scratch = scratch.data();
      rows.scratch_stride = stride;
      rows.prepared = nullptr;  // every input-phase task packs x itself
      std::vector<Index> task_begin(std::size_t(cfg.num_experts + 1));
      run_grouped_experts<SwiGLU>(block.experts(), rows, task_begin.data(), *ex);
      RowMatrix<float> want(tokens, d);
      combine_expert_outputs<float, float>(plan, ws.routing().weights(), y_rows.data(), nullptr,
                                           nullptr, want, *ex);
      EXPECT_EQ(std::memcmp(y.data(), want.data(), sizeof(float) * std::size_t(y.size())), 0)
          << tokens << " tokens, " << ex->num_workers() << " workers";
      // Beyond decode every expert reads its x packed once, where the block put it: after the
      // workers' scratch, at the expert's offset.
      if (N <= kernels::small_batch_rows) continue;
      const float* region = moe::detail::WorkspaceAccess::compact_scratch(ws).ensure(0) +
                            ex->num_workers() * stride;
      for (Index e = 0; e < cfg.num_experts; ++e) {
        const Index n = plan.counts[e], begin = plan.offsets[e];
        if (n == 0) continue;
        std::vector<float> packed(std::size_t(kernels::gemm_packed_x_size<float>(n, d)));
        kernels::gemm_packed_pack_x(x_rows.data() + begin * d, n, d, d, packed.data());
        const float* got = region + PackedOperand<float>::xpack_offset(begin, e, d);
        EXPECT_EQ(std::memcmp(got, packed.data(), sizeof(float) * packed.size()), 0) << e;
      }
    }
  }
}

}  // namespace
}  // namespace moe
