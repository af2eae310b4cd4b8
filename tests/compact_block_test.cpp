// The sparse block with compact routed experts (CompactExperts<Bf16 | Int8 | Fp8E4M3> in the
// exact mode; the fast bf16 mode is tested in quant_block_test.cpp) against the fp32 block: accuracy on random weights and on the golden reference cases, exactness against
// an fp32 block holding the dequantised weights, small-batch and prefill paths, thread
// determinism, and a workspace that stops growing.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

// The targets for the normalised MSE of the output, and the bounds asserted here. The
// formats' own rounding sits at the targets: bf16 keeps 8 significant bits (relative variance
// ~2.4e-6 per weight, three matrices per expert), int8 with absmax row scales and fp8 e4m3 (4
// significant bits) with absmax block scales land within +-25% of theirs depending on the weight
// distribution (docs/compact.md lists the measured values); the bounds allow that much.
template <class Format>
struct Limit;
template <>
struct Limit<Bf16> {
  static constexpr double target = 1e-5, bound = 1e-5;
};
template <>
struct Limit<Int8> {
  static constexpr double target = 1e-4, bound = 1.25e-4;
};
template <>
struct Limit<Fp8E4M3> {
  static constexpr double target = 2e-3, bound = 2.5e-3;
};

/// Sums of squared differences and squared references, pooled over runs.
struct Pooled {
  double num = 0, den = 0;
  double add(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
    const double n = (got.cast<double>() - ref.cast<double>()).squaredNorm();
    const double d = ref.cast<double>().squaredNorm();
    num += n;
    den += d;
    return d > 0 ? n / d : n;
  }
  double value() const { return den > 0 ? num / den : num; }
};

double nmse(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
  const double num = (got.cast<double>() - ref.cast<double>()).squaredNorm();
  const double den = ref.cast<double>().squaredNorm();
  return den > 0 ? num / den : num;
}

template <class Block>
RowMatrix<float> run(const Block& block, const RowMatrix<float>& x,
                     const Executor& ex = serial_executor()) {
  RowMatrix<float> y(x.rows(), x.cols());
  Workspace<float> ws;
  block.forward(x, y, ws, ex);
  return y;
}

/// The fp32 weights with every routed expert replaced by its compact weights, dequantised.
template <class Format>
MoeWeights<float> dequantised(MoeWeights<float> w, const CompactExpertStack<Format>& c) {
  for (Index e = 0; e < c.num_experts(); ++e) {
    w.experts.gate(e) = c.gate(e).dequantize();
    if (c.gated()) w.experts.up(e) = c.up(e).dequantize();
    w.experts.w_out(e) = c.w_out(e).dequantize();
  }
  return w;
}

template <class Format>
class CompactBlock : public ::testing::Test {};
using Formats = ::testing::Types<Bf16, Int8, Fp8E4M3>;
TYPED_TEST_SUITE(CompactBlock, Formats);

MoeConfig small_config(Index shared = 0) {
  MoeConfig c;
  c.d_model = 72;
  c.d_ff = 100;
  c.num_experts = 8;
  c.top_k = 2;
  c.shared_d_ff = shared;
  return c;
}

// Random weights: the error of quantisation within the limits, on the small-batch path
// (5 tokens: at most 5 rows per expert) and the prefill path (300 tokens: ~75 rows per expert).
TYPED_TEST(CompactBlock, RandomWeightsWithinLimit) {
  using F = TypeParam;
  Pooled all;
  for (Index shared : {Index(0), Index(48)}) {
    const MoeConfig c = small_config(shared);
    std::mt19937_64 rng(7);
    const MoeWeights<float> w = test::random_weights<float>(c, rng);
    SparseMoeBlock<float> ref(c, w);
    SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> block(c, w);
    EXPECT_EQ(block.weights().experts.num_experts(), 0);  // fp32 experts freed
    for (Index tokens : {Index(1), Index(5), Index(300)}) {
      const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
      const double e = all.add(run(block, x), run(ref, x));
      std::printf("[ compact  ] random %s tokens=%lld shared=%lld nmse=%.3g\n", F::name,
                  static_cast<long long>(tokens), static_cast<long long>(shared), e);
      EXPECT_GT(e, 0.0);
      EXPECT_LE(e, 1.5 * Limit<F>::bound) << F::name << " tokens " << tokens;
    }
  }
  std::printf("[ compact  ] random %s pooled nmse=%.3g (target %.0e)\n", F::name, all.value(),
              Limit<F>::target);
  EXPECT_LE(all.value(), Limit<F>::bound);
}

