// moe: what expert parallelism sends and keeps: exchange options and statistics, the per-thread
// workspace of ExpertParallelBlock (moe/distributed/mpi.hpp), MPI datatypes of rows.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moe/backward.hpp"
#include "moe/detail/buffer.hpp"
#include "moe/distributed/local_experts.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/float_formats.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/workspace.hpp"

#include <mpi.h>

namespace moe::distributed {

namespace detail {
struct BackwardAccess;
}  // namespace detail

/// How rows travel.
struct ExchangeOptions {
  /// Send token rows and expert outputs as bfloat16 (round to nearest even) instead of T: half the
  /// bytes of a float block. Results are then NOT bitwise those of the single-process block (the
  /// experts see rounded inputs, the combine rounded outputs: relative error ~2^-8 per value).
  bool bf16_rows = false;
};

/// What the last forward exchanged (this rank's view). "Remote" rows cross to another rank;
/// rows for this rank's own experts are copied locally and counted apart.
struct ExchangeStats {
  Index tokens = 0;           ///< this rank's tokens
  Index global_tokens = 0;    ///< tokens of all ranks
  Index remote_slots = 0;     ///< kept slots of this rank's tokens whose expert is elsewhere
  Index local_slots = 0;      ///< kept slots whose expert is on this rank
  Index received_rows = 0;    ///< rows other ranks sent to this rank's experts
  Index bytes_per_value = 0;  ///< bytes of one transported value (sizeof(T), or 2 for bf16)
  /// Bytes this rank's tokens sent out and got back: 2 * remote_slots * d_model * bytes_per_value
  /// (the formula 2 k d_model bytes_per_value per token, minus the slots routed locally).
  std::int64_t token_bytes = 0;
  /// Wall time of the last forward's exchanges (the count all-to-all and both row all-to-alls,
  /// waiting for slower ranks included), seconds.
  double exchange_seconds = 0;
};

/// Scratch and results of ExpertParallelBlock::forward, one per calling thread, grow-only: once
/// warm, a forward allocates nothing of ours (MPI and Eigen's GEMM may allocate internally).
template <class T>
class ExpertParallelWorkspace {
 public:
  using RouteS = RouteScalar<T>;
  /// The routing of this rank's tokens in the last forward ([tokens x slots], the same values as
  /// the single-process block gives for these rows of the concatenated batch).
  const Routing<RouteS>& routing() const { return whole_batch_ ? mine_ : local_.routing(); }
  const ExchangeStats& stats() const { return stats_; }
  /// Training mode: forward keeps what expert_parallel_backward needs (moe/distributed/
  /// backward.hpp): on the experts' ranks the received rows, pre-activations, activations and
  /// outputs of every local expert (the block's training buffers for these rows), on the
  /// tokens' rank the returned expert outputs and the shared expert's values.
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  std::size_t bytes() const {
    return local_.bytes() + global_.bytes() + mine_.bytes() + send_.bytes() + recv_.bytes() +
           x_rows_.bytes() + y_rows_.bytes() + back_.bytes() + shared_y_.bytes() +
           experts_.bytes() + gating_scratch_.bytes() + counts_.capacity() * sizeof(std::int64_t) +
           back_plan_.bytes() + expert_rows_.capacity() * sizeof(Index) +
           mpi_ints_.capacity() * sizeof(int) + backward_.bytes() + d_send_.bytes() +
           d_recv_.bytes() + token_mask_.bytes() + gather_ints_.capacity() * sizeof(int);
  }

 private:
  template <class, class, class, class>
  friend class ExpertParallelBlock;
  friend struct detail::BackwardAccess;

