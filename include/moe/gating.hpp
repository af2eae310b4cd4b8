// moe: gating policies. A policy turns the router logits of a batch into a Routing: scores,
// the chosen experts of every token and their weights. Policies are template parameters of the
// block (they shape the inner loop); their numbers (renormalisation, groups, capacity) are runtime
// Options validated once against the MoeConfig.
//
// Policy interface (every policy provides):
//   struct Options;                               runtime settings (presets as static functions)
//   Policy();  explicit Policy(Options);  void validate(const MoeConfig&) const;
//   Index slots(const MoeConfig&) const;          slots per token in the Routing
//   template <class S> void route(const MoeConfig&, const RouteContext<S>&, Routing<S>&) const;
//     reads routing.logits() (already computed, [T x E]) and writes scores, experts, weights, kept.
//   static constexpr bool uses_bias, uses_noise;   which router parameters the policy needs
//
// Generic policies (their Options default to the plainest behaviour; users who mix set them):
//   SoftmaxTopK              softmax, top-k, optional renormalisation     (gating/softmax_topk.hpp)
//   BasicScoredTopK          scores (softmax / sigmoid / sqrt-softplus), optional selection bias
//                            and group limit, top-k or a token table, renormalisation variants,
//                            scaling, HF's float32 steps: ScoredTopK, BiasedScoredTopK
//                            (gating/scored_topk.hpp; BasicGroupLimitedTopK / GroupLimitedTopK are
//                            its first names, gating/group_limited.hpp)
//   Sparsemixer              PhiMoE's deterministic sparsemixer            (gating/sparsemixer.hpp)
//   CapacityTopK             top-k with expert capacity (Switch, GShard)  (gating/capacity.hpp)
//   NoisyTopK                Shazeer et al. 2017                          (gating/noisy.hpp)
//   ExpertChoice             Zhou et al. 2022 (not causal) (gating/expert_choice.hpp)
// Family types: one type per model family, deriving from a generic policy, whose
// default-constructed Options are the family's published behaviour: Mixtral, Qwen2Moe, Qwen3Moe,
// Olmoe, DeepSeekV2, DeepSeekV3, SwitchTop1, GShardTop2 (gating/family.hpp) and the Hugging Face
// 5.17 families of issue 12 (gating/families.hpp). docs/families.md has the table.
//
// Conventions shared by every top-k policy: slots hold the chosen experts in descending weight,
// ties going to the lower expert index; a policy never writes an expert outside [0, E) into a
// kept slot, even for NaN logits (NaN ranks below every number).
#pragma once

#include "moe/gating/capacity.hpp"       // IWYU pragma: export
#include "moe/gating/common.hpp"         // IWYU pragma: export
#include "moe/gating/expert_choice.hpp"  // IWYU pragma: export
#include "moe/gating/families.hpp"       // IWYU pragma: export
#include "moe/gating/family.hpp"         // IWYU pragma: export
#include "moe/gating/group_limited.hpp"  // IWYU pragma: export
#include "moe/gating/noisy.hpp"          // IWYU pragma: export
#include "moe/gating/scored_topk.hpp"    // IWYU pragma: export
#include "moe/gating/softmax_topk.hpp"   // IWYU pragma: export
#include "moe/gating/sparsemixer.hpp"    // IWYU pragma: export
