// moe/io: the row type of the family table (families.hpp) and the helpers that build rows.
// moe/io: the one table of checkpoint families. Every per-family fact the loaders use lives in a
// row of kFamilies: the config.json "model_type", the gating policy it routes with, the
// config.json key names (with the aliases transformers 5.17 writes), which layers are sparse, and
// the Hugging Face state_dict names of the router, the routed experts (per expert and the v5
// fused [E, 2F, D] / [E, D, F] layout), the selection bias and the shared expert. Adding a family
// whose routing and layer rule already exist is adding a row here; config.json parsing
// (model_spec.hpp) and the loaders (load_weights.hpp, load_block.hpp) read the row, never the
// family name.
//
// Name templates: "{L}" is the layer index within its stack, "{e}" the expert index; expert and
// shared-expert names are relative to the layer prefix.
#pragma once

#include <array>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// The model families whose MoE layers load from a Hugging Face checkpoint (config.json
/// "model_type"; transformers 5.17).
enum class Family {
  mixtral,              ///< MixtralForCausalLM
  qwen2_moe,            ///< Qwen2MoeForCausalLM (gated shared expert)
  qwen3_moe,            ///< Qwen3MoeForCausalLM
  olmoe,                ///< OlmoeForCausalLM
  deepseek_v2,          ///< DeepseekV2ForCausalLM (softmax, group max, shared experts)
  deepseek_v3,          ///< DeepseekV3ForCausalLM (sigmoid, bias, top-2-sum groups)
  switch_transformers,  ///< SwitchTransformersForConditionalGeneration (top-1, ReLU experts)
  afmoe,
  cohere2_moe,
  dbrx,
  deepseek_v32,
  deepseek_v4,
  dots1,
  ernie4_5_moe,
  exaone_moe,
  flex_olmo,
  gemma4,
  glm4_moe,
  glm4_moe_lite,
  gpt_oss,
  granitemoe,
  granitemoeshared,
  hunyuan_v1_moe,
  hy_v3,
  jamba,
  jetmoe,
  laguna,
  lfm2_moe,
  llama4,
  longcat_flash,
  mimo_v2_flash,
  minimax,
  minimax_m2,
  mistral4,
  nemotron_h,
  phimoe,
  qwen3_5_moe,
  qwen3_next,
  solar_open,
  step3p7,
};

/// How a family routes: which gating policy (and AnyMoeBlock alternative) it loads into, and
/// which routing keys of config.json are read.
enum class RoutingKind {
  softmax_top_k,   ///< gating::SoftmaxTopK (norm_topk_prob)
  deepseek_v2,     ///< gating::DeepSeekV2 (scoring_func softmax, topk_method, groups)
  deepseek_v3,     ///< gating::GroupLimitedTopK (sigmoid + selection bias, noaux_tc)
  capacity_top_1,  ///< gating::CapacityTopK (expert_capacity)
  scored,          ///< gating::ScoredTopK, Options from the row (scored_defaults + keys)
  biased_scored,   ///< gating::BiasedScoredTopK (= GroupLimitedTopK), Options from the row
  sparsemixer,     ///< gating::Sparsemixer (jitter_eps = router_jitter_noise)
};

/// The experts' FFN kind.
enum class ExpertKind {
  swiglu,      ///< SwiGLU (plus GluOptions clamps as data)
  geglu_tanh,  ///< Gated<GeluTanh> (Gemma 4)
  relu,        ///< Plain<Relu> (Switch)
  relu2,       ///< Plain<Relu2> (Nemotron-H)
};

/// How the fused expert tensors (fused_gate_up / fused_down) are laid out.
enum class FusedLayout {
  out_in,              ///< [E, 2F, D] gate rows first, [E, D, F] (transformers v5, nn.Linear)
  in_out,              ///< [E, D, 2F] (x W: gate columns first), [E, F, D] (Llama 4)
  in_out_interleaved,  ///< [E, D, 2F] gate = even columns, up = odd; [E, F, D] (gpt-oss)
  stacked_rows,        ///< three [E F, D]: w1 gate, v1 up (x W^T), w2 down (h W) (DBRX)
  plain_out_in,        ///< ungated: up [E, F, D], down [E, D, F] (Nemotron-H)
};

