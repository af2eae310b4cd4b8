// expert_parallel_backward under mpirun -np 1..4: every rank runs the single-process forward and
// block_backward on the whole batch, then the expert-parallel forward and backward on its slice,
// and checks its rows of dx, the gradients of the experts it holds and the loss values for the
// same bits; the replicated parameters' gradients after allreduce_replicated_gradients to
// rounding (MPI sums the ranks' shares in its own order). Collectives run in the same order on
// every rank; comparisons use EXPECT (never an early return).
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/backward.hpp"
#include "moe/distributed/backward.hpp"

#include "mpi/golden_families.hpp"
#include "mpi/mpi_test_util.hpp"
#include "reference/golden_backward.hpp"
#include "reference/golden_case.hpp"
#include <mpi.h>

namespace {

using moe::Index;
using moe::LossCoefficients;
using moe::MoeConfig;
using moe::MoeGradients;
using moe::MoeWeights;
using moe::RowMatrix;
using moe::distributed::ExpertParallelBlock;
using moe::distributed::ExpertParallelWorkspace;
using moe::distributed::ExpertPlacement;
using namespace moe::mpi_test;  // NOLINT(google-build-using-namespace): the tests' own helpers

/// Norm-wise relative difference of two tensors (0 for two empty ones).
template <class A, class B>
double rel_diff(const A& got, const B& want) {
  if (want.size() == 0) return got.size() == 0 ? 0.0 : 1.0;
  const double scale = std::max(static_cast<double>(want.norm()), 1e-30);
  return static_cast<double>((got - want).norm()) / scale;
}

/// The single-process result the ranks compare with.
template <class T>
struct Expected {
  RowMatrix<T> dx;
  MoeGradients<T> grads;
  moe::LossValues values;
};

/// Forward (training) and backward of the single-process block on the whole batch.
template <class T, class G, class Ffn>
Expected<T> single_process(const MoeConfig& config, const MoeWeights<T>& full,
                           const typename G::Options& options, const RowMatrix<T>& x,
                           const RowMatrix<T>& dy, const LossCoefficients& coeffs) {
  const moe::SparseMoeBlock<T, G, Ffn> block(config, full, options);
  moe::Workspace<T> ws;
  ws.set_training(true);
  RowMatrix<T> y(x.rows(), x.cols());
  block.forward(x, y, ws);
  Expected<T> e{RowMatrix<T>(x.rows(), x.cols()), MoeGradients<T>::zeros_like(full), {}};
  e.values = moe::block_backward(block, x, dy, ws, e.grads, e.dx, coeffs);
  return e;
}

/// For every placement and split: the expert-parallel forward and backward on this rank's slice
/// against the single-process ones. mask: [T] token mask of the whole batch, or empty.
template <class T, class G, class Ffn>
void check_backward(const std::string& what, const MoeConfig& config, const MoeWeights<T>& full,
                    const typename G::Options& options, const RowMatrix<T>& x_full,
                    const RowMatrix<T>& dy_full, LossCoefficients coeffs,
                    const std::vector<double>& mask = {}) {
  coeffs.token_mask = mask.empty() ? nullptr : mask.data();
  const Expected<T> want =
      single_process<T, G, Ffn>(config, full, options, x_full, dy_full, coeffs);
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;
  const int R = ranks(), me = rank_of();
  for (const auto& [pname, placement] : placements(config.num_experts, R)) {
    const ExpertParallelBlock<T, G, Ffn> block(MPI_COMM_WORLD, config, placement,
                                               shard(full, placement, me), options);
    ExpertParallelWorkspace<T> ws;
    ws.set_training(true);
    for (Split split : {Split::even, Split::ramp, Split::last_only}) {
      const auto n = split_tokens(x_full.rows(), R, split);
      const Index offset = offset_of(n, me), mine = n[std::size_t(me)];
      const std::string where = moe::detail::concat(what, ", placement ", pname, ", split ",
                                                    split_name(split), ", rank ", me, " of ", R);
      const RowMatrix<T> x = x_full.middleRows(offset, mine);
      const RowMatrix<T> dy = dy_full.middleRows(offset, mine);
      RowMatrix<T> y(mine, x.cols()), dx(mine, x.cols());
      block.forward(x, y, ws);
      LossCoefficients c = coeffs;
      c.token_mask = mask.empty() || mine == 0 ? nullptr : mask.data() + offset;
      MoeGradients<T> grads = moe::distributed::zero_gradients(block);
      const moe::LossValues v =
          moe::distributed::expert_parallel_backward(block, x, dy, ws, grads, dx, c);

      const RowMatrix<T> dx_want = want.dx.middleRows(offset, mine);
      EXPECT_TRUE(same_bits(dx, dx_want))
          << where << ": dx differs, max abs diff "
          << (mine > 0 ? (dx - dx_want).cwiseAbs().maxCoeff() : T(0));
      EXPECT_EQ(v.aux, want.values.aux) << where;
      EXPECT_EQ(v.z, want.values.z) << where;
      const auto& held = placement.experts_of(me);
      for (std::size_t i = 0; i < held.size(); ++i) {
        const Index e = held[i];
        const RowMatrix<T> gin = grads.experts.w_in(Index(i)), gout = grads.experts.w_out(Index(i));
        EXPECT_TRUE(same_bits(gin, RowMatrix<T>(want.grads.experts.w_in(e))) &&
                    same_bits(gout, RowMatrix<T>(want.grads.experts.w_out(e))))
            << where << ": gradient of expert " << e << " (local " << i << ") differs";
      }
      moe::distributed::allreduce_replicated_gradients(MPI_COMM_WORLD, grads);
      EXPECT_LE(rel_diff(grads.router, want.grads.router), tol) << where << ": router gradient";
      EXPECT_LE(rel_diff(grads.shared.stacked_in(), want.grads.shared.stacked_in()), tol)
          << where << ": shared expert input-projection gradient";
      EXPECT_LE(rel_diff(grads.shared.stacked_out(), want.grads.shared.stacked_out()), tol)
          << where << ": shared expert output-projection gradient";
      EXPECT_LE(rel_diff(grads.shared_gate, want.grads.shared_gate), tol)
          << where << ": shared gate gradient";
    }
  }
}

// ---- every v1 golden family (tests/data/reference), float and double ----------------------------

template <class T>
void run_golden(const std::string& file) {
  const moe::golden::Case c(std::string(MOE_TEST_DATA_DIR) + "/reference/" + file);
  const MoeConfig config = c.config();
  const RowMatrix<T> x = c.mat<T>("input");
  std::mt19937 rng(7);
  const RowMatrix<T> dy = random_matrix<T>(x.rows(), x.cols(), rng, 1.0);
  const std::vector<double> mask = moe::golden::backward_detail::token_mask(c);
  const std::string family = c.meta("family");
  // The family's loss (golden_backward.hpp), with coefficients that make every term count.
  LossCoefficients k = moe::golden::backward_detail::coefficients(c, family, mask);
  if (family == "deepseek_v3") k.aux_loss = moe::AuxLoss::deepseek_sequence;
  k.aux = 0.05, k.z = 0.01;
  with_golden_family<T>(c, config, [&](auto fam, const MoeWeights<T>& w, const auto& options) {
    using F = decltype(fam);
    check_backward<T, typename F::Gating, typename F::Ffn>(file, config, w, options, x, dy, k,
                                                           mask);
  });
}

class GoldenFamilyBackward : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenFamilyBackward, FloatBitwiseEqualToSingleProcess) { run_golden<float>(GetParam()); }
TEST_P(GoldenFamilyBackward, DoubleBitwiseEqualToSingleProcess) { run_golden<double>(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Reference, GoldenFamilyBackward, kGoldenFiles, golden_test_name);

// ---- awkward sizes, batch-dependent families -------------------------------------------------

LossCoefficients lb_and_z() {
  LossCoefficients k;
  k.aux = 0.02, k.z = 0.003;
  return k;
}

TEST(ExpertParallelBackward, SoftmaxTopKWithGatedSharedExpertAwkwardSizes) {
  std::uint32_t seed = 200;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s, 6, true);
    std::mt19937 rng(seed + 100);
    const RowMatrix<float> x = random_matrix<float>(s.tokens, s.d_model, rng, 1);
    const RowMatrix<float> dy = random_matrix<float>(s.tokens, s.d_model, rng, 1);
    check_backward<float, moe::gating::SoftmaxTopK, moe::SwiGLU>(
        label("softmax+gated shared", s), c, random_weights<float>(c, true, false, false, seed++),
        moe::gating::SoftmaxTopK::Options{true}, x, dy, lb_and_z());
  }
}

