// moe: the family types of the Hugging Face transformers 5.17 MoE families beyond the first six
// (issue 12). Each is a generic policy whose default Options are the family's routing as HF
// computes it (tests/data/reference/v2/FORMAT.md section 6); numbers that vary per checkpoint
// (n_group, topk_group, scaling factors, norm_topk_prob, eps) default to the family's released
// model or HF config class and are filled from config.json by the loader.
//
// What lives elsewhere (the routing policy cannot express it): router bias on the logits
// (gpt-oss), logit soft-capping (Laguna), router input norm and per-expert output scale
// (Gemma 4) belong to the Router; routed_output_scale, zero experts (LongCat) and the weight
// applied to the expert input (Llama 4) to the block.
#pragma once

#include "moe/gating/family.hpp"
#include "moe/gating/scored_topk.hpp"
#include "moe/gating/softmax_topk.hpp"
#include "moe/gating/sparsemixer.hpp"

namespace moe::gating {

// ---- softmax over all experts, top-k, renormalised or not (SoftmaxTopK) ---------------------
// HF runs these softmaxes in float32; the double routing differs by float rounding (< 1e-6
// relative in the weights, tests/gating_v2_routing_test.cpp).

/// MiniMax-Text-01 (MiniMaxSparseMoeBlock): as Mixtral, renormalised.
struct MiniMax : FamilyPolicy<SoftmaxTopK, MiniMax> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{true}; }
};
/// Jamba (JambaSparseMoeBlock): softmax, top-k, no renormalisation.
struct Jamba : FamilyPolicy<SoftmaxTopK, Jamba> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{false}; }
};
/// FlexOlmo (FlexOlmoSparseMoeBlock, OLMoE's router): norm_topk_prob, false in FlexOlmoConfig.
struct FlexOlmo : FamilyPolicy<SoftmaxTopK, FlexOlmo> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{false}; }
};
/// Qwen3-Next (Qwen3NextSparseMoeBlock): renormalised (norm_topk_prob true); gated shared expert.
struct Qwen3Next : FamilyPolicy<SoftmaxTopK, Qwen3Next> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{true}; }
};
/// Qwen3.5-MoE (Qwen3_5MoeSparseMoeBlock): as Qwen3-Next.
struct Qwen3_5Moe : FamilyPolicy<SoftmaxTopK, Qwen3_5Moe> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{true}; }
};
/// Hunyuan-A13B (HunYuanMoEV1Moe): softmax, top-k (moe_topk), always renormalised.
struct HunYuanV1Moe : FamilyPolicy<SoftmaxTopK, HunYuanV1Moe> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{true}; }
};
/// Gemma 4 (Gemma4TextRouter): softmax, top-k, renormalised; the router's input norm
/// (x / rms(x) * scale * d^-1/2) and the per-expert scale of the weights are Router extras.
struct Gemma4 : FamilyPolicy<SoftmaxTopK, Gemma4> {
  using FamilyPolicy::FamilyPolicy;
  static SoftmaxTopK::Options defaults() { return SoftmaxTopK::Options{true}; }
};

// ---- scored top-k (BasicScoredTopK): sigmoid / softmax / sqrt-softplus, bias, groups --------

namespace detail {
/// DeepSeek-V3 routing as HF computes it (FORMAT.md "DS3 routing"): float32 sigmoid scores, the
/// selection bias, top-2-sum groups, renormalised with + 1e-20, scaled.
inline BiasedScoredTopK::Options ds3_routing(Index n_group, Index topk_group, double scaling) {
  auto o = BiasedScoredTopK::Options::deepseek_v3(n_group, topk_group, scaling, true);
  o.float32 = true;
  return o;
}
}  // namespace detail

