// moe/io: the family numbers of config.json (issue 12): a scored policy's Options from the
// family type's defaults and the row's keys, the router extras, the GLU clamps, the combine rules
// and the latent width, read into a ModelSpec (model_spec.hpp) by the row's key names only.
#pragma once

#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/families.hpp"
#include "moe/io/json.hpp"

namespace moe::io::detail {

/// A limit key: a number, or a list whose first entry is one (Step swiglu_limits); absent:
/// fallback; null (or a null entry): no limit.
template <class Spec>
double limit_value(const Spec& s, const char* key, double fallback, const std::string& where) {
  if (key == nullptr) return fallback;
  const auto it = s.json.find(key);
  if (it == s.json.end()) return fallback;
  const nlohmann::json* v = &*it;
  if (v->is_array()) v = v->empty() ? nullptr : &(*v)[0];
  if (v == nullptr || v->is_null()) return std::numeric_limits<double>::infinity();
  if (!v->is_number()) {
    throw io_error("moe: " + where + ": '" + key + "' is " + json_kind(*v) + ", expected a number");
  }
  return v->get<double>();
}

/// The scored-routing keys of the row into the family type's default Options.
template <class O, class Spec>
void fill_scored_options(O& o, const Spec& s, const std::string& where) {
  const FamilyRow& row = s.row();
  if (row.norm_topk_prob != nullptr && find_key(s.json, row.norm_topk_prob) != nullptr) {
    o.normalize = s.norm_topk_prob;
  }
  for (const char* key : row.scaling_key) {
    if (key == nullptr || find_key(s.json, key) == nullptr) continue;
    (row.scaling_on_output ? o.routed_output_scale : o.routed_scaling_factor) =
        s.get_double(key, 1.0);
    break;
  }
  if (row.group_keys) {
    o.n_group = s.get_int("n_group", o.n_group);
    o.topk_group = s.get_int("topk_group", o.topk_group);
  }
  if (row.zero_experts_key != nullptr) o.zero_experts = s.get_int(row.zero_experts_key, 0);
  if (row.norm_min_key != nullptr)
    o.normalize_min = s.get_double(row.norm_min_key, o.normalize_min);
  if (row.normalize_p_key != nullptr) {
    o.normalize_p = s.get_double(row.normalize_p_key, o.normalize_p);
  }
  if (row.scoring_key != nullptr) {
    const std::string fn = s.get_string(row.scoring_key, "softmax");
    if (fn == "sigmoid") {
      // Cohere2: sigmoid of the selected logits in the model's dtype, renormalised without eps.
      o.scoring = gating::Scoring::sigmoid;
      o.float32 = false;
      o.normalize_epsilon = 0;
    } else if (fn != "softmax") {
      throw config_error("moe: " + where + ": " + row.scoring_key + " '" + fn +
                         "' is not supported (expected 'softmax' or 'sigmoid')");
    }
  }
}

/// The row's family numbers: scored Options, router extras, GLU clamps, combine rules.
template <class Spec>
void parse_family_numbers(Spec& s, const std::string& where) {
  const FamilyRow& row = s.row();
  MoeConfig& m = s.moe;
  if (row.refused_key != nullptr && find_key(s.json, row.refused_key) != nullptr) {
    throw config_error("moe: " + where + ": " + row.refused_key + " = " +
                       find_key(s.json, row.refused_key)->dump() + " is not supported");
  }
  if (row.biased_defaults != nullptr) {
    s.biased_options = row.biased_defaults();
    fill_scored_options(s.biased_options, s, where);
  }
  if (row.scored_defaults != nullptr) {
    s.scored_options = row.scored_defaults();
    fill_scored_options(s.scored_options, s, where);
  }
  if (row.hash_defaults != nullptr) {
    s.hash_options = row.hash_defaults();
    fill_scored_options(s.hash_options, s, where);
  }
  if (row.jitter_key != nullptr) s.jitter_eps = s.get_double(row.jitter_key, 0.01);
  if (row.softcap_key != nullptr) m.router_logit_softcap = s.get_double(row.softcap_key, 0.0);
  if (row.router_norm_eps_key != nullptr) {
    m.router_norm_eps = s.get_double(row.router_norm_eps_key, 1e-6);
  }
  m.expert_glu.limit = limit_value(s, row.limit_key, row.limit_default, where);
  m.expert_glu.clamp_after_activation = row.clamp_after_activation;
  m.expert_glu.up_offset = row.up_offset;
  m.expert_glu.alpha = row.glu_alpha;
  if (row.shared_same_limit) m.shared_glu = m.expert_glu;
  if (row.shared_limit_key != nullptr) {
    m.shared_glu.limit = limit_value(s, row.shared_limit_key, row.limit_default, where);
    m.shared_glu.clamp_after_activation = row.clamp_after_activation;
  }
  m.weight_expert_input = row.weight_expert_input;
  if (row.latent_key != nullptr) m.latent_dim = s.get_int(row.latent_key, 0);
  if (row.shared_combine_key != nullptr) {
    const std::string how = s.get_string(row.shared_combine_key, "sum");
    if (how != "sum" && how != "average") {
      throw config_error("moe: " + where + ": " + row.shared_combine_key + " '" + how +
                         "' is not supported (expected 'sum' or 'average')");
    }
    m.shared_combine = how == "average" ? SharedCombine::average : SharedCombine::sum;
  }
  if (row.fp32_combine_key != nullptr)
    m.combine_in_float32 = s.get_bool(row.fp32_combine_key, false);
}

}  // namespace moe::io::detail
