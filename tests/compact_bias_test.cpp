// Compact experts with gpt-oss's expert biases and clamped GLU (issue 14): every compact format,
// fast and exact, against the plain fp32 block on the compact stack's dequantised weights and the
// same biases; Llama 4's input weighting on compact experts; what stays refused.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "test_util.hpp"

namespace moe {
namespace {

using test::nmse;

// gpt-oss's GLU: gate clamped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate).
GluOptions gpt_oss_glu() {
  GluOptions g;
  g.limit = 7.0;
  g.up_offset = 1.0;
  g.alpha = 1.702;
  return g;
}

// Widths that are multiples of 32 (the block-quantised formats) but of no power of two; weights
// of scale 0.5 on inputs of scale 1 give pre-activations of ~5: many beyond the clamp at 7.
MoeConfig biased_config(bool weight_input = false) {
  MoeConfig c;
  c.d_model = 96;
  c.d_ff = 160;
  c.num_experts = 8;
  c.top_k = 2;
  c.expert_glu = gpt_oss_glu();
  c.weight_expert_input = weight_input;
  return c;
}

MoeWeights<float> biased_weights(const MoeConfig& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  MoeWeights<float> w = test::random_weights<float>(c, rng);
  w.experts.stacked_in() = test::random_matrix<float>(w.experts.stacked_in().rows(), c.d_model,
                                                      rng, 0.5);
  w.experts.add_biases();
  w.experts.in_biases() = test::random_matrix<float>(c.num_experts, 2 * c.d_ff, rng, 0.5);
  w.experts.out_biases() = test::random_matrix<float>(c.num_experts, c.d_model, rng, 0.5);
  return w;
}

// w with the routed experts' matrices replaced by a compact stack's dequantised ones (the biases
// stay w's, which the compact stack copied).
template <class Stack>
MoeWeights<float> dequantised(MoeWeights<float> w, const Stack& q) {
  for (Index e = 0; e < q.num_experts(); ++e) {
    w.experts.gate(e) = q.gate(e).dequantize();
    w.experts.up(e) = q.up(e).dequantize();
    w.experts.w_out(e) = q.w_out(e).dequantize();
  }
  return w;
}

// What a compact storage promises against the fp32 block on its dequantised weights.
struct Contract {
  bool bitwise_decode = false;  // bitwise while no expert gets more than small_batch_rows rows
  double bound = 0;             // NMSE bound otherwise (and always, when not bitwise)
};
// Exact products of the block-quantised formats: fp32 activations, the dense kernel's order.
template <class S>
Contract contract_of() {
  using F = typename S::format;
  constexpr bool quant = std::is_same_v<F, Q8> || std::is_same_v<F, Q4> || std::is_same_v<F, Mxfp4>;
  if constexpr (quant && S::mode == CompactMode::exact) return {true, 1e-11};
  // int8 activations per block of 32 (io_stored_quant_test's bound against dequantised weights).
  if constexpr (quant) return {false, 1e-3};
  // bf16 fast: x and the activations rounded to bf16 (quant_block_test's bound, 3e-5).
  if constexpr (std::is_same_v<F, Bf16> && S::mode == CompactMode::fast) return {false, 3e-5};
  // Bf16 exact, Int8, Fp8: fp32 activations, gemm_compact_nt's summation order.
  return {false, 1e-11};
}

template <class S>
class CompactBias : public ::testing::Test {};
using Storages =
    ::testing::Types<CompactExperts<Bf16>, CompactExperts<Bf16, CompactMode::exact>,
                     CompactExperts<Int8>, CompactExperts<Fp8E4M3>, CompactExperts<Q8>,
                     CompactExperts<Q8, CompactMode::exact>, CompactExperts<Q4>,
                     CompactExperts<Q4, CompactMode::exact>, CompactExperts<Mxfp4>,
                     CompactExperts<Mxfp4, CompactMode::exact>>;
struct StorageNames {
  template <class S>
  static std::string GetName(int) {
    return std::string(S::format::name) + (S::mode == CompactMode::exact ? "_exact" : "_fast");
  }
};
TYPED_TEST_SUITE(CompactBias, Storages, StorageNames);

template <class S>
using CompactBlock = SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU, S>;
using RefBlock = SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU>;

template <class Block>
RowMatrix<float> run(const Block& block, const RowMatrix<float>& x, Workspace<float>& ws) {
  RowMatrix<float> y(x.rows(), x.cols());
  block.forward(x, y, ws);
  return y;
}

// The compact block keeps the biases (fp32, in expert_bytes) and applies them and the clamp as
// the fp32 block does: bitwise at decode for the exact quantised products, within the format's
// bound otherwise; Llama 4's input weighting too.
TYPED_TEST(CompactBias, MatchesTheFp32BlockOnTheDequantisedWeights) {
  using S = TypeParam;
  const Contract want = contract_of<S>();
  for (bool weight_input : {false, true}) {
    const MoeConfig c = biased_config(weight_input);
    const MoeWeights<float> w = biased_weights(c, 41);
    const CompactBlock<S> block(c, w);
    const auto& stack = block.experts();
    ASSERT_TRUE(stack.has_biases());
    EXPECT_EQ(stack.in_biases(), w.experts.in_biases());
    EXPECT_EQ(stack.out_biases(), w.experts.out_biases());
    std::size_t matrices = 0;
    for (Index e = 0; e < c.num_experts; ++e) {
      matrices += stack.gate(e).bytes() + stack.up(e).bytes() + stack.w_out(e).bytes();
    }
    EXPECT_EQ(block.expert_bytes(),
              matrices + std::size_t(c.num_experts * (2 * c.d_ff + c.d_model)) * sizeof(float));

    const MoeWeights<float> wd = dequantised(w, stack);
    const RefBlock ref(c, wd);
    // The clamp and the biases matter here: without them the fp32 block's output differs.
    MoeConfig plain = c;
    plain.expert_glu = GluOptions{};
    MoeWeights<float> unbiased = wd;
    unbiased.experts.in_biases().setZero();
    unbiased.experts.out_biases().setZero();
    std::mt19937_64 rng(5);
    for (Index tokens : {Index(1), Index(7), Index(31), Index(129)}) {
      const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
      Workspace<float> ws, ws_ref;
      const RowMatrix<float> y = run(block, x, ws), yr = run(ref, x, ws_ref);
      const auto& counts = ws.plan().counts;
      const Index max_rows = *std::max_element(counts.begin(), counts.begin() + c.num_experts);
      const double e = nmse(y, yr);
      std::printf("[ bias     ] %s weight_input=%d tokens=%lld max_rows=%lld nmse=%.3g\n",
                  StorageNames::GetName<S>(0).c_str(), int(weight_input),
                  static_cast<long long>(tokens), static_cast<long long>(max_rows), e);
      if (want.bitwise_decode && max_rows <= kernels::small_batch_rows) {
        EXPECT_EQ(y, yr) << tokens << " tokens";
      } else {
        EXPECT_LE(e, want.bound) << tokens << " tokens";
      }
      // Bias and clamp per column block: the same bits on a thread pool.
      ThreadPool pool(3);
      Workspace<float> ws_pool;
      RowMatrix<float> y_pool(tokens, c.d_model);
      block.forward(x, y_pool, ws_pool, pool);
      EXPECT_EQ(y_pool, y) << tokens << " tokens on 3 workers";
      if (tokens == 1) continue;
      EXPECT_GT(nmse(run(RefBlock(plain, wd), x, ws_ref), yr), 1e-3);
      EXPECT_GT(nmse(run(RefBlock(c, unbiased), x, ws_ref), yr), 1e-3);
    }
  }
}

// The bitwise check above runs at 1 and 7 tokens in every case, and at 31 when the routing keeps
// every expert at most small_batch_rows rows: pinned here so that it cannot silently not run.
TEST(CompactBiasRouting, ThirtyOneTokensStayInTheDecodeRegime) {
  const MoeConfig c = biased_config();
  const MoeWeights<float> w = biased_weights(c, 41);
  const RefBlock ref(c, w);
  std::mt19937_64 rng(5);
  for (Index tokens : {Index(1), Index(7), Index(31)}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
    Workspace<float> ws;
    run(ref, x, ws);
    const auto& counts = ws.plan().counts;
    EXPECT_LE(*std::max_element(counts.begin(), counts.begin() + c.num_experts),
              kernels::small_batch_rows)
        << tokens;
  }
}

// A compact stack given to the block (as the checkpoint loader does) with biases set afterwards:
// the same output as the block that quantised the fp32 weights with their biases.
TEST(CompactBiasStack, SetBiasesEqualsQuantisingTheBiasedWeights) {
  const MoeConfig c = biased_config();
  const MoeWeights<float> w = biased_weights(c, 43);
  using Block = CompactBlock<CompactExperts<Mxfp4, CompactMode::exact>>;
  const Block quantised(c, w);
  ExpertStack<float> plain_experts = w.experts;
  plain_experts.in_biases().resize(0, 0);
  plain_experts.out_biases().resize(0, 0);
  auto stack = Block::CompactStack::from(plain_experts);
  EXPECT_FALSE(stack.has_biases());
  EXPECT_EQ(stack.in_bias(0), nullptr);
  stack.set_biases(w.experts.in_biases(), w.experts.out_biases());
  MoeWeights<float> others = w;
  others.experts = ExpertStack<float>();
  const Block given(c, others, stack);
  EXPECT_EQ(given.expert_bytes(), quantised.expert_bytes());
  std::mt19937_64 rng(9);
  const RowMatrix<float> x = test::random_matrix<float>(7, c.d_model, rng);
  Workspace<float> ws;
  EXPECT_EQ(run(given, x, ws), run(quantised, x, ws));

  test::expect_error<shape_error>(
      [&] { stack.set_biases(RowMatrix<float>::Zero(8, 160), w.experts.out_biases()); },
      "moe: expert input biases has shape [8 x 160], expected [8 x 320]");
  test::expect_error<shape_error>(
      [&] { stack.set_biases(w.experts.in_biases(), RowMatrix<float>::Zero(7, 96)); },
      "moe: expert output biases has shape [7 x 96], expected [8 x 96]");
}

// Packed experts fuse the plain activation into the input product's epilogue (no bias term, no
// unfused product to fall back to): biases and the clamp stay refused there; latent experts stay
// refused on every compact storage.
TEST(CompactBiasRefusals, PackedAndLatentAreTypedErrors) {
  using Packed = SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU, PackedExperts>;
  MoeConfig c = biased_config();
  const MoeWeights<float> w = biased_weights(c, 47);
  test::expect_error<config_error>(
      [&] { Packed b(c, w); },
      "moe: packed experts apply the plain GLU only (gpt-oss's clamp needs NativeExperts or "
      "CompactExperts)");
  c.expert_glu = GluOptions{};
  test::expect_error<config_error>(
      [&] { Packed b(c, w); },
      "moe: packed experts do not apply expert biases (gpt-oss, JetMoE): use NativeExperts or "
      "CompactExperts");
  MoeConfig latent = biased_config();
  latent.expert_glu = GluOptions{};
  latent.latent_dim = 32;
  test::expect_error<config_error>(
      [&] { CompactBlock<CompactExperts<Q8>> b(latent, MoeWeights<float>::zeros(latent)); },
      "moe: compact experts do not support latent_dim = 32 (Nemotron-H): use NativeExperts");
}

}  // namespace
}  // namespace moe
