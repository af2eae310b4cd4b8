// moe: the per-thread scratch of a forward (and backward) call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>

#include "moe/config.hpp"
#include "moe/detail/buffer.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe {

template <class T>
class Workspace;

namespace detail {
struct WorkspaceAccess;
}  // namespace detail

/// Every buffer a forward call needs, grow-only: after the first call with the largest batch, a
/// forward performs no heap allocation of ours. One workspace per calling thread; the block itself
/// is immutable and shared.
///
/// After forward() the workspace holds the routing of the call (`routing()`, `plan()`, `stats()`),
/// and, in training mode, everything backward() needs.
///
/// Memory, with N = executed assignments (T * top_k without drops), I = in_rows (2 d_ff gated),
/// Is = the shared expert's in_rows, elements of T:
///   N * (d_model [gathered x] + I [hidden] + d_model [expert outputs])
///   + T * E * 2 (logits, scores) + T * top_k * (2 + 1 byte) (indices, weights, kept)
///   + T * (Is + d_model + 1) with a shared expert
///   + (E + 2) indices (the task table of the expert phases)
///   + training only: N * d_ff [activations kept for backward] + T * shared d_ff
///   + compact expert storage, only when an expert gets more than kernels::small_batch_rows
///     (16) rows (prefill): workers * 256 * max(d_model, d_ff) floats (one decoded weight tile
///     per executor worker; 3.5 MiB per worker for d_ff 3584, 14 MiB for Mixtral-8x7B)
///   + fast Q8 / Q4 / Mxfp4 experts: N * 1.25 * (d_model + d_ff) bytes (the rows' x and
///     activations as int8 codes with their block sums and scales).
///
/// A server sizes it once with reserve() (or SparseMoeBlock::reserve, which knows the gating and
/// the storage); forwards of at most that many tokens then allocate nothing of ours. The
/// buffers are private; library layers reach them through detail::WorkspaceAccess.
template <class T>
class Workspace {
 public:
  using RouteS = RouteScalar<T>;

  /// The routing of the last forward call.
  const Routing<RouteS>& routing() const { return routing_; }
  /// The dispatch plan of the last forward call (counts, offsets, permutation).
  const DispatchPlan& plan() const { return plan_; }
  /// Routing statistics of the last forward call.
  const RoutingStats& stats() const { return stats_; }

  /// Training mode: noisy gating draws noise, and the forward keeps the activations the backward
  /// pass reads. Off by default (inference).
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  /// The generator noisy top-k draws from; seed it for reproducible training runs.
  std::mt19937_64& rng() { return rng_; }

  /// The token ids of the next forward call's x ([num_tokens], not copied: valid until that call
  /// returns), for policies that route by token id (DeepSeek-V4 hash layers); null: none.
  void set_token_ids(const std::int64_t* ids, Index num_tokens) {
    token_ids_ = ids;
    num_token_ids_ = num_tokens;
  }
  const std::int64_t* token_ids() const { return token_ids_; }
  Index num_token_ids() const { return num_token_ids_; }

  /// Bytes currently held by the workspace (the formula in the class comment, after growth).
  std::size_t bytes() const {
    return routing_.bytes() + plan_.bytes() + x_rows_.bytes() + hidden_.bytes() + act_.bytes() +
           y_rows_.bytes() + noise_.bytes() + shared_hidden_.bytes() + shared_act_.bytes() +
           shared_y_.bytes() + shared_gate_.bytes() + gating_scratch_.bytes() +
           task_begin_.bytes() + compact_scratch_.bytes();
  }

  /// Sizes every buffer for forward calls of up to max_tokens tokens through blocks with this
  /// config, top-k routing (slots = top_k), fp32 experts (gated or plain) and up to num_workers
  /// executor workers; in training mode (set_training(true) first) the training buffers too.
  /// After it, such forwards allocate nothing of ours (Eigen's GEMM may still allocate its
  /// packing buffers above 16 rows per expert). Grow-only: never shrinks. The last call's
  /// routing is kept. Throws config_error (config.validate()) and on max_tokens < 0 or
  /// num_workers < 1. For other gatings (expert choice) or compact experts use
  /// SparseMoeBlock::reserve.
  void reserve(const MoeConfig& config, Index max_tokens, Index num_workers = 1) {
    reserve_for(config, max_tokens, num_workers, config.top_k, 0);
  }

