// moe: expert parallelism over MPI: one sparse MoE layer whose routed experts are spread over the
// ranks of a communicator; tokens travel to their experts and back through MPI_Alltoallv.
// Opt-in (not in moe/moe.hpp): link the CMake target moe::mpi, which exists when CMake finds MPI.
#pragma once

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe/block.hpp"
#include "moe/distributed/agree.hpp"
#include "moe/distributed/exchange.hpp"
#include "moe/distributed/local_experts.hpp"
#include "moe/distributed/placement.hpp"

#include <mpi.h>

namespace moe::distributed {

/// An expert-parallel sparse MoE layer: the same math as SparseMoeBlock<T, Gating, Ffn, Storage>
/// on the concatenation of every rank's tokens (rank order), with each routed expert stored on
/// one rank only. The router, its bias, the shared expert and its gate are replicated.
///
/// forward() on this rank's tokens (collective: every rank calls it, with 0 tokens if it has
/// none): route locally (batch-dependent families, i.e. CapacityTopK with a capacity and
/// ExpertChoice, route the whole batch on every rank from all-gathered logits, identically, so
/// capacity is global); MPI_Alltoall of the rows per (destination, expert); MPI_Alltoallv of the
/// token rows, packed per destination by expert then token; the receiving rank groups the rows of
/// each of its experts in source-rank then token order, i.e. in global token order, which is the
/// order of the single-process plan, runs them through the block's FFN tasks, and sends the
/// results back the same way; the token's rank combines them with its routing weights in slot
/// order and adds the shared expert. No routing weight travels: the combine stays with the token.
///
/// Bitwise equal to SparseMoeBlock on the concatenated batch, for every family and storage, with
/// one exception: the shared expert runs on this rank's tokens, so it matches bitwise only while
/// the single-process block runs it on the streaming kernel for the whole batch (at most 16
/// tokens, or tokens * d_model * sizeof(T) <= 768 KiB: every decode step); above, Eigen's GEMM
/// rounds a row differently at different positions in the batch (a few ulp).
/// Training: forward with ws.set_training(true), then expert_parallel_backward
/// (moe/distributed/backward.hpp; native storage).
template <class T, class Gating = gating::Mixtral, class Ffn = SwiGLU,
          class Storage = NativeExperts>
class ExpertParallelBlock {
  static_assert(is_storage_policy_v<Storage>,
                "moe: ExpertParallelBlock's fourth argument must be NativeExperts or "
                "CompactExperts<Format>");
  static constexpr bool compact = Storage::compact;
  static_assert(!compact || std::is_same_v<T, float>, "moe: compact expert storage needs float");

 public:
  using Scalar = T;
  using RouteS = RouteScalar<T>;
  using Options = typename Gating::Options;
  using SingleProcessBlock = SparseMoeBlock<T, Gating, Ffn, Storage>;
  /// This rank's experts as stored: ExpertStack<T>, or CompactExpertStack<Format>.
  using LocalStack = typename Storage::template stack<T>;