// The compact block computes the fp32 block on the dequantised weights up to fp32 rounding (the
// kernels read the right matrices, rows and scales), on both paths, gated and plain.
TYPED_TEST(CompactBlock, EqualsFp32OnDequantisedWeights) {
  using F = TypeParam;
  const MoeConfig c = small_config(32);
  std::mt19937_64 rng(11);
  const MoeWeights<float> w = test::random_weights<float>(c, rng);
  SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> block(c, w);
  SparseMoeBlock<float> ref(c, dequantised(w, block.experts()));
  const MoeWeights<float> wp = test::random_weights<float>(c, rng, /*gated=*/false);
  SparseMoeBlock<float, gating::Mixtral, ReluMlp, CompactExperts<F, CompactMode::exact>> plain(c, wp);
  SparseMoeBlock<float, gating::Mixtral, ReluMlp> plain_ref(c, dequantised(wp, plain.experts()));
  for (Index tokens : {Index(3), Index(17), Index(250)}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
    EXPECT_LE(nmse(run(block, x), run(ref, x)), 1e-11) << tokens;
    EXPECT_LE(nmse(run(plain, x), run(plain_ref, x)), 1e-11) << tokens;
  }
}

// Task decomposition by shapes only: a thread pool gives the serial result bit for bit.
TYPED_TEST(CompactBlock, ThreadPoolBitwiseEqualsSerial) {
  using F = TypeParam;
  MoeConfig c = small_config(40);
  c.d_model = 256;
  c.d_ff = 640;  // several column blocks per expert
  std::mt19937_64 rng(3);
  SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> block(
      c, test::random_weights<float>(c, rng));
  ThreadPool pool(3);
  for (Index tokens : {Index(1), Index(8), Index(40), Index(400)}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
    const RowMatrix<float> a = run(block, x), b = run(block, x, pool);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())), 0) << tokens;
  }
}

// Decode needs no prefill scratch, and a warm workspace does not grow (no allocation).
TYPED_TEST(CompactBlock, WorkspaceStopsGrowing) {
  using F = TypeParam;
  const MoeConfig c = small_config();
  std::mt19937_64 rng(5);
  SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> block(
      c, test::random_weights<float>(c, rng));
  ThreadPool pool(2);
  for (Index tokens : {Index(1), Index(8), Index(200)}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
    RowMatrix<float> y(tokens, c.d_model);
    Workspace<float> ws;
    block.forward(x, y, ws, pool);
    if (tokens <= 8) {
      EXPECT_EQ(moe::detail::WorkspaceAccess::compact_scratch(ws).bytes(), 0u);
    }
    if (tokens == 200) {
      EXPECT_GE(moe::detail::WorkspaceAccess::compact_scratch(ws).bytes(),
                std::size_t(pool.num_workers() * 256 * c.d_ff) * sizeof(float));
    }
    const std::size_t warm = ws.bytes();
    const float* hidden = moe::detail::WorkspaceAccess::hidden(ws).ensure(0);
    for (int i = 0; i < 3; ++i) block.forward(x, y, ws, pool);
    EXPECT_EQ(ws.bytes(), warm);
    EXPECT_EQ(moe::detail::WorkspaceAccess::hidden(ws).ensure(0), hidden);
  }
}

// Experts given as views of codes and scales held elsewhere (a checkpoint's tensors): the same
// results as quantising in the block, bit for bit.
TYPED_TEST(CompactBlock, ViewsOfExternalCodes) {
  using F = TypeParam;
  using M = CompactMatrix<F>;
  const MoeConfig c = small_config();
  std::mt19937_64 rng(9);
  MoeWeights<float> w = test::random_weights<float>(c, rng);
  SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> block(c, w);
  const auto& q = block.experts();
  CompactExpertStack<F> views(c.num_experts, c.d_model, c.d_ff, true);
  auto view = [](const M& m) {
    return M::view(m.codes(), m.rows(), m.cols(), m.scales(), m.block_rows(), m.block_cols());
  };
  for (Index e = 0; e < c.num_experts; ++e) {
    views.set_gated(e, view(q.gate(e)), view(q.up(e)), view(q.w_out(e)));
  }
  EXPECT_EQ(views.bytes(), block.expert_bytes());
  w.experts = ExpertStack<float>();
  SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>> viewed(c, w, std::move(views));
  for (Index tokens : {Index(4), Index(100)}) {
    const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
    const RowMatrix<float> a = run(block, x), b = run(viewed, x);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())), 0);
  }
}