TEST(ExpertParallelBackward, GlobalCapacityDropsTokensAsOneProcess) {
  std::uint32_t seed = 210;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s);
    std::mt19937 rng(seed + 100);
    const RowMatrix<double> x = random_matrix<double>(s.tokens, s.d_model, rng, 1);
    const RowMatrix<double> dy = random_matrix<double>(s.tokens, s.d_model, rng, 1);
    check_backward<double, moe::gating::CapacityTopK, moe::GeGLU>(
        label("gshard", s), c, random_weights<double>(c, true, false, false, seed++),
        moe::gating::CapacityTopK::Options::gshard(0.75), x, dy, lb_and_z());
  }
}

TEST(ExpertParallelBackward, ExpertChoiceRoutesTheWholeBatch) {
  std::uint32_t seed = 220;
  for (const Sizes& s : kSizes) {
    const MoeConfig c = config_of(s);
    std::mt19937 rng(seed + 100);
    const RowMatrix<float> x = random_matrix<float>(s.tokens, s.d_model, rng, 1);
    const RowMatrix<float> dy = random_matrix<float>(s.tokens, s.d_model, rng, 1);
    LossCoefficients k;
    k.z = 0.01;
    check_backward<float, moe::gating::ExpertChoice, moe::SwiGLU>(
        label("expert_choice", s), c, random_weights<float>(c, true, false, false, seed++),
        moe::gating::ExpertChoice::Options{1.5}, x, dy, k);
  }
}