/// Which layers hold a sparse MoE block (the others are dense FFNs), as the HF model decides.
enum class SparseLayers {
  every_layer,     ///< every decoder layer
  qwen_step,       ///< not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
  deepseek_dense,  ///< layer >= first_k_dense_replace and layer % moe_layer_freq == 0
  switch_stacks,   ///< encoder then decoder blocks; i % step == 1 (or step == 1) in its stack
  listed,  ///< layers_key lists every layer's type; "moe" / "hash_moe" / "sparse" are sparse
};

/// How config.json gives the shared expert's width.
enum class SharedWidth {
  none,          ///< no shared expert
  width,         ///< the key is the width (Qwen2-MoE shared_expert_intermediate_size)
  expert_count,  ///< the key counts routed-width experts (DeepSeek n_shared_experts x d_ff)
  one_expert,    ///< one routed-width expert (Llama 4 shared_expert)
};

/// A config.json key and its aliases, in order of preference; unused slots are nullptr. The
/// first one present (and not null) is read; messages name the first. A dotted key
/// ("ffn_config.moe_top_k") reads a nested object.
using ConfigKey = std::array<const char*, 3>;

/// One family: everything the loaders need to know about it. Fields after the first block
/// default to "absent" (nullptr / false / the plain behaviour).
struct FamilyRow {
  Family family{};
  const char* model_type = nullptr;  ///< config.json "model_type"
  RoutingKind routing{};
  const char* gating = nullptr;  ///< the gating policy's name, for messages
  bool gated_experts = true;     ///< SwiGLU-style gate/up/down (else a plain two-matrix MLP)

  // config.json keys (our name <- HF names)
  ConfigKey num_layers{};      ///< layers (Switch: encoder blocks)
  ConfigKey d_model{};         ///< hidden_size
  ConfigKey d_ff{};            ///< routed expert width
  ConfigKey dense_d_ff{};      ///< dense layers' width (absent: 0, or d_ff when dense_is_d_ff)
  bool dense_is_d_ff = false;  ///< dense layers have the routed width (Switch)
  ConfigKey num_experts{};     ///< routed experts (num_local_experts)
  ConfigKey top_k{};           ///< experts per token; empty: fixed_top_k
  Index fixed_top_k = 0;
  SharedWidth shared_width = SharedWidth::none;
  ConfigKey shared_key{};
  bool shared_expert_gate = false;       ///< a sigmoid gate [1 x d_model] scales the shared expert
  const char* norm_topk_prob = nullptr;  ///< key, or nullptr when the family fixes it
  bool norm_topk_prob_default = true;
  const char* hidden_act = nullptr;  ///< activation key
  const char* hidden_act_default = "silu";
  SparseLayers sparse_layers = SparseLayers::every_layer;

  // HF state_dict names
  const char* sparse_prefix = nullptr;        ///< sparse layer's module prefix
  const char* sparse_prefix_v5 = nullptr;     ///< alternative (v5 in-memory name), or nullptr
  const char* decoder_prefix = nullptr;       ///< Switch decoder stack's prefix, or nullptr
  const char* dense_prefix = nullptr;         ///< dense layer's module prefix
  const char* router = nullptr;               ///< [E x d_model]
  const char* router_bias = nullptr;          ///< [E] selection bias, or nullptr
  const char* refused_router_bias = nullptr;  ///< a classifier bias we do not support, or nullptr
  const char* expert_gate = nullptr;    ///< per expert [d_ff x d_model] (plain MLP: the input)
  const char* expert_up = nullptr;      ///< per expert [d_ff x d_model], nullptr for a plain MLP
  const char* expert_down = nullptr;    ///< per expert [d_model x d_ff]
  const char* fused_gate_up = nullptr;  ///< fused input projection (fused_layout), or nullptr
  const char* fused_down = nullptr;     ///< fused output projection, or nullptr
  const char* shared_gate = nullptr;    ///< shared expert [S x d_model] (nullptr: none)
  const char* shared_up = nullptr;
  const char* shared_down = nullptr;
  const char* shared_expert_gate_name = nullptr;  ///< [1 x d_model], or nullptr
  const char* dense_gate = nullptr;               ///< dense FFN names, relative to dense_prefix
  const char* dense_up = nullptr;                 ///< nullptr for a plain MLP
  const char* dense_down = nullptr;

