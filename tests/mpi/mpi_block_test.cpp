// ExpertParallelBlock under mpirun -np 1..4: every rank runs the single-process block on the whole
// batch (cheap at test sizes) and checks that its own rows of the expert-parallel result are the
// same bits. Every test calls the same collectives on every rank in the same order; comparisons
// use EXPECT (never an early return) so that a failing rank keeps up with the others.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/distributed/mpi.hpp"

#include "mpi/golden_families.hpp"
#include "mpi/mpi_test_util.hpp"
#include "reference/golden_case.hpp"
#include <mpi.h>

namespace {

using moe::Index;
using moe::MoeConfig;
using moe::MoeWeights;
using moe::RowMatrix;
using moe::distributed::ExpertParallelBlock;
using moe::distributed::ExpertParallelWorkspace;
using moe::distributed::ExpertPlacement;
using namespace moe::mpi_test;  // NOLINT(google-build-using-namespace): the tests' own helpers

/// Runs the single-process block on x_full and the expert-parallel block on this rank's slice
/// for every placement and split; EXPECTs identical bits (and identical routing).
template <class T, class G, class Ffn, class Storage = moe::NativeExperts>
void check_bitwise(const std::string& what, const MoeConfig& config, const MoeWeights<T>& full,
                   const typename G::Options& options, const RowMatrix<T>& x_full) {
  using Single = moe::SparseMoeBlock<T, G, Ffn, Storage>;
  const Single single(config, full, options);
  RowMatrix<T> y_full(x_full.rows(), x_full.cols());
  moe::Workspace<T> ws_single;
  single.forward(x_full, y_full, ws_single);
  const int R = ranks(), me = rank_of();
  for (const auto& [pname, placement] : placements(config.num_experts, R)) {
    const ExpertParallelBlock<T, G, Ffn, Storage> block(MPI_COMM_WORLD, config, placement,
                                                        shard(full, placement, me), options);
    ExpertParallelWorkspace<T> ws;
    for (Split split : {Split::even, Split::ramp, Split::last_only}) {
      const auto n = split_tokens(x_full.rows(), R, split);
      Index offset = 0;
      for (int r = 0; r < me; ++r) offset += n[std::size_t(r)];
      const Index mine = n[std::size_t(me)];
      const RowMatrix<T> x = x_full.middleRows(offset, mine);  // a rank's own matrix
      RowMatrix<T> y(mine, x_full.cols());
      block.forward(x, y, ws);
      const RowMatrix<T> expected = y_full.middleRows(offset, mine);
      EXPECT_TRUE(same_bits(y, expected))
          << what << ", placement " << pname << ", split " << split_name(split) << ", rank " << me
          << " of " << R << ": max abs diff "
          << (mine > 0 ? (y - expected).cwiseAbs().maxCoeff() : T(0));
      const RowMatrix<std::int32_t> e_expected =
          ws_single.routing().experts().middleRows(offset, mine);
      const RowMatrix<std::int32_t> e_got = ws.routing().experts();
      const RowMatrix<std::uint8_t> k_expected =
          ws_single.routing().kept().middleRows(offset, mine);
      const RowMatrix<std::uint8_t> k_got = ws.routing().kept();
      EXPECT_TRUE(e_got == e_expected && k_got == k_expected)
          << what << ": routing differs, placement " << pname << ", rank " << me;
    }
  }
}

// ---- every v1 golden family (tests/data/reference), float and double ----------------------------

template <class T>
void run_golden(const std::string& file) {
  const moe::golden::Case c(std::string(MOE_TEST_DATA_DIR) + "/reference/" + file);
  const MoeConfig config = c.config();
  const RowMatrix<T> x = c.mat<T>("input");
  with_golden_family<T>(c, config, [&](auto family, const MoeWeights<T>& w, const auto& options) {
    using F = decltype(family);
    check_bitwise<T, typename F::Gating, typename F::Ffn>(file, config, w, options, x);
  });
}

class GoldenFamily : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenFamily, FloatBitwiseEqualToSingleProcess) { run_golden<float>(GetParam()); }
TEST_P(GoldenFamily, DoubleBitwiseEqualToSingleProcess) { run_golden<double>(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Reference, GoldenFamily, kGoldenFiles, golden_test_name);

// ---- families and storages without a golden file; awkward sizes --------------------------------

TEST(ExpertParallel, SoftmaxTopKWithSharedExpertAwkwardSizes) {
  std::uint32_t seed = 1;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s, 6, false);
    std::mt19937 rng(seed + 100);
    check_bitwise<float, moe::gating::SoftmaxTopK, moe::SwiGLU>(
        label("softmax+shared", s), c, random_weights<float>(c, true, false, false, seed++),
        moe::gating::SoftmaxTopK::Options{true}, random_matrix<float>(s.tokens, s.d_model, rng, 1));
  }
}