/// Above the streaming size (1000 tokens x 256 floats = 1000 KiB of x) block_backward runs the
/// shared expert's products on Eigen's GEMM, which rounds rows by position: a rank's slice then
/// differs from the whole batch by a few ulp (docs/scale-out.md). The routed experts' gradients
/// and rows stay bitwise.
TEST(ExpertParallelBackward, SharedExpertAboveTheStreamingSizeIsClose) {
  MoeConfig c = config_of({256, 32, 3, 2, 1000}, 64, true);
  const auto full = random_weights<float>(c, true, false, false, 300);
  std::mt19937 rng(301);
  const RowMatrix<float> x_full = random_matrix<float>(1000, 256, rng, 1);
  const RowMatrix<float> dy_full = random_matrix<float>(1000, 256, rng, 1);
  using G = moe::gating::SoftmaxTopK;
  const Expected<float> want =
      single_process<float, G, moe::SwiGLU>(c, full, {true}, x_full, dy_full, {});
  const int R = ranks(), me = rank_of();
  const auto placement = ExpertPlacement::round_robin(3, R);
  const ExpertParallelBlock<float, G> block(MPI_COMM_WORLD, c, placement,
                                            shard(full, placement, me), {true});
  ExpertParallelWorkspace<float> ws;
  ws.set_training(true);
  const auto n = split_tokens(1000, R, Split::even);
  const Index offset = offset_of(n, me), mine = n[std::size_t(me)];
  const RowMatrix<float> x = x_full.middleRows(offset, mine);
  RowMatrix<float> y(mine, 256), dx(mine, 256);
  block.forward(x, y, ws);
  MoeGradients<float> grads = moe::distributed::zero_gradients(block);
  moe::distributed::expert_parallel_backward(block, x, dy_full.middleRows(offset, mine), ws, grads,
                                             dx, {});
  const RowMatrix<float> dx_want = want.dx.middleRows(offset, mine);
  const float err = (dx - dx_want).cwiseAbs().maxCoeff(), scale = dx_want.cwiseAbs().maxCoeff();
  EXPECT_LE(err, 1e-5f * scale) << "rank " << me;
  if (R == 1) {
    EXPECT_TRUE(same_bits(dx, dx_want));
  }
  const auto& held = placement.experts_of(me);
  for (std::size_t i = 0; i < held.size(); ++i) {
    EXPECT_TRUE(same_bits(RowMatrix<float>(grads.experts.w_in(Index(i))),
                          RowMatrix<float>(want.grads.experts.w_in(held[i]))))
        << "expert " << held[i] << ", rank " << me;
  }
  if (me == 0)
    std::printf("[ info ] dx of rank 0 of %d: max abs diff %g (scale %g)\n", R, err, scale);
}

