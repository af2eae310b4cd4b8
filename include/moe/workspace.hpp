// moe: the per-thread scratch of a forward (and backward) call.
#pragma once

#include <random>

#include "moe/detail/buffer.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe {

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
///   + compact expert storage, only when an expert gets more than detail::compact_small_rows
///     (16) rows (prefill): workers * 256 * max(d_model, d_ff) floats (one decoded weight tile
///     per executor worker; 3.5 MiB per worker for d_ff 3584, 14 MiB for Mixtral-8x7B).
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

  /// Bytes currently held by the workspace (the formula in the class comment, after growth).
  std::size_t bytes() const {
    return routing_.bytes() + plan_.bytes() + x_rows_.bytes() + hidden_.bytes() + act_.bytes() +
           y_rows_.bytes() + noise_.bytes() + shared_hidden_.bytes() + shared_act_.bytes() +
           shared_y_.bytes() + shared_gate_.bytes() + gating_scratch_.bytes() +
           task_begin_.bytes() + compact_scratch_.bytes();
  }

  // Buffers of the forward pass, read by backward(); not part of the stable API.
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
  /// [E + 2] first task of each FFN job of one phase (block.hpp, detail::run_ffn_jobs)
  detail::GrowBuffer<Index> task_begin_;
  /// [workers x 256 max(d_model, d_ff)] decoded weight tiles (compact storage, prefill only)
  detail::GrowBuffer<T> compact_scratch_;

 private:
  bool training_ = false;
  std::mt19937_64 rng_{0x5eed};
};

}  // namespace moe