TEST(ExpertParallel, CapacityFactorIsGlobal) {
  std::uint32_t seed = 10;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s);
    std::mt19937 rng(seed + 100);
    // GShard: capacity ceil(0.75 k T / E) of the whole batch, so tokens are dropped.
    check_bitwise<double, moe::gating::CapacityTopK, moe::GeGLU>(
        label("gshard", s), c, random_weights<double>(c, true, false, false, seed++),
        moe::gating::CapacityTopK::Options::gshard(0.75),
        random_matrix<double>(s.tokens, s.d_model, rng, 1));
  }
}

TEST(ExpertParallel, ExpertChoiceRoutesTheWholeBatch) {
  std::uint32_t seed = 20;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s);
    std::mt19937 rng(seed + 100);
    check_bitwise<float, moe::gating::ExpertChoice, moe::SwiGLU>(
        label("expert_choice", s), c, random_weights<float>(c, true, false, false, seed++),
        moe::gating::ExpertChoice::Options{1.5}, random_matrix<float>(s.tokens, s.d_model, rng, 1));
  }
}

TEST(ExpertParallel, NoisyTopKAndDeepSeekV2AtInference) {
  std::uint32_t seed = 30;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s);
    std::mt19937 rng(seed + 100);
    const RowMatrix<float> x = random_matrix<float>(s.tokens, s.d_model, rng, 1);
    check_bitwise<float, moe::gating::NoisyTopK, moe::SwiGLU>(
        label("noisy", s), c, random_weights<float>(c, true, false, true, seed++), {}, x);
    using G = moe::gating::DeepSeekV2;
    check_bitwise<float, G, moe::SwiGLU>(label("deepseek_v2", s), c,
                                         random_weights<float>(c, true, false, false, seed++),
                                         G::Options::deepseek_v2(1, 1, 2.5), x);
  }
}

template <class Format>
void check_compact(std::uint32_t seed) {
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s, 12, true);
    std::mt19937 rng(seed + 100);
    check_bitwise<float, moe::gating::SoftmaxTopK, moe::SwiGLU, moe::CompactExperts<Format>>(
        label("compact", s), c, random_weights<float>(c, true, false, false, seed++),
        moe::gating::SoftmaxTopK::Options{false},
        random_matrix<float>(s.tokens, s.d_model, rng, 1));
  }
}
TEST(ExpertParallel, CompactBf16) { check_compact<moe::Bf16>(40); }
TEST(ExpertParallel, CompactInt8) { check_compact<moe::Int8>(50); }
TEST(ExpertParallel, CompactFp8) { check_compact<moe::Fp8E4M3>(60); }

/// Prefill paths, whose rounding depends on a row's position in the batch: Eigen's GEMM (an
/// expert's rows above 768 KiB: ~1600 rows of 256 floats here) and decoded compact tiles (more
/// than 16 rows). 2400 tokens over 3 experts, top-2.
TEST(ExpertParallel, PrefillPathsBitwise) {
  const Sizes s{256, 64, 3, 2, 2400};
  const MoeConfig c = config_of(s);
  std::mt19937 rng(77);
  const RowMatrix<float> x = random_matrix<float>(s.tokens, s.d_model, rng, 1);
  check_bitwise<float, moe::gating::SoftmaxTopK, moe::SwiGLU>(
      "prefill fp32", c, random_weights<float>(c, true, false, false, 70), {}, x);
  check_bitwise<float, moe::gating::SoftmaxTopK, moe::SwiGLU, moe::CompactExperts<moe::Int8>>(
      "prefill int8", c, random_weights<float>(c, true, false, false, 71), {}, x);
}

// ---- bf16 rows, statistics, errors --------------------------------------------------------------