  /// Collective. `weights` holds the replicated tensors (router, bias, shared expert and gate) and
  /// in weights.experts ONLY this rank's experts, placement.experts_of(rank) in that order (an
  /// empty ExpertStack when the rank holds none). Compact storage quantises them here, as
  /// SparseMoeBlock does. Every rank validates; the ranks then agree (agree()): when any rank's
  /// input is wrong, every rank throws that rank's error, e.g. "moe: this rank holds 3 experts
  /// by the placement, weights.experts has 2 (on rank 1 of 2)"; also when the ranks disagree on
  /// the config or the placement ("moe: ranks disagree on the config or the placement").
  ExpertParallelBlock(MPI_Comm comm, const MoeConfig& config, ExpertPlacement placement,
                      MoeWeights<T> weights, Options options = {}, ExchangeOptions exchange = {})
      : comm_(comm),
        config_(config),
        placement_(std::move(placement)),
        weights_(std::move(weights)),
        router_(Gating(options)),
        exchange_(exchange) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &num_ranks_);
    agree(comm_, [&] {
      config_.validate();
      router_.gating().validate(config_);
      if (placement_.num_experts() != config_.num_experts) {
        throw config_error(moe::detail::concat("moe: the placement covers ",
                                               placement_.num_experts(), " experts, the config ",
                                               config_.num_experts));
      }
      if (placement_.num_ranks() != num_ranks_) {
        throw config_error(moe::detail::concat("moe: the placement is for ", placement_.num_ranks(),
                                               " ranks, the communicator has ", num_ranks_));
      }
      const Index mine = static_cast<Index>(placement_.experts_of(rank_).size());
      const ExpertStack<T>& ex = weights_.experts;
      if (ex.num_experts() != mine) {
        throw config_error(moe::detail::concat("moe: this rank holds ", mine,
                                               " experts by the placement, weights.experts has ",
                                               ex.num_experts()));
      }
      if (mine > 0 && (ex.d_model() != config_.d_model || ex.d_ff() != config_.d_ff ||
                       ex.gated() != Ffn::gated)) {
        throw shape_error(moe::detail::concat(
            "moe: local experts have d_model ", ex.d_model(), ", d_ff ", ex.d_ff(),
            (ex.gated() ? " (gated)" : " (plain)"), ", expected d_model ", config_.d_model,
            ", d_ff ", config_.d_ff, (Ffn::gated ? " (gated)" : " (plain)")));
      }
      weights_.validate(config_, Ffn::gated, Gating::uses_bias, Gating::uses_noise,
                        /*check_experts=*/false);
    });
    check_same_everywhere();
    const ExpertStack<T>& ex = weights_.experts;
    if constexpr (compact) {
      experts_ = LocalStack::from(ex);
      weights_.experts = ExpertStack<T>();
    } else {
      experts_ = ex.num_experts() > 0
                     ? std::move(weights_.experts)
                     : ExpertStack<T>(0, config_.d_model, config_.d_ff, Ffn::gated);
    }
  }

  const MoeConfig& config() const { return config_; }
  const ExpertPlacement& placement() const { return placement_; }
  MPI_Comm communicator() const { return comm_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  /// This rank's experts as stored (placement().experts_of(rank()) in order).
  const LocalStack& local_experts() const { return experts_; }
  /// Resident bytes of this rank's experts.
  std::size_t expert_bytes() const { return experts_.bytes(); }
  /// The replicated tensors (router, its bias and noise weight, shared expert and gate);
  /// experts is empty (local_experts() holds this rank's).
  const MoeWeights<T>& replicated_weights() const { return weights_; }
  const Gating& gating() const { return router_.gating(); }
  const ExchangeOptions& exchange_options() const { return exchange_; }

  /// y = MoE(x) for this rank's tokens x [tokens x d_model] (row-major; tokens may be 0) into
  /// caller-owned y [tokens x d_model]. Collective over the communicator. Throws (on every rank,
  /// agreed) shape_error when any rank's x or y has the wrong shape; a failure after the
  /// exchange has begun (out of memory)
  /// aborts the job with the message (or_abort) rather than leave ranks waiting.
  template <class XDerived>
  void forward(const Eigen::DenseBase<XDerived>& x, MatrixMut<T> y, ExpertParallelWorkspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>,
                  "moe: x must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
    static_assert(std::is_same_v<typename XDerived::Scalar, T>, "moe: x has the wrong scalar");
    const MatrixRef<T> xr(x.derived());
    agree(comm_, [&] {
      moe::detail::check_shape("x", xr.rows(), xr.cols(), xr.rows(), config_.d_model);
      moe::detail::check_shape("y", y.rows(), y.cols(), xr.rows(), config_.d_model);
      if (compact && ws.training_) {
        throw config_error(
            "moe: training needs native expert storage (compact experts infer only)");
      }
    });
    or_abort(comm_, [&] { forward_impl(xr, y, ws, executor); });
  }

 private:
  /// One all-reduce: every rank must hold the same config, gating scalars and placement.
  void check_same_everywhere() const {
    std::uint64_t h = 1469598103934665603ull;
    auto mix = [&](std::int64_t v) { h = (h ^ static_cast<std::uint64_t>(v)) * 1099511628211ull; };
    mix(config_.d_model), mix(config_.d_ff), mix(config_.num_experts), mix(config_.top_k);
    mix(config_.shared_d_ff), mix(config_.shared_expert_gate), mix(exchange_.bf16_rows);
    mix(static_cast<std::int64_t>(sizeof(T)));
    for (int o : placement_.owners()) mix(o);
    std::uint64_t lo = h, hi = h;
    MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, comm_);
    MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, comm_);
    if (lo != hi) throw config_error("moe: ranks disagree on the config or the placement");
  }

  /// Routes this rank's tokens (per-token families) or the whole batch (the others).
  void route(const MatrixRef<T>& x, Index offset, Index total, const std::int64_t* tokens_of,
             ExpertParallelWorkspace<T>& ws) const {
    router_.route(config_, x, weights_, ws.local_);
    if (detail::routes_per_token(router_.gating())) {
      ws.whole_batch_ = false;
      return;
    }
    const Index E = config_.num_experts, T_mine = x.rows(), slots = router_.gating().slots(config_);
    ws.global_.resize(total, E, slots);
    detail::RowType logit_row(static_cast<int>(E), detail::mpi_type<RouteS>());
    std::vector<int>& ints = ws.mpi_ints_;
    ints.assign(2 * static_cast<std::size_t>(num_ranks_), 0);
    for (int r = 0, at = 0; r < num_ranks_; ++r) {
      ints[std::size_t(r)] = detail::to_int(tokens_of[r], "tokens of a rank");
      ints[std::size_t(num_ranks_ + r)] = at;
      at += ints[std::size_t(r)];
    }
    MPI_Allgatherv(ws.local_.routing().logits().data(), static_cast<int>(T_mine), logit_row.type,
                   ws.global_.logits().data(), ints.data(), ints.data() + num_ranks_,
                   logit_row.type, comm_);
    RouteContext<RouteS> ctx;
    ctx.scratch = ws.gating_scratch_.ensure(E);
    ctx.scratch_size = E;
    if constexpr (Gating::uses_bias) ctx.selection_bias = weights_.router_bias.data();
    router_.gating().route(config_, ctx, ws.global_);
    Routing<RouteS>& mine = ws.mine_;
    mine.resize(T_mine, E, slots);
    auto copy_rows = [&](auto src, auto dst) {
      if (T_mine > 0) dst = src.middleRows(offset, T_mine);
    };
    copy_rows(ws.global_.logits(), mine.logits());
    copy_rows(ws.global_.scores(), mine.scores());
    copy_rows(ws.global_.experts(), mine.experts());
    copy_rows(ws.global_.weights(), mine.weights());
    copy_rows(ws.global_.kept(), mine.kept());
    ws.whole_batch_ = true;
  }

  void forward_impl(const MatrixRef<T>& x, MatrixMut<T> y, ExpertParallelWorkspace<T>& ws,
                    const Executor& executor) const {
    const int R = num_ranks_;
    const Index d = config_.d_model, T_mine = x.rows(), L = placement_.max_local();
    const Index num_local = static_cast<Index>(placement_.experts_of(rank_).size());
    // The plan lives in counts_ (grow-only: assign reuses the capacity); the backward reads it.
    std::vector<std::int64_t>& c = ws.counts_;
    const std::size_t RL = static_cast<std::size_t>(R * L);
    c.assign(detail::ExchangePlan::size(R, L), 0);
    const detail::ExchangePlan plan(c.data(), R, L);
    std::int64_t* tokens_of = plan.tokens_of;
    std::int64_t* sent = plan.sent;
    std::int64_t* recvd = plan.recvd;
    std::int64_t* send_off = plan.send_off;
    std::int64_t* recv_off = plan.recv_off;
    std::int64_t* expert_off = plan.expert_off;
    std::int64_t* fill = plan.fill;

    const std::int64_t mine = T_mine;
    MPI_Allgather(&mine, 1, MPI_INT64_T, tokens_of, 1, MPI_INT64_T, comm_);
    Index offset = 0, total = 0;
    for (int r = 0; r < R; ++r) {
      if (r < rank_) offset += tokens_of[r];
      total += tokens_of[r];
    }
    route(x, offset, total, tokens_of, ws);
    const Routing<RouteS>& routing = ws.routing();
    const Index slots = routing.slots();
    const auto experts = routing.experts();
    const auto kept = routing.kept();

    // Send plan: rows ordered by (destination rank, its local expert, token).
    for (Index t = 0; t < T_mine; ++t) {
      for (Index j = 0; j < slots; ++j) {
        if (!kept(t, j)) continue;
        const Index e = experts(t, j);
        ++sent[placement_.owner(e) * L + placement_.local_index(e)];
      }
    }
    for (std::size_t i = 0; i < RL; ++i) send_off[i + 1] = send_off[i] + sent[i];
    const Index num_send = send_off[RL];
    DispatchPlan& back_plan = ws.back_plan_;  // slot -> row of the returned results
    back_plan.num_tokens = T_mine;
    back_plan.slots = slots;
    if (back_plan.slot_row.size() < static_cast<std::size_t>(T_mine * slots)) {
      back_plan.slot_row.resize(static_cast<std::size_t>(T_mine * slots));
    }
    std::copy(send_off, send_off + RL, fill);
    for (Index t = 0; t < T_mine; ++t) {
      for (Index j = 0; j < slots; ++j) {
        Index& row = back_plan.slot_row[static_cast<std::size_t>(t * slots + j)];
        row = -1;
        if (!kept(t, j)) continue;
        const Index e = experts(t, j);
        row = fill[placement_.owner(e) * L + placement_.local_index(e)]++;
      }
    }
    using Clock = std::chrono::steady_clock;
    auto t0 = Clock::now();
    MPI_Alltoall(sent, static_cast<int>(L), MPI_INT64_T, recvd, static_cast<int>(L), MPI_INT64_T,
                 comm_);
    double exchange = std::chrono::duration<double>(Clock::now() - t0).count();
    for (std::size_t i = 0; i < RL; ++i) recv_off[i + 1] = recv_off[i] + recvd[i];
    const Index num_recv = recv_off[RL];
    for (Index i = 0; i < num_local; ++i) {
      std::int64_t rows = 0;
      for (int r = 0; r < R; ++r) rows += recvd[r * L + i];
      expert_off[i + 1] = expert_off[i] + rows;
    }

    // Wire format: rows of d values of T, or of bf16.
    const bool bf16 = exchange_.bf16_rows;
    const std::size_t value_bytes = bf16 ? 2 : sizeof(T);
    const std::size_t row_bytes = static_cast<std::size_t>(d) * value_bytes;
    detail::RowType wire_row(static_cast<int>(d), bf16 ? MPI_UINT16_T : detail::mpi_type<T>());
    auto encode = [&](const T* src, unsigned char* dst) {
      if (bf16) {
        for (Index i = 0; i < d; ++i) {
          const std::uint16_t b = kernels::float_to_bf16(static_cast<float>(src[i]));
          std::memcpy(dst + 2 * i, &b, 2);
        }
      } else {
        std::memcpy(dst, src, row_bytes);
      }
    };
    auto decode = [&](const unsigned char* src, T* dst) {
      if (bf16) {
        for (Index i = 0; i < d; ++i) {
          std::uint16_t b;
          std::memcpy(&b, src + 2 * i, 2);
          dst[i] = static_cast<T>(kernels::bf16_to_float(b));
        }
      } else {
        std::memcpy(dst, src, row_bytes);
      }
    };
    unsigned char* send =
        ws.send_.ensure(static_cast<Index>(std::max(num_send, num_recv) * row_bytes));
    unsigned char* recv =
        ws.recv_.ensure(static_cast<Index>(std::max(num_send, num_recv) * row_bytes));
    for (Index t = 0; t < T_mine; ++t) {
      for (Index j = 0; j < slots; ++j) {
        const Index row = back_plan.slot_row[static_cast<std::size_t>(t * slots + j)];
        if (row >= 0) encode(x.data() + t * x.outerStride(), send + row * row_bytes);
      }
    }
    // Per-rank counts and displacements in rows: send [0, 2R), receive [2R, 4R).
    std::vector<int>& ints = ws.mpi_ints_;
    ints.assign(4 * static_cast<std::size_t>(R), 0);
    int* scount = ints.data();
    int* sdispl = scount + R;
    int* rcount = sdispl + R;
    int* rdispl = rcount + R;
    for (int r = 0; r < R; ++r) {
      scount[r] = detail::to_int(send_off[(r + 1) * L] - send_off[r * L], "rows to one rank");
      sdispl[r] = detail::to_int(send_off[r * L], "rows sent");
      rcount[r] = detail::to_int(recv_off[(r + 1) * L] - recv_off[r * L], "rows from one rank");
      rdispl[r] = detail::to_int(recv_off[r * L], "rows received");
    }
    t0 = Clock::now();
    MPI_Alltoallv(send, scount, sdispl, wire_row.type, recv, rcount, rdispl, wire_row.type, comm_);
    exchange += std::chrono::duration<double>(Clock::now() - t0).count();

    // Group the received rows by expert: expert i's rows from rank 0, then rank 1, ...
    T* x_rows = ws.x_rows_.ensure(num_recv * d);
    T* y_rows = ws.y_rows_.ensure(num_recv * d);
    auto for_each_block = [&](auto&& f) { plan.for_each_received_block(R, L, num_local, f); };
    for_each_block([&](std::int64_t wire, std::int64_t grouped, std::int64_t n) {
      for (std::int64_t k = 0; k < n; ++k)
        decode(recv + (wire + k) * row_bytes, x_rows + (grouped + k) * d);
    });
    std::vector<Index>& expert_rows = ws.expert_rows_;
    expert_rows.assign(2 * static_cast<std::size_t>(num_local) + 1, 0);
    Index* counts = expert_rows.data();
    Index* offs = counts + num_local;
    for (Index i = 0; i < num_local; ++i) {
      counts[i] = expert_off[i + 1] - expert_off[i];
      offs[i] = expert_off[i];
    }
    offs[num_local] = expert_off[num_local];
    const bool has_shared = config_.shared_d_ff > 0;
    T* shared_y = has_shared ? ws.shared_y_.ensure(T_mine * d) : nullptr;
    detail::run_local_experts<Ffn>(experts_, counts, offs, x_rows, y_rows, weights_.shared, x,
                                   shared_y, ws.experts_, ws.training_, executor);

    // Results travel back the same way, in the order they came.
    for_each_block([&](std::int64_t wire, std::int64_t grouped, std::int64_t n) {
      for (std::int64_t k = 0; k < n; ++k)
        encode(y_rows + (grouped + k) * d, recv + (wire + k) * row_bytes);
    });
    t0 = Clock::now();
    MPI_Alltoallv(recv, rcount, rdispl, wire_row.type, send, scount, sdispl, wire_row.type, comm_);
    exchange += std::chrono::duration<double>(Clock::now() - t0).count();
    T* back = ws.back_.ensure(num_send * d);
    for (Index r = 0; r < num_send; ++r) decode(send + r * row_bytes, back + r * d);

    // Combine per token in slot order, then the shared expert: the block's own combine.
    const T* shared_scale = has_shared
                                ? detail::shared_scales(x, weights_.shared_gate,
                                                        config_.shared_expert_gate, ws.experts_)
                                : nullptr;
    combine_expert_outputs(back_plan, routing.weights(), back, shared_y, shared_scale, y, executor);

    ws.trained_tokens_ = ws.training_ ? T_mine : -1;
    ExchangeStats& s = ws.stats_;
    s.tokens = T_mine;
    s.global_tokens = total;
    s.local_slots = send_off[(rank_ + 1) * L] - send_off[rank_ * L];
    s.remote_slots = num_send - s.local_slots;
    s.received_rows = num_recv - (recv_off[(rank_ + 1) * L] - recv_off[rank_ * L]);
    s.bytes_per_value = static_cast<Index>(value_bytes);
    s.exchange_seconds = exchange;
    s.token_bytes =
        2 * static_cast<std::int64_t>(s.remote_slots) * static_cast<std::int64_t>(row_bytes);
  }

  MPI_Comm comm_;
  int rank_ = 0, num_ranks_ = 1;
  MoeConfig config_;
  ExpertPlacement placement_;
  MoeWeights<T> weights_;  ///< replicated tensors (experts moved out)
  Router<T, Gating> router_;
  ExchangeOptions exchange_;
  LocalStack experts_;
};

}  // namespace moe::distributed
