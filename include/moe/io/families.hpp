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
#include <string>
#include <utility>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// The model families whose MoE layers load from a Hugging Face checkpoint (config.json
/// "model_type").
enum class Family {
  mixtral,              ///< MixtralForCausalLM
  qwen2_moe,            ///< Qwen2MoeForCausalLM (gated shared expert)
  qwen3_moe,            ///< Qwen3MoeForCausalLM
  olmoe,                ///< OlmoeForCausalLM
  deepseek_v2,          ///< DeepseekV2ForCausalLM (softmax, group max, shared experts)
  deepseek_v3,          ///< DeepseekV3ForCausalLM (sigmoid, bias, top-2-sum groups)
  switch_transformers,  ///< SwitchTransformersForConditionalGeneration (top-1, ReLU experts)
};

/// How a family routes: which gating policy (and AnyMoeBlock alternative) it loads into, and
/// which routing keys of config.json are read.
enum class RoutingKind {
  softmax_top_k,   ///< gating::SoftmaxTopK (norm_topk_prob); AnyMoeBlock alternative 0
  deepseek_v2,     ///< gating::DeepSeekV2 (scoring_func softmax, topk_method, groups); 1
  deepseek_v3,     ///< gating::GroupLimitedTopK (sigmoid + selection bias, noaux_tc); 2
  capacity_top_1,  ///< gating::CapacityTopK (expert_capacity); 3
};

/// Which layers hold a sparse MoE block (the others are dense FFNs), as the HF model decides.
enum class SparseLayers {
  every_layer,     ///< every decoder layer
  qwen_step,       ///< not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
  deepseek_dense,  ///< layer >= first_k_dense_replace and layer % moe_layer_freq == 0
  switch_stacks,   ///< encoder then decoder blocks; i % step == 1 (or step == 1) in its stack
};

/// How config.json gives the shared expert's width.
enum class SharedWidth {
  none,          ///< no shared expert
  width,         ///< the key is the width (Qwen2-MoE shared_expert_intermediate_size)
  expert_count,  ///< the key counts routed-width experts (DeepSeek n_shared_experts x d_ff)
};

/// A config.json key and its aliases, in order of preference; unused slots are nullptr. The
/// first one present (and not null) is read; messages name the first.
using ConfigKey = std::array<const char*, 3>;

/// One family: everything the loaders need to know about it.
struct FamilyRow {
  Family family;
  const char* model_type;  ///< config.json "model_type"
  RoutingKind routing;
  const char* gating;  ///< the gating policy's name, for messages
  bool gated_experts;  ///< SwiGLU-style gate/up/down (else a plain two-matrix MLP)

  // config.json keys (our name <- HF names)
  ConfigKey num_layers;   ///< layers (Switch: encoder blocks)
  ConfigKey d_model;      ///< hidden_size
  ConfigKey d_ff;         ///< routed expert width
  ConfigKey dense_d_ff;   ///< dense layers' width (absent: 0, or d_ff when dense_is_d_ff)
  bool dense_is_d_ff;     ///< dense layers have the routed width (Switch)
  ConfigKey num_experts;  ///< routed experts (num_local_experts)
  ConfigKey top_k;        ///< experts per token; empty: fixed_top_k
  Index fixed_top_k;
  SharedWidth shared_width;
  ConfigKey shared_key;
  bool shared_expert_gate;     ///< a sigmoid gate [1 x d_model] scales the shared expert
  const char* norm_topk_prob;  ///< key, or nullptr when the family fixes it
  bool norm_topk_prob_default;
  const char* hidden_act;  ///< activation key
  const char* hidden_act_default;
  SparseLayers sparse_layers;