/// DeepSeek-V3.2 (DeepseekV32MoE): DeepSeek-V3 routing; released config n_group 8, topk_group 4,
/// routed_scaling_factor 2.5.
struct DeepSeekV32 : FamilyPolicy<BiasedScoredTopK, DeepSeekV32> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(8, 4, 2.5); }
};
/// dots.llm1 (Dots1MoE): DeepSeek-V3 routing; released config one group, scaling 2.5.
struct Dots1 : FamilyPolicy<BiasedScoredTopK, Dots1> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 2.5); }
};
/// GLM-4.5 / 4.6 (Glm4MoeMoE): DeepSeek-V3 routing; released config one group, scaling 2.5.
struct Glm4Moe : FamilyPolicy<BiasedScoredTopK, Glm4Moe> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 2.5); }
};
/// GLM-4.x-Lite (Glm4MoeLiteMoE): DeepSeek-V3 routing (one group, scaling 1 by default).
struct Glm4MoeLite : FamilyPolicy<BiasedScoredTopK, Glm4MoeLite> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 1.0); }
};
/// Solar Open (SolarOpenMoE): DeepSeek-V3 routing (one group, scaling 1 by default).
struct SolarOpen : FamilyPolicy<BiasedScoredTopK, SolarOpen> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 1.0); }
};
/// EXAONE MoE (ExaoneMoeSparseMoEBlock): DeepSeek-V3 routing (one group, scaling 1 by default).
struct ExaoneMoe : FamilyPolicy<BiasedScoredTopK, ExaoneMoe> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 1.0); }
};
/// MiMo-V2-Flash (MiMoV2FlashMoE): DeepSeek-V3 routing, no shared expert (one group, scaling 1
/// by default).
struct MimoV2Flash : FamilyPolicy<BiasedScoredTopK, MimoV2Flash> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 1.0); }
};
/// Nemotron-H / Nemotron 3 (NemotronHMoE): DeepSeek-V3 routing; released config one group,
/// scaling 2.5. Its experts (relu^2, latent projection) are the block's.
struct NemotronH : FamilyPolicy<BiasedScoredTopK, NemotronH> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() { return detail::ds3_routing(1, 1, 2.5); }
};

/// Mistral 4 (Mistral4MoE): in float64, softmax scores, no bias, top-2-sum groups on the
/// probabilities, excluded groups filled with 0 (as HF), renormalised (+ 1e-20), scaled.
/// Defaults: n_group 1, scaling 1 (filled from config.json).
struct Mistral4 : FamilyPolicy<ScoredTopK, Mistral4> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    ScoredTopK::Options o;
    o.scoring = Scoring::softmax;
    o.hf_zero_group_mask = true;
    return o;
  }
};

/// DeepSeek-V4 (DeepseekV4 gate, mlp_layer_types "moe"): in float64, s = sqrt(softplus(z)), top-k
/// of s + e_score_correction_bias, w = s[i] / (sum + 1e-20) x routed_scaling_factor (1.5 in the
/// released config).
struct DeepSeekV4 : FamilyPolicy<BiasedScoredTopK, DeepSeekV4> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.scoring = Scoring::sqrt_softplus;
    o.routed_scaling_factor = 1.5;
    return o;
  }
};
/// DeepSeek-V4 hash layers (mlp_layer_types "hash_moe"): the experts of a token are row
/// input_id of gate.tid2eid (RouteContext::token_ids, expert_table); weights as DeepSeek-V4.
struct DeepSeekV4Hash : FamilyPolicy<ScoredTopK, DeepSeekV4Hash> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    ScoredTopK::Options o;
    o.scoring = Scoring::sqrt_softplus;
    o.selection = Selection::token_table;
    o.routed_scaling_factor = 1.5;
    return o;
  }
};