 private:
  friend struct detail::WorkspaceAccess;

  // slots: routing slots per token (N <= max_tokens * slots); decode_floats: per-worker compact
  // decode scratch; prepared_floats: the fast compact modes' converted inputs (after it).
  void reserve_for(const MoeConfig& config, Index max_tokens, Index num_workers, Index slots,
                   Index decode_floats, Index prepared_floats = 0) {
    config.validate();
    if (max_tokens < 0) {
      throw config_error(
          detail::concat("moe: reserve: max_tokens = ", max_tokens, " must be >= 0"));
    }
    if (num_workers < 1) {
      throw config_error(
          detail::concat("moe: reserve: num_workers = ", num_workers, " must be >= 1"));
    }
    const Index Tn = max_tokens, E = config.num_experts, d = config.d_model;
    const Index N = Tn * slots, in = 2 * config.d_ff, in_s = 2 * config.shared_d_ff;
    const Index kept_tokens = routing_.num_tokens(), kept_experts = routing_.num_experts(),
                kept_slots = routing_.slots();
    routing_.resize(Tn, E, slots);
    routing_.resize(kept_tokens, kept_experts, kept_slots);
    plan_.reserve(Tn, E, slots);
    stats_.tokens_per_expert.reserve(static_cast<std::size_t>(E));
    x_rows_.ensure(N * d);
    hidden_.ensure(N * in);
    y_rows_.ensure(N * d);
    gating_scratch_.ensure(E);
    task_begin_.ensure(E + (config.shared_d_ff > 0 ? 1 : 0) + 1);
    if (config.shared_d_ff > 0) {
      shared_hidden_.ensure(Tn * in_s);
      shared_y_.ensure(Tn * d);
      shared_gate_.ensure(Tn);
    }
    if (training_) {
      act_.ensure(N * config.d_ff);
      noise_.ensure(2 * Tn * E);
      if (config.shared_d_ff > 0) shared_act_.ensure(Tn * config.shared_d_ff);
    }
    if (decode_floats > 0 || prepared_floats > 0) {
      compact_scratch_.ensure(num_workers * decode_floats + prepared_floats);
    }
  }

  Routing<RouteS> routing_;
  DispatchPlan plan_;
  RoutingStats stats_;
  detail::GrowBuffer<T> x_rows_;      ///< [N x d_model] gathered inputs
  detail::GrowBuffer<T> hidden_;      ///< [N x I] x * w_in^T (pre-activation)
  detail::GrowBuffer<T> act_;         ///< [N x d_ff] activations (training only)
  detail::GrowBuffer<T> y_rows_;      ///< [N x d_model] expert outputs before weighting
  detail::GrowBuffer<RouteS> noise_;  ///< [2 x T x E] noise logits, then draws (noisy top-k)
  /// [E] gating counters / flags (RouteContext::scratch)
  detail::GrowBuffer<Index> gating_scratch_;
  detail::GrowBuffer<T> shared_hidden_;  ///< [T x Is]
  detail::GrowBuffer<T> shared_act_;     ///< [T x shared d_ff] (training only)
  detail::GrowBuffer<T> shared_y_;       ///< [T x d_model] shared expert output before gating
  detail::GrowBuffer<T> shared_gate_;    ///< [T] sigmoid gate of the shared expert
  detail::GrowBuffer<T> latent_;         ///< [T x 2 L] latent inputs and routed sums (Nemotron-H)
  /// [E + 2] first task of each FFN job of one phase (block.hpp, detail::run_ffn_jobs)
  detail::GrowBuffer<Index> task_begin_;
  /// [workers x 256 max(d_model, d_ff)] decoded weight tiles (compact storage, prefill only)
  detail::GrowBuffer<T> compact_scratch_;

  bool training_ = false;
  const std::int64_t* token_ids_ = nullptr;
  Index num_token_ids_ = 0;
  std::mt19937_64 rng_{0x5eed};
};