TYPED_TEST(CompactBlock, RejectsBadExperts) {
  using F = TypeParam;
  const MoeConfig c = small_config();
  std::mt19937_64 rng(1);
  MoeWeights<float> w = test::random_weights<float>(c, rng);
  using B = SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<F, CompactMode::exact>>;
  // fp32 experts passed as well as compact ones.
  EXPECT_THROW(B(c, w, CompactExpertStack<F>::from(w.experts)), config_error);
  auto wrong = CompactExpertStack<F>::from(w.experts);
  w.experts = ExpertStack<float>();
  MoeConfig c2 = c;
  c2.d_ff = 50;
  EXPECT_THROW(B(c2, w, wrong), shape_error);
  EXPECT_THROW(B(c, w, CompactExpertStack<F>(c.num_experts, c.d_model, c.d_ff, true)),
               config_error);  // matrices never set
}

// The golden reference cases (tests/data/reference): each family's block with compact experts
// against the same block in fp32 (routing identical: the router stays fp32).
template <class F, class Gating, class Ffn>
void reference_case(const golden::Case& k, const typename Gating::Options& o, bool bias,
                    const std::string& file, Pooled& all) {
  const MoeConfig c = k.config();
  const MoeWeights<float> w = k.weights<float>(c, Ffn::gated, bias);
  const RowMatrix<float> x = k.mat<float>("input");
  SparseMoeBlock<float, Gating, Ffn> ref(c, w, o);
  SparseMoeBlock<float, Gating, Ffn, CompactExperts<F, CompactMode::exact>> block(c, w, o);
  const double e = all.add(run(block, x), run(ref, x));
  std::printf("[ compact  ] reference %s %s tokens=%lld nmse=%.3g\n", file.c_str(), F::name,
              static_cast<long long>(x.rows()), e);
  EXPECT_LE(e, Limit<F>::bound) << file << ' ' << F::name;
  // Prefill path: the tokens repeated until experts see more than 16 rows.
  RowMatrix<float> big(x.rows() * 24, x.cols());
  for (Index r = 0; r < big.rows(); ++r) big.row(r) = x.row(r % x.rows());
  const double eb = nmse(run(block, big), run(ref, big));
  EXPECT_LE(eb, Limit<F>::bound) << file << ' ' << F::name << " prefill";
  EXPECT_NEAR(eb, e, 1e-3 * e) << file << ' ' << F::name << " prefill";
}

TYPED_TEST(CompactBlock, ReferenceCasesWithinLimit) {
  using F = TypeParam;
  int ran = 0;
  Pooled all;
  const std::string dir = std::string(MOE_TEST_DATA_DIR) + "/reference";
  std::vector<std::string> paths;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".safetensors") paths.push_back(entry.path().string());
  }
  std::sort(paths.begin(), paths.end());
  for (const std::string& path : paths) {
    const golden::Case k(path);
    const std::string family = k.meta_or("family", "-");
    const std::string file = path.substr(path.find_last_of('/') + 1);
    if (family == "mixtral" || family == "qwen2_moe" || family == "qwen3_moe" ||
        family == "olmoe") {
      gating::SoftmaxTopK::Options o;
      o.normalize = family == "mixtral" || k.meta_bool_or("norm_topk_prob", family == "qwen3_moe");
      reference_case<F, gating::SoftmaxTopK, SwiGLU>(k, o, false, file, all);
      ++ran;
    } else if (family == "deepseek_v3" && k.has("router.bias")) {
      using G = gating::GroupLimitedTopK;
      const auto o = G::Options::deepseek_v3(
          k.meta_int_or("n_group", 1), k.meta_int_or("topk_group", 1),
          k.meta_double_or("routed_scaling_factor", 1.0), k.meta_bool_or("norm_topk_prob", true));
      reference_case<F, G, SwiGLU>(k, o, true, file, all);
      ++ran;
    } else if (family == "switch") {
      reference_case<F, gating::CapacityTopK, ReluMlp>(k, gating::CapacityTopK::Options::dropless(),
                                                       false, file, all);
      ++ran;
    }
  }
  EXPECT_GE(ran, 5);
  std::printf("[ compact  ] reference %s pooled nmse=%.3g (target %.0e)\n", F::name, all.value(),
              Limit<F>::target);
  EXPECT_LE(all.value(), Limit<F>::bound);
}

}  // namespace
}  // namespace moe