// ---- errors -----------------------------------------------------------------------------------

struct Small {
  MoeConfig config = config_of({16, 8, 4, 2, 3});
  MoeWeights<float> full = random_weights<float>(config, true, false, false, 5);
  ExpertPlacement placement = ExpertPlacement::contiguous(4, ranks());
  ExpertParallelBlock<float> block{MPI_COMM_WORLD, config, placement,
                                   shard(full, placement, rank_of())};
  RowMatrix<float> x = RowMatrix<float>::Ones(3, 16), y = RowMatrix<float>(3, 16);
  RowMatrix<float> dx = RowMatrix<float>(3, 16);
};

TEST(ExpertParallelBackward, WithoutATrainingForwardEveryRankThrows) {
  Small s;
  ExpertParallelWorkspace<float> ws;
  s.block.forward(s.x, s.y, ws);  // inference: nothing kept
  MoeGradients<float> g = moe::distributed::zero_gradients(s.block);
  try {
    moe::distributed::expert_parallel_backward(s.block, s.x, s.x, ws, g, s.dx);
    ADD_FAILURE() << "no exception on rank " << rank_of();
  } catch (const moe::config_error& e) {
    EXPECT_EQ(std::string(e.what()),
              moe::detail::concat("moe: expert_parallel_backward needs a workspace filled by "
                                  "forward() in training mode (call ws.set_training(true) before "
                                  "forward) (on rank 0 of ",
                                  ranks(), ")"));
  }
}

TEST(ExpertParallelBackward, WrongDyOnOneRankThrowsEverywhereAndTheBlockStaysUsable) {
  Small s;
  ExpertParallelWorkspace<float> ws;
  ws.set_training(true);
  s.block.forward(s.x, s.y, ws);
  MoeGradients<float> g = moe::distributed::zero_gradients(s.block);
  const int R = ranks(), me = rank_of();
  const RowMatrix<float> dy = RowMatrix<float>::Ones(me == R - 1 ? 2 : 3, 16);
  try {
    moe::distributed::expert_parallel_backward(s.block, s.x, dy, ws, g, s.dx);
    ADD_FAILURE() << "no exception on rank " << me;
  } catch (const moe::shape_error& e) {
    EXPECT_EQ(std::string(e.what()),
              moe::detail::concat("moe: dy has shape [2 x 16], expected [3 x 16] (on rank ", R - 1,
                                  " of ", R, ")"));
  }
  const RowMatrix<float> good = RowMatrix<float>::Ones(3, 16);
  moe::distributed::expert_parallel_backward(s.block, s.x, good, ws, g, s.dx);
  EXPECT_TRUE(s.dx.allFinite());
}

TEST(ExpertParallelBackward, ATokenMaskOnSomeRanksOnlyIsRefused) {
  const int R = ranks(), me = rank_of();
  if (R == 1) GTEST_SKIP() << "needs two ranks";
  Small s;
  ExpertParallelWorkspace<float> ws;
  ws.set_training(true);
  s.block.forward(s.x, s.y, ws);
  MoeGradients<float> g = moe::distributed::zero_gradients(s.block);
  const std::vector<double> mask(3, 1.0);
  LossCoefficients c;
  if (me == 0) c.token_mask = mask.data();
  EXPECT_THROW(
      {
        try {
          moe::distributed::expert_parallel_backward(s.block, s.x, s.x, ws, g, s.dx, c);
        } catch (const moe::config_error& e) {
          EXPECT_EQ(std::string(e.what()),
                    moe::detail::concat("moe: LossCoefficients::token_mask must be given on every "
                                        "rank with tokens or on none (on rank 0 of ",
                                        R, ")"));
          throw;
        }
      },
      moe::config_error);
}

}  // namespace