  Workspace<T> local_;        ///< the router's workspace (this rank's tokens)
  Routing<RouteS> global_;    ///< the whole batch's routing (batch-dependent families only)
  Routing<RouteS> mine_;      ///< this rank's rows of global_
  bool whole_batch_ = false;  ///< the last call routed the whole batch (mine_ holds the rows)
  moe::detail::GrowBuffer<unsigned char> send_, recv_;  ///< wire buffers (T or bf16 rows)
  moe::detail::GrowBuffer<T> x_rows_, y_rows_, back_, shared_y_;
  detail::LocalExpertScratch<T> experts_;
  std::vector<std::int64_t> counts_;  ///< tokens per rank, then exchange counts and offsets
  DispatchPlan back_plan_;          ///< slots and slot_row: [tokens x slots] row of a slot's result
  std::vector<int> mpi_ints_;       ///< Alltoallv counts and displacements
  std::vector<Index> expert_rows_;  ///< [local experts] rows, then [local experts + 1] offsets
  moe::detail::GrowBuffer<Index> gating_scratch_;  ///< [E] counters (whole-batch routing)
  ExchangeStats stats_;
  bool training_ = false;
  Index trained_tokens_ = -1;  ///< tokens of the last training-mode forward (-1: none)
  // The backward's scratch: its BackwardWorkspace buffers (d_rows_ holds the received output
  // gradients grouped by expert, then their input gradients; dlogits_ the whole batch's
  // [global tokens x E]), the output / input gradient rows in send order and as received, the
  // gathered token mask, Allgatherv counts.
  BackwardWorkspace<T> backward_;
  moe::detail::GrowBuffer<T> d_send_, d_recv_;
  moe::detail::GrowBuffer<double> token_mask_;
  std::vector<int> gather_ints_;
};

namespace detail {

template <class G>
bool routes_per_token(const G&) {
  return true;
}
inline bool routes_per_token(const gating::CapacityTopK& g) {
  return g.options.capacity == gating::CapacityTopK::Capacity::unlimited;
}
inline bool routes_per_token(const gating::ExpertChoice&) { return false; }

template <class V>
MPI_Datatype mpi_type() {
  if constexpr (sizeof(V) == 2) return MPI_UINT16_T;
  if constexpr (sizeof(V) == 4) return MPI_FLOAT;
  if constexpr (sizeof(V) == 8) return MPI_DOUBLE;
}

/// A contiguous MPI datatype of n values of V, freed with the guard.
struct RowType {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  RowType(int n, MPI_Datatype value) {
    MPI_Type_contiguous(n, value, &type);
    MPI_Type_commit(&type);
  }
  ~RowType() { MPI_Type_free(&type); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
};

/// The exchange plan of a forward in ExpertParallelWorkspace::counts_, for R ranks and at most L
/// experts per rank: [R] tokens per rank | [R*L] rows sent per (destination, its local expert) |
/// [R*L] received per (source, local expert) | [R*L + 1] send offsets | [R*L + 1] receive
/// offsets | [L + 1] offsets of each local expert's grouped rows | [R*L] next free send row.
/// The backward reads the forward's plan through the same view.
struct ExchangePlan {
  std::int64_t *tokens_of, *sent, *recvd, *send_off, *recv_off, *expert_off, *fill;
  static std::size_t size(int R, Index L) {
    return std::size_t(R) + 5 * std::size_t(R * L) + 2 + std::size_t(L) + 1;
  }
  ExchangePlan(std::int64_t* c, int R, Index L) {
    const std::size_t RL = static_cast<std::size_t>(R * L);
    tokens_of = c;
    sent = tokens_of + R;
    recvd = sent + RL;
    send_off = recvd + RL;
    recv_off = send_off + RL + 1;
    expert_off = recv_off + RL + 1;
    fill = expert_off + L + 1;
  }
  /// f(wire row, grouped row, rows) for each block of received rows, in grouped order: local
  /// expert 0's rows from rank 0, rank 1, ..., then local expert 1's, ...
  template <class F>
  void for_each_received_block(int R, Index L, Index num_local, F&& f) const {
    for (Index i = 0; i < num_local; ++i) {
      std::int64_t at = expert_off[i];
      for (int r = 0; r < R; ++r) {
        const std::int64_t n = recvd[r * L + i];
        f(recv_off[r * L + i], at, n);
        at += n;
      }
    }
  }
};

inline int to_int(std::int64_t v, const char* what) {
  if (v > INT_MAX) {
    throw config_error(
        moe::detail::concat("moe: ", what, " = ", v, " exceeds MPI's int count limit ", INT_MAX));
  }
  return static_cast<int>(v);
}

}  // namespace detail

}  // namespace moe::distributed
