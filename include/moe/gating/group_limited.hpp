// moe: group-limited top-k gating (DeepSeek-V2 / DeepSeek-V3): the names under which the scored
// top-k policy (gating/scored_topk.hpp) was first published here.
#pragma once

#include "moe/gating/scored_topk.hpp"

namespace moe::gating {

/// Group-limited top-k (DeepSeek-V2 / V3): BasicScoredTopK, whose Options default to DeepSeek-V3
/// style routing (sigmoid, top-2-sum groups, renormalised with + 1e-20, unscaled, one group).
template <bool SelectionBias>
using BasicGroupLimitedTopK = BasicScoredTopK<SelectionBias>;

/// Group-limited top-k with the selection bias (generic Options; the family types DeepSeekV3 and
/// DeepSeekV2 in gating/family.hpp carry their families' defaults).
using GroupLimitedTopK = BasicScoredTopK<true>;

}  // namespace moe::gating