  // HF state_dict names
  const char* sparse_prefix;        ///< sparse layer's module prefix, e.g. "model.layers.{L}.mlp."
  const char* sparse_prefix_v5;     ///< alternative (transformers v5 in-memory name), or nullptr
  const char* decoder_prefix;       ///< Switch decoder stack's prefix, or nullptr
  const char* dense_prefix;         ///< dense layer's module prefix
  const char* router;               ///< [E x d_model]
  const char* router_bias;          ///< [E] selection bias, or nullptr
  const char* refused_router_bias;  ///< a classifier bias we do not support, or nullptr
  const char* expert_gate;          ///< per expert [d_ff x d_model] (plain MLP: the input matrix)
  const char* expert_up;            ///< per expert [d_ff x d_model], nullptr for a plain MLP
  const char* expert_down;          ///< per expert [d_model x d_ff]
  const char* fused_gate_up;        ///< [E x 2 d_ff x d_model] gate rows first, or nullptr
  const char* fused_down;           ///< [E x d_model x d_ff], or nullptr
  const char* shared_gate;          ///< shared expert [S x d_model] (nullptr: no shared expert)
  const char* shared_up;
  const char* shared_down;
  const char* shared_expert_gate_name;  ///< [1 x d_model], or nullptr
  const char* dense_gate;               ///< dense FFN names, relative to dense_prefix
  const char* dense_up;                 ///< nullptr for a plain MLP
  const char* dense_down;
};

namespace detail {
inline constexpr ConfigKey kNoKey{nullptr, nullptr, nullptr};
}  // namespace detail

