// moe: which rank holds which routed expert (expert parallelism). No MPI here: a placement is a
// plain map, usable (and testable) without a communicator.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::distributed {

/// The owner rank of every routed expert of a layer, and each rank's experts in ascending global
/// index (the order in which a rank stores its shard: its local expert i is experts_of(r)[i]).
///
/// Three ways to build one: contiguous ranges (DeepSpeed, Megatron: rank r holds experts
/// [r E / R, (r + 1) E / R), the first E mod R ranks one more), round robin (expert e on rank
/// e mod R), or an explicit expert -> rank map (vLLM's expert_map, inverted). A rank may hold no
/// expert (R > E, or a map that skips it). Immutable; cheap to copy (O(E)).
class ExpertPlacement {
 public:
  ExpertPlacement() = default;

  /// Rank r holds a contiguous range; ranges differ in size by at most one (earlier ranks larger).
  /// Throws config_error when num_experts or num_ranks is not positive.
  static ExpertPlacement contiguous(Index num_experts, int num_ranks) {
    check_sizes(num_experts, num_ranks);
    std::vector<int> owner(static_cast<std::size_t>(num_experts));
    const Index base = num_experts / num_ranks, extra = num_experts % num_ranks;
    Index e = 0;
    for (int r = 0; r < num_ranks; ++r) {
      const Index n = base + (r < extra ? 1 : 0);
      for (Index i = 0; i < n; ++i) owner[static_cast<std::size_t>(e++)] = r;
    }
    return ExpertPlacement(std::move(owner), num_ranks);
  }

  /// Expert e on rank e mod num_ranks. Throws config_error as contiguous().
  static ExpertPlacement round_robin(Index num_experts, int num_ranks) {
    check_sizes(num_experts, num_ranks);
    std::vector<int> owner(static_cast<std::size_t>(num_experts));
    for (Index e = 0; e < num_experts; ++e) {
      owner[static_cast<std::size_t>(e)] = static_cast<int>(e % num_ranks);
    }
    return ExpertPlacement(std::move(owner), num_ranks);
  }

  /// owner[e] = the rank holding expert e. Throws config_error for an empty map, a non-positive
  /// num_ranks or an owner outside [0, num_ranks): "moe: expert 3 is placed on rank 5, outside
  /// [0, 4)".
  static ExpertPlacement from_map(std::vector<int> owner, int num_ranks) {
    check_sizes(static_cast<Index>(owner.size()), num_ranks);
    for (std::size_t e = 0; e < owner.size(); ++e) {
      if (owner[e] < 0 || owner[e] >= num_ranks) {
        throw config_error(moe::detail::concat("moe: expert ", e, " is placed on rank ", owner[e],
                                               ", outside [0, ", num_ranks, ")"));
      }
    }
    return ExpertPlacement(std::move(owner), num_ranks);
  }

  Index num_experts() const { return static_cast<Index>(owner_.size()); }
  int num_ranks() const { return num_ranks_; }
  /// The rank holding expert e (0 <= e < num_experts()).
  int owner(Index e) const { return owner_[static_cast<std::size_t>(e)]; }
  /// Position of expert e among its owner's experts.
  Index local_index(Index e) const { return local_index_[static_cast<std::size_t>(e)]; }
  /// The experts of `rank`, ascending.
  const std::vector<Index>& experts_of(int rank) const {
    return experts_of_[static_cast<std::size_t>(rank)];
  }
  /// The largest number of experts any rank holds.
  Index max_local() const { return max_local_; }
  /// owner[e] for every expert (the explicit map).
  const std::vector<int>& owners() const { return owner_; }

 private:
  ExpertPlacement(std::vector<int> owner, int num_ranks)
      : owner_(std::move(owner)),
        num_ranks_(num_ranks),
        local_index_(owner_.size()),
        experts_of_(static_cast<std::size_t>(num_ranks)) {
    for (std::size_t e = 0; e < owner_.size(); ++e) {
      auto& mine = experts_of_[static_cast<std::size_t>(owner_[e])];
      local_index_[e] = static_cast<Index>(mine.size());
      mine.push_back(static_cast<Index>(e));
    }
    for (const auto& v : experts_of_) max_local_ = std::max(max_local_, Index(v.size()));
  }
  static void check_sizes(Index num_experts, int num_ranks) {
    if (num_experts <= 0) {
      throw config_error(moe::detail::concat("moe: placement of num_experts = ", num_experts,
                                             " must be positive"));
    }
    if (num_ranks <= 0) {
      throw config_error(
          moe::detail::concat("moe: placement over num_ranks = ", num_ranks, " must be positive"));
    }
  }

  std::vector<int> owner_;
  int num_ranks_ = 0;
  std::vector<Index> local_index_;
  std::vector<std::vector<Index>> experts_of_;
  Index max_local_ = 0;
};

}  // namespace moe::distributed