TEST(ExpertParallel, Bf16RowsHalveTheBytesAndStayClose) {
  const Sizes s{64, 32, 8, 2, 40};
  const MoeConfig c = config_of(s);
  const auto full = random_weights<float>(c, true, false, false, 90);
  std::mt19937 rng(91);
  const RowMatrix<float> x_full = random_matrix<float>(s.tokens, s.d_model, rng, 1);
  const moe::SparseMoeBlock<float> single(c, full);
  RowMatrix<float> y_full(s.tokens, s.d_model);
  moe::Workspace<float> ws1;
  single.forward(x_full, y_full, ws1);
  const int R = ranks(), me = rank_of();
  const auto placement = ExpertPlacement::round_robin(c.num_experts, R);
  const auto n = split_tokens(s.tokens, R, Split::even);
  Index offset = 0;
  for (int r = 0; r < me; ++r) offset += n[std::size_t(r)];
  const RowMatrix<float> x = x_full.middleRows(offset, n[std::size_t(me)]);
  std::int64_t bytes[2];
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    moe::distributed::ExchangeOptions opt;
    opt.bf16_rows = bf16 == 1;
    const ExpertParallelBlock<float> block(MPI_COMM_WORLD, c, placement, shard(full, placement, me),
                                           {}, opt);
    ExpertParallelWorkspace<float> ws;
    RowMatrix<float> y(x.rows(), x.cols());
    block.forward(x, y, ws);
    const auto& st = ws.stats();
    EXPECT_EQ(st.bytes_per_value, bf16 ? 2 : 4);
    EXPECT_EQ(st.local_slots + st.remote_slots, x.rows() * c.top_k);  // no drops in this family
    EXPECT_EQ(st.token_bytes, 2 * st.remote_slots * c.d_model * st.bytes_per_value);
    bytes[bf16] = st.token_bytes;
    const RowMatrix<float> expected = y_full.middleRows(offset, x.rows());
    if (bf16) {
      if (x.rows() > 0) {
        const float err = (y - expected).cwiseAbs().maxCoeff();
        const float scale = expected.cwiseAbs().maxCoeff();
        EXPECT_LE(err, 2e-2f * (1 + scale)) << "bf16 rows, rank " << me;
        EXPECT_GT(err, 0.0f) << "bf16 rows (local ones too) are rounded";
      }
    } else {
      EXPECT_TRUE(same_bits(y, expected));
    }
  }
  EXPECT_EQ(bytes[1] * 2, bytes[0]);
  // Remote slots: with one rank, none.
  if (R == 1) {
    EXPECT_EQ(bytes[0], 0);
  }
}

TEST(ExpertParallel, ExchangedBytesFollowTheFormula) {
  // Every token of every rank is counted once: the sum over ranks of remote slots equals the
  // kept slots whose expert lives on another rank than the token, computed here independently.
  const Sizes s{16, 8, 6, 3, 50};
  const MoeConfig c = config_of(s);
  const auto full = random_weights<double>(c, true, false, false, 95);
  std::mt19937 rng(96);
  const RowMatrix<double> x_full = random_matrix<double>(s.tokens, s.d_model, rng, 1);
  const moe::SparseMoeBlock<double> single(c, full);
  RowMatrix<double> y_full(s.tokens, s.d_model);
  moe::Workspace<double> ws1;
  single.forward(x_full, y_full, ws1);
  const int R = ranks(), me = rank_of();
  const auto placement = ExpertPlacement::contiguous(c.num_experts, R);
  const auto n = split_tokens(s.tokens, R, Split::ramp);
  std::int64_t expected_remote = 0;
  Index t = 0;
  for (int r = 0; r < R; ++r) {
    for (Index i = 0; i < n[std::size_t(r)]; ++i, ++t) {
      for (Index j = 0; j < c.top_k; ++j) {
        expected_remote += placement.owner(ws1.routing().experts()(t, j)) != r ? 1 : 0;
      }
    }
  }
  Index offset = 0;
  for (int r = 0; r < me; ++r) offset += n[std::size_t(r)];
  const RowMatrix<double> x = x_full.middleRows(offset, n[std::size_t(me)]);
  const ExpertParallelBlock<double> block(MPI_COMM_WORLD, c, placement, shard(full, placement, me));
  ExpertParallelWorkspace<double> ws;
  RowMatrix<double> y(x.rows(), x.cols());
  block.forward(x, y, ws);
  std::int64_t remote = ws.stats().remote_slots, total_remote = 0;
  std::int64_t received = ws.stats().received_rows, total_received = 0;
  MPI_Allreduce(&remote, &total_remote, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&received, &total_received, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total_remote, expected_remote);
  EXPECT_EQ(total_received, expected_remote);
  EXPECT_EQ(ws.stats().token_bytes, 2 * remote * c.d_model * std::int64_t(sizeof(double)));
  EXPECT_EQ(ws.stats().global_tokens, s.tokens);
}

