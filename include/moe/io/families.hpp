// moe/io: the one table of checkpoint families (the row type: family_row.hpp). Every per-family
// fact the loaders use lives in a row: the config.json "model_type", the gating policy it routes
// with and the keys that fill its Options, the config.json key names (with the aliases
// transformers 5.17 writes), which layers are sparse, and the Hugging Face state_dict names of the
// router, its extras, the routed experts (per expert, and the fused layouts), the selection bias
// and the shared expert. Adding a family whose routing, FFN kind and layout exist is adding a row
// here; config.json parsing (model_spec.hpp) and the loaders (load_weights.hpp, load_block.hpp)
// read the row, never the family name.
//
// Name templates: "{L}" is the layer index within its stack, "{e}" the expert index; expert and
// shared-expert names are relative to the layer prefix.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/family_row.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

namespace detail {

// clang-format off
/// The rows. Keys and names as transformers 5.17 writes them (the v2 reference cases'
/// hf_config_json and state_dict names; FORMAT.md section 6 for the formulas).
inline std::vector<FamilyRow> make_family_table() {
  using RK = RoutingKind;
  std::vector<FamilyRow> t;
  // ---- the first seven (keys and messages as before issue 12) ----
  {
    FamilyRow r = v5_row(Family::mixtral, "mixtral", RK::softmax_top_k, "gating::SoftmaxTopK");
    r.num_layers = {"num_hidden_layers"}; r.d_model = {"hidden_size"}; r.d_ff = {"intermediate_size"};
    r.num_experts = {"num_local_experts", "num_experts"}; r.top_k = {"num_experts_per_tok"};
    r.sparse_prefix = "model.layers.{L}.block_sparse_moe."; r.sparse_prefix_v5 = "model.layers.{L}.mlp.";
    r.expert_gate = "experts.{e}.w1.weight"; r.expert_up = "experts.{e}.w3.weight";
    r.expert_down = "experts.{e}.w2.weight";
    t.push_back(r);
  }
  auto legacy = [](FamilyRow r, ConfigKey d_ff, ConfigKey dense, ConfigKey experts) {
    r.num_layers = {"num_hidden_layers"}; r.d_model = {"hidden_size"}; r.d_ff = d_ff;
    r.dense_d_ff = dense; r.num_experts = experts; r.top_k = {"num_experts_per_tok"};
    r.norm_topk_prob = "norm_topk_prob"; r.norm_topk_prob_default = false;
    return r;
  };
  {
    FamilyRow r = legacy(v5_row(Family::qwen2_moe, "qwen2_moe", RK::softmax_top_k, "gating::SoftmaxTopK"),
                         {"moe_intermediate_size"}, {"intermediate_size"}, {"num_experts", "num_local_experts"});
    r.sparse_layers = SparseLayers::qwen_step;
    r = with_shared(r, SharedWidth::width, {"shared_expert_intermediate_size"}, MOE_SHARED_NAMES("shared_expert."));
    r.shared_expert_gate = true; r.shared_expert_gate_name = "shared_expert_gate.weight";
    t.push_back(r);
  }
  {
    FamilyRow r = legacy(v5_row(Family::qwen3_moe, "qwen3_moe", RK::softmax_top_k, "gating::SoftmaxTopK"),
                         {"moe_intermediate_size"}, {"intermediate_size"}, {"num_experts", "num_local_experts"});
    r.sparse_layers = SparseLayers::qwen_step;
    t.push_back(r);
  }
  t.push_back(legacy(v5_row(Family::olmoe, "olmoe", RK::softmax_top_k, "gating::SoftmaxTopK"),
                     {"intermediate_size"}, kNoKey, {"num_experts", "num_local_experts"}));
  for (const bool v3 : {false, true}) {
    FamilyRow r = legacy(v3 ? v5_row(Family::deepseek_v3, "deepseek_v3", RK::deepseek_v3, "gating::GroupLimitedTopK")
                            : v5_row(Family::deepseek_v2, "deepseek_v2", RK::deepseek_v2, "gating::DeepSeekV2"),
                         {"moe_intermediate_size"}, {"intermediate_size"},
                         {"n_routed_experts", "num_local_experts", "num_experts"});
    r.norm_topk_prob_default = v3;
    r.sparse_layers = SparseLayers::deepseek_dense;
    if (v3) r.router_bias = "gate.e_score_correction_bias";
    t.push_back(with_shared(r, SharedWidth::expert_count, {"n_shared_experts"}, MOE_SHARED_NAMES("shared_experts.")));
  }
  {
    // Switch experts stay a ModuleDict in transformers 5.x: per-expert names only.
    FamilyRow r = v5_row(Family::switch_transformers, "switch_transformers", RK::capacity_top_1, "gating::CapacityTopK");
    r.gated_experts = false; r.expert_kind = ExpertKind::relu;
    r.num_layers = {"num_layers"}; r.d_model = {"d_model", "hidden_size"}; r.d_ff = {"d_ff", "intermediate_size"};
    r.dense_is_d_ff = true; r.num_experts = {"num_experts", "num_local_experts"}; r.top_k = kNoKey;
    r.fixed_top_k = 1; r.norm_topk_prob_default = false; r.hidden_act = "dense_act_fn"; r.hidden_act_default = "relu";
    r.sparse_layers = SparseLayers::switch_stacks;
    r.sparse_prefix = "encoder.block.{L}.layer.1.mlp."; r.decoder_prefix = "decoder.block.{L}.layer.2.mlp.";
    r.dense_prefix = "encoder.block.{L}.layer.1.mlp.";
    r.router = "router.classifier.weight"; r.refused_router_bias = "router.classifier.bias";
    r.expert_gate = "experts.expert_{e}.wi.weight"; r.expert_up = nullptr; r.expert_down = "experts.expert_{e}.wo.weight";
    r.fused_gate_up = r.fused_down = nullptr;
    r.dense_gate = "wi.weight"; r.dense_up = nullptr; r.dense_down = "wo.weight";
    t.push_back(r);
  }

  // ---- softmax top-k (gating::SoftmaxTopK) ----
  auto softmax = [](Family f, const char* type, bool norm_default) {
    FamilyRow r = v5_row(f, type, RK::softmax_top_k, "gating::SoftmaxTopK");
    r.norm_topk_prob = "norm_topk_prob";
    r.norm_topk_prob_default = norm_default;
    return r;
  };
  t.push_back(softmax(Family::flex_olmo, "flex_olmo", false));
  {
    FamilyRow r = softmax(Family::jamba, "jamba", false);
    r.norm_topk_prob = nullptr; r.sparse_prefix = "model.layers.{L}.feed_forward."; r.router = "router.weight";
    t.push_back(r);
  }
  {
    FamilyRow r = softmax(Family::minimax, "minimax", true);
    r.norm_topk_prob = nullptr; r.sparse_prefix = "model.layers.{L}.block_sparse_moe.";
    t.push_back(r);
  }
  for (const auto& [f, type] : {std::pair<Family, const char*>{Family::qwen3_next, "qwen3_next"},
                                {Family::qwen3_5_moe, "qwen3_5_moe_text"}}) {
    FamilyRow r = with_shared(softmax(f, type, true), SharedWidth::width, {"shared_expert_intermediate_size"},
                              MOE_SHARED_NAMES("shared_expert."));
    r.shared_expert_gate = true; r.shared_expert_gate_name = "shared_expert_gate.weight";
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(softmax(Family::hunyuan_v1_moe, "hunyuan_v1_moe", true), SharedWidth::one_expert,
                              {"num_shared_expert"}, MOE_SHARED_NAMES("shared_mlp."));
    r.norm_topk_prob = nullptr; r.d_ff = {"moe_intermediate_size", "intermediate_size"}; r.router = "gate.wg.weight";
    t.push_back(r);
  }
  {
    FamilyRow r = softmax(Family::gemma4, "gemma4_text", true);
    r.norm_topk_prob = nullptr; r.expert_kind = ExpertKind::geglu_tanh;
    r.hidden_act = "hidden_activation"; r.hidden_act_default = "gelu_pytorch_tanh";
    r.router = "router.proj.weight"; r.router_input_scale = "router.scale";
    r.expert_weight_scale = "router.per_expert_scale"; r.router_norm_eps_key = "rms_norm_eps";
    // The MoE branch lives in Gemma4TextDecoderLayer: router, experts and its norms side by side.
    r.sparse_prefix = r.dense_prefix = "model.layers.{L}.";
    r.expert_input_norm = "pre_feedforward_layernorm_2.weight";
    r.expert_output_norm = "post_feedforward_layernorm_2.weight";
    t.push_back(r);
  }

  // ---- scored top-k without a selection bias (gating::ScoredTopK) ----
  auto scored = [](Family f, const char* type, gating::ScoredTopK::Options (*defaults)()) {
    FamilyRow r = v5_row(f, type, RK::scored, "gating::ScoredTopK");
    r.scored_defaults = defaults;
    return r;
  };
  {
    FamilyRow r = scored(Family::gpt_oss, "gpt_oss", &scored_defaults_of<gating::GptOss>);
    r.d_ff = {"intermediate_size"}; r.router = "router.weight"; r.router_logit_bias = "router.bias";
    r.fused_layout = FusedLayout::in_out_interleaved;
    r.expert_in_bias = "experts.gate_up_proj_bias"; r.expert_out_bias = "experts.down_proj_bias";
    r.limit_key = "swiglu_limit"; r.limit_default = 7.0; r.up_offset = 1.0; r.glu_alpha = 1.702;
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(scored(Family::llama4, "llama4_text", &scored_defaults_of<gating::Llama4>),
                              SharedWidth::one_expert, kNoKey, MOE_SHARED_NAMES("shared_expert."));
    r.d_ff = {"intermediate_size"}; r.sparse_prefix = "model.layers.{L}.feed_forward.";
    r.router = "router.weight"; r.fused_layout = FusedLayout::in_out; r.weight_expert_input = true;
    t.push_back(r);
  }
  for (const bool shared : {false, true}) {
    FamilyRow r = scored(shared ? Family::granitemoeshared : Family::granitemoe,
                         shared ? "granitemoeshared" : "granitemoe", &scored_defaults_of<gating::GraniteMoe>);
    r.d_ff = {"intermediate_size"}; r.sparse_prefix = "model.layers.{L}.";
    r.router = "block_sparse_moe.router.weight";
    r.fused_gate_up = "block_sparse_moe.experts.gate_up_proj"; r.fused_down = "block_sparse_moe.experts.down_proj";
    r.expert_gate = r.expert_up = r.expert_down = nullptr;
    if (shared) {
      r.shared_width = SharedWidth::width; r.shared_key = {"shared_intermediate_size"};
      r.shared_fused_in = "shared_mlp.input_linear.weight"; r.shared_down = "shared_mlp.output_linear.weight";
      r.shared_optional = true;
    }
    t.push_back(r);
  }
  {
    FamilyRow r = scored(Family::jetmoe, "jetmoe", &scored_defaults_of<gating::JetMoe>);
    r.d_ff = {"intermediate_size"}; r.hidden_act = "activation_function"; r.router = "router.layer.weight";
    r.fused_gate_up = "input_linear.weight"; r.fused_down = "output_linear.weight"; r.output_bias = "bias";
    r.expert_gate = r.expert_up = r.expert_down = nullptr;
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(scored(Family::cohere2_moe, "cohere2_moe", &scored_defaults_of<gating::Cohere2Moe>),
                              SharedWidth::expert_count, {"num_shared_experts"}, MOE_SHARED_NAMES("shared_experts."));
    r.d_ff = {"intermediate_size"}; r.norm_topk_prob = "norm_topk_prob"; r.scoring_key = "expert_selection_fn";
    r.shared_combine_key = "shared_expert_combination_strategy";
    t.push_back(r);
  }
  {
    FamilyRow r = scored(Family::dbrx, "dbrx", &scored_defaults_of<gating::Dbrx>);
    r.num_layers = {"n_layers"}; r.d_model = {"d_model"}; r.d_ff = {"ffn_config.ffn_hidden_size"};
    r.num_experts = {"ffn_config.moe_num_experts"}; r.top_k = {"ffn_config.moe_top_k"};
    r.hidden_act = "ffn_config.ffn_act_fn.name"; r.normalize_p_key = "ffn_config.moe_normalize_expert_weights";
    r.sparse_prefix = r.dense_prefix = "transformer.blocks.{L}.ffn."; r.router = "router.layer.weight";
    r.fused_layout = FusedLayout::stacked_rows; r.fused_gate_up = "experts.mlp.w1";
    r.fused_up = "experts.mlp.v1"; r.fused_down = "experts.mlp.w2";
    r.expert_gate = r.expert_up = r.expert_down = nullptr;
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(scored(Family::mistral4, "mistral4", &scored_defaults_of<gating::Mistral4>),
                              SharedWidth::expert_count, {"n_shared_experts"}, MOE_SHARED_NAMES("shared_experts."));
    r.norm_topk_prob = "norm_topk_prob"; r.scaling_key = {"routed_scaling_factor"}; r.group_keys = true;
    t.push_back(r);
  }
  {
    FamilyRow r = v5_row(Family::phimoe, "phimoe", RK::sparsemixer, "gating::Sparsemixer");
    r.d_ff = {"intermediate_size"}; r.sparse_prefix = "model.layers.{L}.block_sparse_moe.";
    r.router = "router.weight"; r.jitter_key = "router_jitter_noise";
    t.push_back(r);
  }

  // ---- scored top-k with a selection bias (gating::BiasedScoredTopK) ----
  t.push_back(ds3_row(Family::deepseek_v32, "deepseek_v32", &biased_defaults_of<gating::DeepSeekV32>));
  t.push_back(ds3_row(Family::dots1, "dots1", &biased_defaults_of<gating::Dots1>));
  t.push_back(ds3_row(Family::glm4_moe, "glm4_moe", &biased_defaults_of<gating::Glm4Moe>));
  t.push_back(ds3_row(Family::glm4_moe_lite, "glm4_moe_lite", &biased_defaults_of<gating::Glm4MoeLite>));
  t.push_back(ds3_row(Family::solar_open, "solar_open", &biased_defaults_of<gating::SolarOpen>));
  t.push_back(ds3_row(Family::exaone_moe, "exaone_moe", &biased_defaults_of<gating::ExaoneMoe>));
  t.push_back(ds3_row(Family::mimo_v2_flash, "mimo_v2_flash", &biased_defaults_of<gating::MimoV2Flash>));
  {
    FamilyRow r = ds3_row(Family::deepseek_v4, "deepseek_v4", &biased_defaults_of<gating::DeepSeekV4>);
    r.group_keys = false; r.limit_key = "swiglu_limit"; r.shared_same_limit = true;
    r.layer_types_key = "mlp_layer_types"; r.expert_table = "gate.tid2eid";
    r.hash_defaults = &scored_defaults_of<gating::DeepSeekV4Hash>;
    t.push_back(r);
  }
  {
    FamilyRow r = ds3_row(Family::nemotron_h, "nemotron_h", &biased_defaults_of<gating::NemotronH>);
    r.gated_experts = false; r.expert_kind = ExpertKind::relu2;
    r.hidden_act = "mlp_hidden_act"; r.hidden_act_default = "relu2";
    r.sparse_prefix = r.dense_prefix = "backbone.layers.{L}.mixer.";
    r.fused_layout = FusedLayout::plain_out_in; r.fused_gate_up = "experts.up_proj";
    r.expert_gate = "experts.{e}.up_proj.weight"; r.expert_up = nullptr;
    r.shared_width = SharedWidth::width; r.shared_key = {"moe_shared_expert_intermediate_size"};
    r.shared_gate = "shared_experts.up_proj.weight"; r.shared_up = nullptr;
    r.sparse_layers = SparseLayers::listed; r.layers_key = "layers_block_type";
    r.latent_key = "moe_latent_size";
    r.latent_in = "fc1_latent_proj.weight"; r.latent_out = "fc2_latent_proj.weight";
    t.push_back(r);
  }
  auto biased = [](Family f, const char* type, gating::BiasedScoredTopK::Options (*defaults)(),
                   const char* bias) {
    FamilyRow r = v5_row(f, type, RK::biased_scored, "gating::BiasedScoredTopK");
    r.biased_defaults = defaults;
    r.router_bias = bias;
    return r;
  };
  {
    FamilyRow r = with_shared(biased(Family::afmoe, "afmoe", &biased_defaults_of<gating::Afmoe>, "expert_bias"),
                              SharedWidth::expert_count, {"num_shared_experts"}, MOE_SHARED_NAMES("shared_experts."));
    r.router = "router.gate.weight"; r.scaling_key = {"route_scale"};
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(biased(Family::hy_v3, "hy_v3", &biased_defaults_of<gating::HyV3>, "e_score_correction_bias"),
                              SharedWidth::expert_count, {"num_shared_experts"}, MOE_SHARED_NAMES("shared_experts."));
    r.scaling_key = {"router_scaling_factor"}; r.fp32_combine_key = "enable_moe_fp32_combine";
    t.push_back(r);
  }
  {
    FamilyRow r = biased(Family::minimax_m2, "minimax_m2", &biased_defaults_of<gating::MiniMaxM2>, "e_score_correction_bias");
    r.d_ff = {"intermediate_size"}; r.sparse_prefix = "model.layers.{L}.block_sparse_moe.";
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(biased(Family::laguna, "laguna", &biased_defaults_of<gating::Laguna>, "gate.e_score_correction_bias"),
                              SharedWidth::width, {"shared_expert_intermediate_size"}, MOE_SHARED_NAMES("shared_experts."));
    r.scaling_key = {"moe_routed_scaling_factor"}; r.scaling_on_output = true;
    r.softcap_key = "moe_router_logit_softcapping";
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(biased(Family::step3p7, "step3p5", &biased_defaults_of<gating::Step3p7>, "gate.e_score_correction_bias"),
                              SharedWidth::width, {"share_expert_dim"}, MOE_SHARED_NAMES("shared_experts."));
    r.scaling_key = {"moe_router_scaling_factor"}; r.scaling_on_output = true;
    r.limit_key = "swiglu_limits"; r.shared_limit_key = "swiglu_limits_shared"; r.clamp_after_activation = true;
    t.push_back(r);
  }
  {
    FamilyRow r = biased(Family::lfm2_moe, "lfm2_moe", &biased_defaults_of<gating::Lfm2Moe>, "expert_bias");
    r.sparse_prefix = "model.layers.{L}.feed_forward."; r.scaling_key = {"routed_scaling_factor"};
    r.norm_topk_prob = "norm_topk_prob";
    t.push_back(r);
  }
  {
    FamilyRow r = with_shared(biased(Family::ernie4_5_moe, "ernie4_5_moe", &biased_defaults_of<gating::Ernie4_5Moe>,
                                     "gate.moe_statics.e_score_correction_bias"),
                              SharedWidth::expert_count, {"moe_num_shared_experts"}, MOE_SHARED_NAMES("shared_experts."));
    r.num_experts = {"moe_num_experts"}; r.top_k = {"moe_k"}; r.norm_min_key = "moe_norm_min";
    t.push_back(r);
  }
  {
    FamilyRow r = biased(Family::longcat_flash, "longcat_flash", &biased_defaults_of<gating::LongcatFlash>,
                         "router.e_score_correction_bias");
    r.d_ff = {"expert_ffn_hidden_size"}; r.top_k = {"moe_topk"}; r.router = "router.classifier.weight";
    r.zero_experts_key = "zero_expert_num"; r.scaling_key = {"routed_scaling_factor"};
    t.push_back(r);
  }
  return t;
}
// clang-format on

}  // namespace detail

/// The table, one row per family, built once.
inline const std::vector<FamilyRow>& family_table() {
  static const std::vector<FamilyRow> table = detail::make_family_table();
  return table;
}

/// The table (kept under its first name).
inline const std::vector<FamilyRow>& kFamilies = family_table();

/// "mixtral, qwen2_moe, ..." in table order, for messages.
inline std::string known_model_types() {
  std::string s;
  for (const FamilyRow& row : family_table()) {
    if (!s.empty()) s += ", ";
    s += row.model_type;
  }
  return s;
}

/// The row of a family.
inline const FamilyRow& family_row(Family f) {
  for (const FamilyRow& row : family_table()) {
    if (row.family == f) return row;
  }
  throw value_error("moe: no family table row for this Family value");
}

/// The config.json "model_type" string of a family.
inline const char* family_name(Family f) { return family_row(f).model_type; }

/// The family of a "model_type" string. Throws io_error "moe: <where>: unknown model_type 'x'
/// (known: mixtral, ...)"; `where` names the config file.
inline Family parse_family(const std::string& model_type, const std::string& where) {
  for (const FamilyRow& row : family_table()) {
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