  // ---- issue 12: the v2 families' extras (all optional) ----
  ExpertKind expert_kind = ExpertKind::swiglu;
  FusedLayout fused_layout = FusedLayout::out_in;
  const char* fused_up = nullptr;             ///< DBRX v1 [E F, D]
  const char* expert_in_bias = nullptr;       ///< [E, 2F] (gpt-oss, interleaved like its columns)
  const char* expert_out_bias = nullptr;      ///< [E, D]
  const char* output_bias = nullptr;          ///< [D] added to the routed output (JetMoE)
  const char* router_logit_bias = nullptr;    ///< [E] added to the logits (gpt-oss)
  const char* router_input_scale = nullptr;   ///< [D] Gemma 4 router.scale
  const char* expert_weight_scale = nullptr;  ///< [E] Gemma 4 router.per_expert_scale
  const char* expert_table = nullptr;         ///< [V, k] DeepSeek-V4 hash layers gate.tid2eid
  const char* shared_fused_in = nullptr;  ///< shared [2S, D] gate rows first (Granite shared_mlp)
  bool shared_optional = false;           ///< no shared expert when its tensors are absent
  /// Scored / biased_scored routing: the family type's defaults (gating/families.hpp), then the
  /// keys below override what config.json gives.
  gating::BiasedScoredTopK::Options (*biased_defaults)() = nullptr;
  gating::ScoredTopK::Options (*scored_defaults)() = nullptr;
  ConfigKey scaling_key{};         ///< routed scaling factor
  bool scaling_on_output = false;  ///< the scaling multiplies the routed output (Laguna, Step)
  bool group_keys = false;         ///< n_group / topk_group are read
  const char* zero_experts_key = nullptr;     ///< LongCat zero_expert_num
  const char* norm_min_key = nullptr;         ///< ERNIE moe_norm_min
  const char* normalize_p_key = nullptr;      ///< DBRX moe_normalize_expert_weights
  const char* scoring_key = nullptr;          ///< Cohere2 expert_selection_fn (softmax / sigmoid)
  const char* jitter_key = nullptr;           ///< Sparsemixer router_jitter_noise
  const char* softcap_key = nullptr;          ///< Laguna moe_router_logit_softcapping
  const char* router_norm_eps_key = nullptr;  ///< Gemma 4 rms_norm_eps (router input norm)
  const char* limit_key = nullptr;            ///< swiglu_limit (a list: its first entry)
  double limit_default = std::numeric_limits<double>::infinity();
  const char* shared_limit_key = nullptr;    ///< Step swiglu_limits_shared
  bool shared_same_limit = false;            ///< the shared expert clamps like the routed (V4)
  bool clamp_after_activation = false;       ///< Step: min(silu(g), L)
  double up_offset = 0.0;                    ///< gpt-oss: (up + 1)
  double glu_alpha = 1.0;                    ///< gpt-oss: 1.702
  bool weight_expert_input = false;          ///< Llama 4
  const char* shared_combine_key = nullptr;  ///< Cohere2 shared_expert_combination_strategy
  const char* fp32_combine_key = nullptr;    ///< hy_v3 enable_moe_fp32_combine
  const char* layer_types_key = nullptr;     ///< DeepSeek-V4 mlp_layer_types ("hash_moe" layers)
  /// Options of a hash layer (scored routing from expert_table), or nullptr.
  gating::ScoredTopK::Options (*hash_defaults)() = nullptr;
  const char* refused_key = nullptr;  ///< a config.json key whose non-null value is unsupported
  /// [D] RMSNorm weights around the routed experts, read when present (Gemma 4 decoder layer
  /// pre_feedforward_layernorm_2 / post_feedforward_layernorm_2), or nullptr
  const char* expert_input_norm = nullptr;
  const char* expert_output_norm = nullptr;
  /// Nemotron-H latent experts: the width key (moe_latent_size; null or absent: none) and the
  /// projections [L, D] / [D, L] around the routed experts.
  /// SparseLayers::listed: the per-layer type list (Nemotron-H layers_block_type); its length is
  /// the layer count when no num_layers key is present.
  const char* layers_key = nullptr;
  const char* latent_key = nullptr;
  const char* latent_in = nullptr;
  const char* latent_out = nullptr;
};