/// AFMoE (AfmoeSparseMoeBlock): float32 sigmoid, top-k of s + expert_bias, renormalised (+ 1e-20),
/// x route_scale (default 1).
struct Afmoe : FamilyPolicy<BiasedScoredTopK, Afmoe> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.float32 = true;
    return o;
  }
};
/// Hunyuan 3 (HYV3MoE): float32 sigmoid, top-k of s + e_score_correction_bias, renormalised
/// (+ 1e-20), x router_scaling_factor (2.5 as the released config).
struct HyV3 : FamilyPolicy<BiasedScoredTopK, HyV3> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.float32 = true;
    o.routed_scaling_factor = 2.5;
    return o;
  }
};
/// MiniMax-M2 (MiniMaxM2SparseMoeBlock): float32 sigmoid, top-k of s + e_score_correction_bias,
/// w = s[i] / sum (no epsilon), unscaled.
struct MiniMaxM2 : FamilyPolicy<BiasedScoredTopK, MiniMaxM2> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.float32 = true;
    o.normalize_epsilon = 0;
    return o;
  }
};
/// Laguna (LagunaSparseMoeBlock): float32 sigmoid of the soft-capped logits (a Router extra),
/// top-k of s + bias, w = s[i] / sum; the routed output x moe_routed_scaling_factor (2.5).
struct Laguna : FamilyPolicy<BiasedScoredTopK, Laguna> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.float32 = true;
    o.normalize_epsilon = 0;
    o.routed_output_scale = 2.5;
    return o;
  }
};
/// Step-3.x (Step3p7SparseMoeBlock): float32 sigmoid, top-k of s + bias, w = s[i] / sum; the
/// routed output x moe_router_scaling_factor (2.5).
struct Step3p7 : FamilyPolicy<BiasedScoredTopK, Step3p7> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.float32 = true;
    o.normalize_epsilon = 0;
    o.routed_output_scale = 2.5;
    return o;
  }
};
/// LFM2-MoE (Lfm2MoeSparseMoeBlock): float64 sigmoid, top-k of s + expert_bias, renormalised with
/// + 1e-6 (norm_topk_prob), x routed_scaling_factor (1 by default).
struct Lfm2Moe : FamilyPolicy<BiasedScoredTopK, Lfm2Moe> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.normalize_epsilon = 1e-6;
    return o;
  }
};
/// ERNIE 4.5 MoE (Ernie4_5_MoeSparseMoeBlock): float32 softmax, top-k of p +
/// moe_statics.e_score_correction_bias, w = p[i] / max(sum, moe_norm_min = 1e-12), unscaled.
struct Ernie4_5Moe : FamilyPolicy<BiasedScoredTopK, Ernie4_5Moe> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.scoring = Scoring::softmax;
    o.float32 = true;
    o.normalize_epsilon = 0;
    o.normalize_min = 1e-12;
    return o;
  }
};
/// LongCat-Flash (LongcatFlashMoE): float32 softmax over E + zero_experts, top-k of p +
/// e_score_correction_bias, w = p[i] x routed_scaling_factor (no renormalisation); a chosen
/// index >= E is an identity expert. Defaults: no zero experts, scaling 1 (from config.json:
/// zero_expert_num, routed_scaling_factor).
struct LongcatFlash : FamilyPolicy<BiasedScoredTopK, LongcatFlash> {
  using FamilyPolicy::FamilyPolicy;
  static BiasedScoredTopK::Options defaults() {
    BiasedScoredTopK::Options o;
    o.scoring = Scoring::softmax;
    o.float32 = true;
    o.normalize = false;
    return o;
  }
};
/// DBRX (DbrxRouter): float64 softmax, top-k, w = v / ||v||_p (moe_normalize_expert_weights = 1).
struct Dbrx : FamilyPolicy<ScoredTopK, Dbrx> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    ScoredTopK::Options o;
    o.scoring = Scoring::softmax;
    o.normalize_epsilon = 0;
    return o;
  }
};

// ---- top-k of the logits, scoring over the chosen only (Selection::logits) ------------------

namespace detail {
inline ScoredTopK::Options on_selected_logits(Scoring scoring, bool float32) {
  ScoredTopK::Options o;
  o.scoring = scoring;
  o.selection = Selection::logits;
  o.normalize = false;
  o.float32 = float32;
  return o;
}
}  // namespace detail

/// gpt-oss (GptOssTopKRouter): (v, i) = top-k of z (router bias on the logits: a Router extra),
/// w = softmax(v), float64.
struct GptOss : FamilyPolicy<ScoredTopK, GptOss> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    return detail::on_selected_logits(Scoring::softmax, false);
  }
};
/// Llama 4 (Llama4Router): (v, i) = top-k of z, w = sigmoid(v) in float32 (the block applies it
/// to the expert's input).
struct Llama4 : FamilyPolicy<ScoredTopK, Llama4> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    return detail::on_selected_logits(Scoring::sigmoid, true);
  }
};
/// Granite MoE (GraniteMoeTopKGating, and GraniteMoeShared): (v, i) = top-k of z, w = softmax(v),
/// float32.
struct GraniteMoe : FamilyPolicy<ScoredTopK, GraniteMoe> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    return detail::on_selected_logits(Scoring::softmax, true);
  }
};
/// JetMoE (JetMoeTopKGating): as Granite MoE.
struct JetMoe : FamilyPolicy<ScoredTopK, JetMoe> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    return detail::on_selected_logits(Scoring::softmax, true);
  }
};
/// Cohere2 MoE (Cohere2MoeSparseMoeBlock): (v, i) = top-k of z; expert_selection_fn "softmax":
/// w = softmax(v) in float32 (the default here); "sigmoid": scoring = sigmoid, float32 = false,
/// normalize = norm_topk_prob, normalize_epsilon = 0.
struct Cohere2Moe : FamilyPolicy<ScoredTopK, Cohere2Moe> {
  using FamilyPolicy::FamilyPolicy;
  static ScoredTopK::Options defaults() {
    return detail::on_selected_logits(Scoring::softmax, true);
  }
};

// ---- other policies ------------------------------------------------------------------------

/// Phi-3.5-MoE (PhimoeSparseMoeBlock): sparsemixer, top-2, jitter_eps = router_jitter_noise.
struct PhiMoe : FamilyPolicy<Sparsemixer, PhiMoe> {
  using FamilyPolicy::FamilyPolicy;
  static Sparsemixer::Options defaults() { return Sparsemixer::Options{}; }
};

}  // namespace moe::gating
