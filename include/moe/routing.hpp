// moe: the routing decision of one forward call, the dispatch plan derived from it, and the
// routing statistics users watch for collapse.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/detail/buffer.hpp"
#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// The routing of a batch, token-major. S is the routing scalar (RouteScalar<T>: float or wider).
///
/// Every token has `slots()` assignment slots. Top-k families use slots = top_k, in descending
/// weight order with ties going to the lower expert index. Expert choice uses slots = num_experts
/// (slot j is expert j). A slot whose expert is -1 is empty; a slot with kept == 0 was chosen but
/// dropped by an expert's capacity (its expert and weight are still reported, as in HF Switch).
template <class S>
class Routing {
 public:
  Index num_tokens() const { return num_tokens_; }
  Index num_experts() const { return num_experts_; }
  Index slots() const { return slots_; }

  /// [T x E] router logits x * W_r^T.
  ConstMap<S> logits() const { return {logits_.data(), num_tokens_, num_experts_}; }
  /// [T x E] the gating's scores: softmax or sigmoid probabilities of the logits.
  ConstMap<S> scores() const { return {scores_.data(), num_tokens_, num_experts_}; }
  /// [T x slots] chosen expert of each slot, -1 for an empty slot.
  ConstMap<std::int32_t> experts() const { return {experts_.data(), num_tokens_, slots_}; }
  /// [T x slots] routing weight applied to the expert's output.
  ConstMap<S> weights() const { return {weights_.data(), num_tokens_, slots_}; }
  /// [T x slots] 1 if the assignment is executed, 0 if it is empty or dropped by capacity.
  ConstMap<std::uint8_t> kept() const { return {kept_.data(), num_tokens_, slots_}; }

  // Mutable views, written by the router and the gating policies.
  MutMap<S> logits() { return {logits_.data(), num_tokens_, num_experts_}; }
  MutMap<S> scores() { return {scores_.data(), num_tokens_, num_experts_}; }
  MutMap<std::int32_t> experts() { return {experts_.data(), num_tokens_, slots_}; }
  MutMap<S> weights() { return {weights_.data(), num_tokens_, slots_}; }
  MutMap<std::uint8_t> kept() { return {kept_.data(), num_tokens_, slots_}; }

  /// Sizes the routing for a batch; allocates only when the batch is larger than any before.
  void resize(Index num_tokens, Index num_experts, Index slots) {
    num_tokens_ = num_tokens;
    num_experts_ = num_experts;
    slots_ = slots;
    logits_.ensure(num_tokens * num_experts);
    scores_.ensure(num_tokens * num_experts);
    experts_.ensure(num_tokens * slots);
    weights_.ensure(num_tokens * slots);
    kept_.ensure(num_tokens * slots);
  }

  std::size_t bytes() const {
    return logits_.bytes() + scores_.bytes() + experts_.bytes() + weights_.bytes() +
           kept_.bytes();
  }

 private:
  Index num_tokens_ = 0, num_experts_ = 0, slots_ = 0;
  detail::GrowBuffer<S> logits_, scores_, weights_;
  detail::GrowBuffer<std::int32_t> experts_;
  detail::GrowBuffer<std::uint8_t> kept_;
};

/// Where every kept assignment goes: a counting sort of the assignments by expert.
///
/// Rows of expert e occupy [offsets[e], offsets[e+1]) of the gathered buffers, in token order
/// (stable), so the plan and every result computed from it are deterministic.
struct DispatchPlan {
  Index num_tokens = 0, num_experts = 0, slots = 0;
  Index num_rows = 0;              ///< kept assignments = rows of the gathered buffers
  std::vector<Index> counts;       ///< [E] rows per expert
  std::vector<Index> offsets;      ///< [E + 1] first row of each expert
  std::vector<Index> row_token;    ///< [num_rows] source token of each gathered row
  std::vector<Index> row_slot;     ///< [num_rows] slot of that token (to find its weight)
  std::vector<Index> slot_row;     ///< [T * slots] gathered row of each slot, -1 if not executed

  /// Builds the plan; allocates only when the batch or expert count grows past earlier calls.
  template <class S>
  void build(const Routing<S>& routing) {
    num_tokens = routing.num_tokens();
    num_experts = routing.num_experts();
    slots = routing.slots();
    grow(counts, num_experts);
    grow(offsets, num_experts + 1);
    grow(slot_row, num_tokens * slots);
    std::fill(counts.begin(), counts.begin() + num_experts, Index(0));
    const auto experts = routing.experts();
    const auto kept = routing.kept();
    for (Index t = 0; t < num_tokens; ++t) {
      for (Index j = 0; j < slots; ++j) {
        if (kept(t, j)) {
          const Index e = experts(t, j);
          MOE_ASSERT(e >= 0 && e < num_experts);
          ++counts[static_cast<std::size_t>(e)];
        }
      }
    }
    offsets[0] = 0;
    for (Index e = 0; e < num_experts; ++e) {
      offsets[static_cast<std::size_t>(e + 1)] =
          offsets[static_cast<std::size_t>(e)] + counts[static_cast<std::size_t>(e)];
    }
    num_rows = offsets[static_cast<std::size_t>(num_experts)];
    grow(row_token, num_rows);
    grow(row_slot, num_rows);
    grow(fill_, num_experts);
    std::copy(offsets.begin(), offsets.begin() + num_experts, fill_.begin());
    for (Index t = 0; t < num_tokens; ++t) {
      for (Index j = 0; j < slots; ++j) {
        Index& dst = slot_row[static_cast<std::size_t>(t * slots + j)];
        if (!kept(t, j)) {
          dst = -1;
          continue;
        }
        const Index row = fill_[static_cast<std::size_t>(experts(t, j))]++;
        dst = row;
        row_token[static_cast<std::size_t>(row)] = t;
        row_slot[static_cast<std::size_t>(row)] = j;
      }
    }
  }