namespace detail {

/// The one door of library code (block, router, dense FFN, backward, distributed layers) to a
/// workspace's buffers; tests use it too. Not part of the stable API: names and layouts follow
/// the implementation. Each accessor returns the buffer of the same name (Workspace's members).
struct WorkspaceAccess {
  template <class T>
  static auto& routing(Workspace<T>& ws) {
    return ws.routing_;
  }
  template <class T>
  static const auto& routing(const Workspace<T>& ws) {
    return ws.routing_;
  }
  template <class T>
  static auto& plan(Workspace<T>& ws) {
    return ws.plan_;
  }
  template <class T>
  static const auto& plan(const Workspace<T>& ws) {
    return ws.plan_;
  }
  template <class T>
  static auto& stats(Workspace<T>& ws) {
    return ws.stats_;
  }
  template <class T>
  static const auto& stats(const Workspace<T>& ws) {
    return ws.stats_;
  }
  template <class T>
  static auto& x_rows(Workspace<T>& ws) {
    return ws.x_rows_;
  }
  template <class T>
  static const auto& x_rows(const Workspace<T>& ws) {
    return ws.x_rows_;
  }
  template <class T>
  static auto& hidden(Workspace<T>& ws) {
    return ws.hidden_;
  }
  template <class T>
  static const auto& hidden(const Workspace<T>& ws) {
    return ws.hidden_;
  }
  template <class T>
  static auto& act(Workspace<T>& ws) {
    return ws.act_;
  }
  template <class T>
  static const auto& act(const Workspace<T>& ws) {
    return ws.act_;
  }
  template <class T>
  static auto& y_rows(Workspace<T>& ws) {
    return ws.y_rows_;
  }
  template <class T>
  static const auto& y_rows(const Workspace<T>& ws) {
    return ws.y_rows_;
  }
  template <class T>
  static auto& noise(Workspace<T>& ws) {
    return ws.noise_;
  }
  template <class T>
  static const auto& noise(const Workspace<T>& ws) {
    return ws.noise_;
  }
  template <class T>
  static auto& gating_scratch(Workspace<T>& ws) {
    return ws.gating_scratch_;
  }
  template <class T>
  static const auto& gating_scratch(const Workspace<T>& ws) {
    return ws.gating_scratch_;
  }
  template <class T>
  static auto& shared_hidden(Workspace<T>& ws) {
    return ws.shared_hidden_;
  }
  template <class T>
  static const auto& shared_hidden(const Workspace<T>& ws) {
    return ws.shared_hidden_;
  }
  template <class T>
  static auto& shared_act(Workspace<T>& ws) {
    return ws.shared_act_;
  }
  template <class T>
  static const auto& shared_act(const Workspace<T>& ws) {
    return ws.shared_act_;
  }
  template <class T>
  static auto& shared_y(Workspace<T>& ws) {
    return ws.shared_y_;
  }
  template <class T>
  static const auto& shared_y(const Workspace<T>& ws) {
    return ws.shared_y_;
  }
  template <class T>
  static auto& latent(Workspace<T>& ws) {
    return ws.latent_;
  }
  template <class T>
  static auto& shared_gate(Workspace<T>& ws) {
    return ws.shared_gate_;
  }
  template <class T>
  static const auto& shared_gate(const Workspace<T>& ws) {
    return ws.shared_gate_;
  }
  template <class T>
  static auto& task_begin(Workspace<T>& ws) {
    return ws.task_begin_;
  }
  template <class T>
  static const auto& task_begin(const Workspace<T>& ws) {
    return ws.task_begin_;
  }
  template <class T>
  static auto& compact_scratch(Workspace<T>& ws) {
    return ws.compact_scratch_;
  }
  template <class T>
  static const auto& compact_scratch(const Workspace<T>& ws) {
    return ws.compact_scratch_;
  }
  /// Workspace::reserve with the routing slots per token and the per-worker decode scratch given.
  template <class T>
  static void reserve(Workspace<T>& ws, const MoeConfig& config, Index max_tokens,
                      Index num_workers, Index slots, Index decode_floats,
                      Index prepared_floats = 0) {
    ws.reserve_for(config, max_tokens, num_workers, slots, decode_floats, prepared_floats);
  }
};

}  // namespace detail
}  // namespace moe