TEST(ExpertParallel, BadInputOnOneRankThrowsTheSameErrorEverywhere) {
  const Sizes s{16, 8, 4, 2, 3};
  const MoeConfig c = config_of(s);
  const int R = ranks(), me = rank_of();
  const auto placement = ExpertPlacement::contiguous(c.num_experts, R);
  const auto full = random_weights<float>(c, true, false, false, 5);
  const ExpertParallelBlock<float> block(MPI_COMM_WORLD, c, placement, shard(full, placement, me));
  ExpertParallelWorkspace<float> ws;
  // The last rank passes 15 columns instead of 16.
  const Index cols = me == R - 1 ? 15 : 16;
  const RowMatrix<float> x = RowMatrix<float>::Zero(3, cols);
  RowMatrix<float> y(3, 16);
  try {
    block.forward(x, y, ws);
    ADD_FAILURE() << "no exception on rank " << me;
  } catch (const moe::shape_error& e) {
    EXPECT_EQ(std::string(e.what()),
              moe::detail::concat("moe: x has shape [3 x 15], expected [3 x 16] (on rank ", R - 1,
                                  " of ", R, ")"));
  }
  // The block stays usable: a good call afterwards works on every rank.
  const RowMatrix<float> good = RowMatrix<float>::Zero(3, 16);
  block.forward(good, y, ws);
  EXPECT_TRUE(y.isZero());
}

TEST(ExpertParallel, WrongShardOnOneRankFailsConstructionEverywhere) {
  const Sizes s{16, 8, 5, 2, 3};
  const MoeConfig c = config_of(s);
  const int R = ranks(), me = rank_of();
  const auto placement = ExpertPlacement::contiguous(c.num_experts, R);
  const auto full = random_weights<float>(c, true, false, false, 6);
  auto w = shard(full, placement, me);
  if (me == 0) w.experts = moe::ExpertStack<float>(w.experts.num_experts() + 1, 16, 8, true);
  const Index held = static_cast<Index>(placement.experts_of(0).size());
  try {
    const ExpertParallelBlock<float> block(MPI_COMM_WORLD, c, placement, std::move(w));
    ADD_FAILURE() << "no exception on rank " << me;
  } catch (const moe::config_error& e) {
    EXPECT_EQ(std::string(e.what()),
              moe::detail::concat("moe: this rank holds ", held,
                                  " experts by the placement, weights.experts has ", held + 1,
                                  " (on rank 0 of ", R, ")"));
  }
}

TEST(ExpertParallel, RanksThatDisagreeOnThePlacementFail) {
  const int R = ranks(), me = rank_of();
  if (R == 1) GTEST_SKIP() << "needs two ranks";
  const Sizes s{8, 4, 6, 1, 2};
  const MoeConfig c = config_of(s);
  const auto full = random_weights<float>(c, true, false, false, 8);
  // Rank 0 places contiguously, the others round robin (different maps for 2, 3 and 4 ranks).
  const auto placement =
      me == 0 ? ExpertPlacement::contiguous(6, R) : ExpertPlacement::round_robin(6, R);
  EXPECT_THROW(
      {
        try {
          const ExpertParallelBlock<float> block(MPI_COMM_WORLD, c, placement,
                                                 shard(full, placement, me));
        } catch (const moe::config_error& e) {
          EXPECT_STREQ(e.what(), "moe: ranks disagree on the config or the placement");
          throw;
        }
      },
      moe::config_error);
}

/// Prints a failed assertion of a rank other than 0 (rank 0 keeps gtest's own printer).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_of(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  // Only rank 0 prints the progress; every rank prints its failures.
  if (rank_of() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter);
  }
  const int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any != 0 && rank_of() == 0) std::fprintf(stderr, "moe_mpi_tests: some rank failed\n");
  MPI_Finalize();
  return any;
}