  /// Sizes the buffers for plans of up to max_tokens x max_slots assignments and max_experts
  /// experts, so build() then allocates nothing (Workspace::reserve).
  void reserve(Index max_tokens, Index max_experts, Index max_slots) {
    grow(counts, max_experts);
    grow(offsets, max_experts + 1);
    grow(slot_row, max_tokens * max_slots);
    grow(row_token, max_tokens * max_slots);
    grow(row_slot, max_tokens * max_slots);
    grow(fill_, max_experts);
  }

  std::size_t bytes() const {
    return (counts.capacity() + offsets.capacity() + row_token.capacity() + row_slot.capacity() +
            slot_row.capacity() + fill_.capacity()) *
           sizeof(Index);
  }

 private:
  static void grow(std::vector<Index>& v, Index n) {
    if (static_cast<std::size_t>(n) > v.size()) v.resize(static_cast<std::size_t>(n));
  }
  std::vector<Index> fill_;
};

/// Cheap (O(T * slots + E)) statistics of one routing decision.
struct RoutingStats {
  std::vector<Index> tokens_per_expert;  ///< [E] executed assignments per expert
  Index assignments = 0;                 ///< executed assignments (T * k without drops)
  Index dropped = 0;                     ///< assignments dropped by capacity
  Index dropped_tokens = 0;              ///< tokens whose every chosen assignment was dropped
  Index unrouted_tokens = 0;             ///< tokens no expert processes (dropped, or unchosen
                                         ///< by every expert under expert choice)
  Index dead_experts = 0;                ///< experts that received no token
  double imbalance = 0;                  ///< max load / mean load (1 = perfectly even)
  double load_cv = 0;                    ///< coefficient of variation (std / mean) of the load
  double mean_entropy = 0;               ///< mean over tokens of the entropy of the scores, nats

  /// Computes the statistics from a routing and its dispatch plan. The entropy uses the
  /// normalised scores (sigmoid scores are normalised per token first).
  template <class S>
  void compute(const Routing<S>& routing, const DispatchPlan& plan) {
    const Index E = routing.num_experts(), T = routing.num_tokens();
    tokens_per_expert.resize(static_cast<std::size_t>(E));
    std::copy(plan.counts.begin(), plan.counts.begin() + E, tokens_per_expert.begin());
    assignments = plan.num_rows;
    dropped = 0;
    dropped_tokens = 0;
    unrouted_tokens = 0;
    const auto experts = routing.experts();
    const auto kept = routing.kept();
    for (Index t = 0; t < T; ++t) {
      Index chosen = 0, executed = 0;
      for (Index j = 0; j < routing.slots(); ++j) {
        if (experts(t, j) < 0) continue;
        ++chosen;
        if (kept(t, j)) ++executed;
      }
      dropped += chosen - executed;
      if (chosen > 0 && executed == 0) ++dropped_tokens;
      if (executed == 0) ++unrouted_tokens;
    }
    dead_experts = 0;
    double sum = 0, sum_sq = 0, max_load = 0;
    for (Index e = 0; e < E; ++e) {
      const double load = static_cast<double>(tokens_per_expert[static_cast<std::size_t>(e)]);
      if (load == 0) ++dead_experts;
      sum += load;
      sum_sq += load * load;
      max_load = std::max(max_load, load);
    }
    const double mean = E > 0 ? sum / static_cast<double>(E) : 0.0;
    imbalance = mean > 0 ? max_load / mean : 0.0;
    const double var = E > 0 ? std::max(0.0, sum_sq / static_cast<double>(E) - mean * mean) : 0.0;
    load_cv = mean > 0 ? std::sqrt(var) / mean : 0.0;
    double entropy = 0;
    Index finite_rows = 0;
    const auto scores = routing.scores();
    for (Index t = 0; t < T; ++t) {
      double total = 0;
      for (Index e = 0; e < E; ++e) total += static_cast<double>(scores(t, e));
      if (!(total > 0) || !std::isfinite(total)) continue;
      double h = 0;
      for (Index e = 0; e < E; ++e) {
        const double p = static_cast<double>(scores(t, e)) / total;
        if (p > 0) h -= p * std::log(p);
      }
      entropy += h;
      ++finite_rows;
    }
    // Tokens with non-finite scores (NaN input) are left out of the mean.
    mean_entropy = finite_rows > 0 ? entropy / static_cast<double>(finite_rows) : 0.0;
  }
};

}  // namespace moe