// clang-format off
/// The table, one row per family, one line per group of FamilyRow's fields in declaration order:
///   identity (family, model_type, routing, gating name, gated experts);
///   size keys (layers, d_model, d_ff, dense d_ff, dense_is_d_ff, experts, top_k, fixed top_k);
///   shared width rule and key, shared gate, norm_topk_prob key and default, activation key and
///   default; the sparse-layer rule;
///   prefixes (sparse, v5 alternative, decoder, dense); router, selection bias, refused bias;
///   per-expert names; fused names; shared expert names and gate; dense FFN names.
/// The table. Keys and names as transformers 5.17 writes them (the v2 reference cases'
/// hf_config_json; Qwen3MoeConfig saves num_local_experts, Qwen2-MoE and OLMoE num_experts).
inline const std::array<FamilyRow, 7> kFamilies{{
  {Family::mixtral, "mixtral", RoutingKind::softmax_top_k, "gating::SoftmaxTopK", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"intermediate_size"}, detail::kNoKey, false,
   {"num_local_experts", "num_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::none, detail::kNoKey, false, nullptr, true, "hidden_act", "silu",
   SparseLayers::every_layer,
   "model.layers.{L}.block_sparse_moe.", "model.layers.{L}.mlp.", nullptr, "model.layers.{L}.mlp.",
   "gate.weight", nullptr, nullptr,
   "experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight",
   "experts.gate_up_proj", "experts.down_proj",
   nullptr, nullptr, nullptr, nullptr,
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  {Family::qwen2_moe, "qwen2_moe", RoutingKind::softmax_top_k, "gating::SoftmaxTopK", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"moe_intermediate_size"}, {"intermediate_size"}, false,
   {"num_experts", "num_local_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::width, {"shared_expert_intermediate_size"}, true, "norm_topk_prob", false,
   "hidden_act", "silu", SparseLayers::qwen_step,
   "model.layers.{L}.mlp.", nullptr, nullptr, "model.layers.{L}.mlp.",
   "gate.weight", nullptr, nullptr,
   "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight",
   "experts.gate_up_proj", "experts.down_proj",
   "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
   "shared_expert.down_proj.weight", "shared_expert_gate.weight",
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  {Family::qwen3_moe, "qwen3_moe", RoutingKind::softmax_top_k, "gating::SoftmaxTopK", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"moe_intermediate_size"}, {"intermediate_size"}, false,
   {"num_experts", "num_local_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::none, detail::kNoKey, false, "norm_topk_prob", false,
   "hidden_act", "silu", SparseLayers::qwen_step,
   "model.layers.{L}.mlp.", nullptr, nullptr, "model.layers.{L}.mlp.",
   "gate.weight", nullptr, nullptr,
   "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight",
   "experts.gate_up_proj", "experts.down_proj",
   nullptr, nullptr, nullptr, nullptr,
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  {Family::olmoe, "olmoe", RoutingKind::softmax_top_k, "gating::SoftmaxTopK", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"intermediate_size"}, detail::kNoKey, false,
   {"num_experts", "num_local_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::none, detail::kNoKey, false, "norm_topk_prob", false,
   "hidden_act", "silu", SparseLayers::every_layer,
   "model.layers.{L}.mlp.", nullptr, nullptr, "model.layers.{L}.mlp.",
   "gate.weight", nullptr, nullptr,
   "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight",
   "experts.gate_up_proj", "experts.down_proj",
   nullptr, nullptr, nullptr, nullptr,
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  {Family::deepseek_v2, "deepseek_v2", RoutingKind::deepseek_v2, "gating::DeepSeekV2", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"moe_intermediate_size"}, {"intermediate_size"}, false,
   {"n_routed_experts", "num_local_experts", "num_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::expert_count, {"n_shared_experts"}, false, "norm_topk_prob", false,
   "hidden_act", "silu", SparseLayers::deepseek_dense,
   "model.layers.{L}.mlp.", nullptr, nullptr, "model.layers.{L}.mlp.",
   "gate.weight", nullptr, nullptr,
   "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight",
   "experts.gate_up_proj", "experts.down_proj",
   "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
   "shared_experts.down_proj.weight", nullptr,
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  {Family::deepseek_v3, "deepseek_v3", RoutingKind::deepseek_v3, "gating::GroupLimitedTopK", true,
   {"num_hidden_layers"}, {"hidden_size"}, {"moe_intermediate_size"}, {"intermediate_size"}, false,
   {"n_routed_experts", "num_local_experts", "num_experts"}, {"num_experts_per_tok"}, 0,
   SharedWidth::expert_count, {"n_shared_experts"}, false, "norm_topk_prob", true,
   "hidden_act", "silu", SparseLayers::deepseek_dense,
   "model.layers.{L}.mlp.", nullptr, nullptr, "model.layers.{L}.mlp.",
   "gate.weight", "gate.e_score_correction_bias", nullptr,
   "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight",
   "experts.gate_up_proj", "experts.down_proj",
   "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
   "shared_experts.down_proj.weight", nullptr,
   "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  // Switch experts stay a ModuleDict in transformers 5.x: per-expert names only.
  {Family::switch_transformers, "switch_transformers", RoutingKind::capacity_top_1,
   "gating::CapacityTopK", false,
   {"num_layers"}, {"d_model", "hidden_size"}, {"d_ff", "intermediate_size"}, detail::kNoKey, true,
   {"num_experts", "num_local_experts"}, detail::kNoKey, 1,
   SharedWidth::none, detail::kNoKey, false, nullptr, false, "dense_act_fn", "relu",
   SparseLayers::switch_stacks,
   "encoder.block.{L}.layer.1.mlp.", nullptr, "decoder.block.{L}.layer.2.mlp.",
   "encoder.block.{L}.layer.1.mlp.",
   "router.classifier.weight", nullptr, "router.classifier.bias",
   "experts.expert_{e}.wi.weight", nullptr, "experts.expert_{e}.wo.weight",
   nullptr, nullptr,
   nullptr, nullptr, nullptr, nullptr,
   "wi.weight", nullptr, "wo.weight"},
}};
// clang-format on

/// "mixtral, qwen2_moe, ..." in table order, for messages.
inline std::string known_model_types() {
  std::string s;
  for (const FamilyRow& row : kFamilies) {
    if (!s.empty()) s += ", ";
    s += row.model_type;
  }
  return s;
}

/// The row of a family.
inline const FamilyRow& family_row(Family f) {
  for (const FamilyRow& row : kFamilies) {
    if (row.family == f) return row;
  }
  throw value_error("moe: no family table row for this Family value");
}

/// The config.json "model_type" string of a family.
inline const char* family_name(Family f) { return family_row(f).model_type; }

/// The family of a "model_type" string. Throws io_error "moe: <where>: unknown model_type 'x'
/// (known: mixtral, ...)"; `where` names the config file.
inline Family parse_family(const std::string& model_type, const std::string& where) {
  for (const FamilyRow& row : kFamilies) {
    if (model_type == row.model_type) return row.family;
  }
  throw io_error("moe: " + where + ": unknown model_type '" + model_type +
                 "' (known: " + known_model_types() + ")");
}

/// `pattern` with "{L}" replaced by `layer` and "{e}" by `expert`.
inline std::string expand_name(const char* pattern, long long layer, long long expert = -1) {
  std::string s = pattern;
  const std::pair<const char*, long long> fields[] = {{"{L}", layer}, {"{e}", expert}};
  for (const auto& [key, value] : fields) {
    for (std::size_t at = s.find(key); at != std::string::npos; at = s.find(key)) {
      s.replace(at, 3, std::to_string(value));
    }
  }
  return s;
}

}  // namespace moe::io
