// The router-free pieces an expert-parallel block reuses (moe/dispatch.hpp gather_rows and
// combine_expert_outputs, moe/experts/grouped.hpp run_grouped_experts): composed by hand on the
// block's own dispatch plan they give the block's output bit for bit, for fp32 and compact
// storage, serially and on a pool.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

MoeConfig grouped_config() {
  MoeConfig c;
  c.d_model = 72;
  c.d_ff = 200;
  c.num_experts = 7;
  c.top_k = 2;
  return c;
}

template <class Block>
void expect_pieces_equal_block(const Block& block, Index tokens, const Executor& executor,
                               std::mt19937_64& rng) {
  using Ffn = typename Block::FfnKind;
  const MoeConfig& c = block.config();
  const Index d = c.d_model;
  const RowMatrix<float> x = test::random_matrix<float>(tokens, d, rng);
  RowMatrix<float> expected(tokens, d);
  Workspace<float> ws;
  block.forward(x, expected, ws);

  const DispatchPlan& plan = ws.plan();
  const Index N = plan.num_rows, in = block.experts().in_rows();
  std::vector<float> x_rows(std::size_t(N * d)), hidden(std::size_t(N * in)),
      y_rows(std::size_t(N * d));
  gather_rows<float>(x, plan, x_rows.data());
  Index max_rows = 0;
  for (Index e = 0; e < c.num_experts; ++e) max_rows = std::max(max_rows, plan.counts[e]);
  const Index stride = decode_scratch_floats(block.experts(), max_rows);
  std::vector<float> scratch(std::size_t(stride * executor.num_workers()));
  GroupedRows<float> rows;
  rows.x = x_rows.data();
  rows.offsets = plan.offsets.data();
  rows.counts = plan.counts.data();
  rows.hidden = hidden.data();
  rows.act = hidden.data();
  rows.ld_act = in;
  rows.y = y_rows.data();
  rows.scratch = stride > 0 ? scratch.data() : nullptr;
  rows.scratch_stride = stride;
  // Fast compact stacks (bf16 here) read their rows converted once: N rows of x, N of activations.
  std::vector<unsigned char> prepared(std::size_t(prepared_bytes(block.experts(), N)));
  rows.prepared = prepared.empty() ? nullptr : prepared.data();
  std::vector<Index> task_begin(std::size_t(c.num_experts + 1));
  run_grouped_experts<Ffn>(block.experts(), rows, task_begin.data(), executor);
  RowMatrix<float> y(tokens, d);
  combine_expert_outputs<float, float>(plan, ws.routing().weights(), y_rows.data(), nullptr,
                                       nullptr, y, executor);
  EXPECT_EQ(y, expected) << tokens << " tokens, " << executor.num_workers() << " workers";
}

TEST(GroupedExperts, GatherExpertsCombineIsTheBlock) {
  std::mt19937_64 rng(21);
  const MoeConfig c = grouped_config();
  const auto w = test::random_weights<float>(c, rng);
  const SparseMoeBlock<float> native(c, w);
  const SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<Bf16>> bf16(c, w);
  const SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<Fp8E4M3>> fp8(c, w);
  const auto w_plain = test::random_weights<float>(c, rng, /*gated=*/false);
  const SparseMoeBlock<float, gating::Mixtral, ReluMlp, CompactExperts<Int8>> int8(c, w_plain);
  ThreadPool pool(2);
  for (Index tokens : {1, 7, 31, 129}) {
    for (const Executor* ex : {&serial_executor(), static_cast<const Executor*>(&pool)}) {
      expect_pieces_equal_block(native, tokens, *ex, rng);
      expect_pieces_equal_block(bf16, tokens, *ex, rng);
      expect_pieces_equal_block(fp8, tokens, *ex, rng);
      expect_pieces_equal_block(int8, tokens, *ex, rng);
    }
  }
}

}  // namespace
}  // namespace moe