namespace detail {
inline constexpr ConfigKey kNoKey{nullptr, nullptr, nullptr};

/// A gated family under model.layers.{L}.mlp. with the transformers v5 fused expert names, the
/// common keys and the given routing; the table below changes what differs.
inline FamilyRow v5_row(Family f, const char* model_type, RoutingKind routing,
                        const char* gating_name) {
  FamilyRow r{};
  r.family = f;
  r.model_type = model_type;
  r.routing = routing;
  r.gating = gating_name;
  r.num_layers = {"num_hidden_layers", "num_layers", "n_layers"};
  r.d_model = {"hidden_size", "d_model"};
  r.d_ff = {"moe_intermediate_size", "intermediate_size"};
  r.num_experts = {"num_experts", "num_local_experts", "n_routed_experts"};
  r.top_k = {"num_experts_per_tok", "moe_topk", "top_k_experts"};
  r.hidden_act = "hidden_act";
  r.sparse_prefix = "model.layers.{L}.mlp.";
  r.dense_prefix = "model.layers.{L}.mlp.";
  r.router = "gate.weight";
  r.expert_gate = "experts.{e}.gate_proj.weight";
  r.expert_up = "experts.{e}.up_proj.weight";
  r.expert_down = "experts.{e}.down_proj.weight";
  r.fused_gate_up = "experts.gate_up_proj";
  r.fused_down = "experts.down_proj";
  r.dense_gate = "gate_proj.weight";
  r.dense_up = "up_proj.weight";
  r.dense_down = "down_proj.weight";
  return r;
}

inline FamilyRow with_shared(FamilyRow r, SharedWidth width, ConfigKey key, const char* gate,
                             const char* up, const char* down) {
  r.shared_width = width;
  r.shared_key = key;
  r.shared_gate = gate;
  r.shared_up = up;
  r.shared_down = down;
  return r;
}
#define MOE_SHARED_NAMES(m) m "gate_proj.weight", m "up_proj.weight", m "down_proj.weight"

/// DeepSeek-V3 routing rows (sigmoid + bias, groups, scaling, norm_topk_prob).
inline FamilyRow ds3_row(Family f, const char* model_type,
                         gating::BiasedScoredTopK::Options (*defaults)()) {
  FamilyRow r = v5_row(f, model_type, RoutingKind::biased_scored, "gating::BiasedScoredTopK");
  r.router_bias = "gate.e_score_correction_bias";
  r.biased_defaults = defaults;
  r.scaling_key = {"routed_scaling_factor"};
  r.group_keys = true;
  r.norm_topk_prob = "norm_topk_prob";
  return with_shared(r, SharedWidth::expert_count, {"n_shared_experts", "num_shared_experts"},
                     MOE_SHARED_NAMES("shared_experts."));
}

template <class Family>
gating::BiasedScoredTopK::Options biased_defaults_of() {
  return Family::defaults();
}
template <class Family>
gating::ScoredTopK::Options scored_defaults_of() {
  return Family::defaults();
}

}  // namespace detail

}  // namespace moe::io
