// Helpers of the MPI tests (tests/mpi): ranks, how a global batch is cut into the ranks' slices,
// the placements every case runs with, a rank's shard of full weights, seeded random data.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moe/distributed/placement.hpp"
#include "moe/weights.hpp"

#include <mpi.h>

namespace moe::mpi_test {

using moe::Index;
using moe::MoeConfig;
using moe::MoeWeights;
using moe::RowMatrix;
using moe::distributed::ExpertPlacement;

inline int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int ranks() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

/// How the global batch is cut into the ranks' slices (rank order = token order).
enum class Split { even, ramp, last_only };
inline const char* split_name(Split s) {
  return s == Split::even ? "even" : s == Split::ramp ? "ramp" : "last_only";
}

/// Tokens of every rank: even (differ by at most one), ramp (rank r gets weight r: rank 0 is
/// empty whenever there are 2+ ranks), last_only (every token on the last rank).
inline std::vector<Index> split_tokens(Index total, int R, Split s) {
  std::vector<Index> n(static_cast<std::size_t>(R), 0);
  if (s == Split::last_only) {
    n.back() = total;
    return n;
  }
  Index weight_sum = 0;
  for (int r = 0; r < R; ++r) weight_sum += s == Split::even ? 1 : (R == 1 ? 1 : r);
  Index given = 0;
  for (int r = 0; r < R; ++r) {
    const Index w = s == Split::even ? 1 : (R == 1 ? 1 : r);
    n[std::size_t(r)] = total * w / weight_sum;
    given += n[std::size_t(r)];
  }
  for (int r = R - 1; given < total; r = (r + R - 1) % R) {
    if (s == Split::ramp && R > 1 && r == 0) continue;
    ++n[std::size_t(r)], ++given;
  }
  return n;
}

/// The placements every case runs with: contiguous, round robin, and an uneven explicit map
/// (every expert on the last rank but expert 0 on rank 0 and expert 1 on rank 1 when R > 2, so
/// rank 2 of 4 holds nothing).
inline std::vector<std::pair<std::string, ExpertPlacement>> placements(Index E, int R) {
  std::vector<int> owner(static_cast<std::size_t>(E), R - 1);
  owner[0] = 0;
  if (E > 1 && R > 2) owner[1] = 1;
  return {{"contiguous", ExpertPlacement::contiguous(E, R)},
          {"round_robin", ExpertPlacement::round_robin(E, R)},
          {"uneven_map", ExpertPlacement::from_map(owner, R)}};
}

/// This rank's share of full weights: the replicated tensors, and its experts in order.
template <class T>
MoeWeights<T> shard(const MoeWeights<T>& full, const ExpertPlacement& p, int rank) {
  MoeWeights<T> w;
  w.router = full.router;
  w.router_bias = full.router_bias;
  w.router_noise = full.router_noise;
  w.shared = full.shared;
  w.shared_gate = full.shared_gate;
  const auto& mine = p.experts_of(rank);
  const auto& ex = full.experts;
  w.experts =
      moe::ExpertStack<T>(static_cast<Index>(mine.size()), ex.d_model(), ex.d_ff(), ex.gated());
  for (std::size_t i = 0; i < mine.size(); ++i) {
    w.experts.w_in(Index(i)) = ex.w_in(mine[i]);
    w.experts.w_out(Index(i)) = ex.w_out(mine[i]);
  }
  return w;
}

template <class T>
bool same_bits(const RowMatrix<T>& a, const RowMatrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

template <class T>
RowMatrix<T> random_matrix(Index rows, Index cols, std::mt19937& rng, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

template <class T>
MoeWeights<T> random_weights(const MoeConfig& c, bool gated, bool bias, bool noise,
                             std::uint32_t seed) {
  std::mt19937 rng(seed);
  auto w = MoeWeights<T>::zeros(c, gated, bias, noise);
  const double s = 1.0 / std::sqrt(static_cast<double>(c.d_model));
  w.router = random_matrix<T>(c.num_experts, c.d_model, rng, 1.0);
  if (bias) w.router_bias = random_matrix<T>(c.num_experts, 1, rng, 0.1);
  if (noise) w.router_noise = random_matrix<T>(c.num_experts, c.d_model, rng, s);
  w.experts.stacked_in() = random_matrix<T>(w.experts.stacked_in().rows(), c.d_model, rng, s);
  w.experts.stacked_out() = random_matrix<T>(w.experts.stacked_out().rows(), c.d_ff, rng, s);
  if (c.shared_d_ff > 0) {
    w.shared.stacked_in() = random_matrix<T>(w.shared.stacked_in().rows(), c.d_model, rng, s);
    w.shared.stacked_out() = random_matrix<T>(c.d_model, c.shared_d_ff, rng, s);
    if (c.shared_expert_gate) w.shared_gate = random_matrix<T>(1, c.d_model, rng, s);
  }
  return w;
}

/// The awkward sizes the MPI tests sweep: tokens 1, 7, 31, 129; d_model 7 and 31; one expert.
struct Sizes {
  Index d_model, d_ff, num_experts, top_k, tokens;
};
inline const Sizes kSizes[] = {
    {7, 5, 7, 2, 1}, {31, 9, 7, 3, 7}, {16, 24, 9, 2, 129}, {8, 4, 1, 1, 31}};

inline MoeConfig config_of(const Sizes& s, Index shared_d_ff = 0, bool shared_gate = false) {
  MoeConfig c;
  c.d_model = s.d_model, c.d_ff = s.d_ff, c.num_experts = s.num_experts, c.top_k = s.top_k;
  c.shared_d_ff = shared_d_ff, c.shared_expert_gate = shared_gate;
  return c;
}

inline std::string label(const char* family, const Sizes& s) {
  return moe::detail::concat(family, " d", s.d_model, " f", s.d_ff, " E", s.num_experts, " k",
                             s.top_k, " T", s.tokens);
}

/// First token of this rank's slice.
inline Index offset_of(const std::vector<Index>& n, int rank) {
  Index offset = 0;
  for (int r = 0; r < rank; ++r) offset += n[std::size_t(r)];
  return offset;
}

}  // namespace moe::mpi_test
