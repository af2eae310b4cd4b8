// moe/io: config.json read once into a ModelSpec (family, sizes, routing numbers, which layers are
// sparse), in our vocabulary. Which keys are read is the family's row of families.hpp; this file
// holds the rules shared by families (sparse-layer rules, routing keys) and no family name.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/families.hpp"
#include "moe/io/family_numbers.hpp"
#include "moe/io/json.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// Everything the MoE layers of a checkpoint need from its config.json, in our vocabulary. The
/// parsed JSON stays available (`json`, the get_* helpers) for the rest of the user's model.
struct ModelSpec {
  Family family = Family::mixtral;
  std::string source;   ///< the config file, for messages
  nlohmann::json json;  ///< the whole config.json

  /// Decoder layers (num_hidden_layers); Switch: encoder blocks then decoder blocks, numbered
  /// 0 .. num_layers + num_decoder_layers - 1 (see moe_prefix).
  Index num_layers = 0;
  /// Sizes of every sparse layer: d_model (hidden_size / d_model), d_ff (the routed expert width),
  /// num_experts, top_k, shared expert width and gate.
  MoeConfig moe;
  Index dense_d_ff = 0;             ///< intermediate_size / d_ff of the dense layers (0: none)
  std::string hidden_act = "silu";  ///< hidden_act (Switch: dense_act_fn)
  bool norm_topk_prob = true;       ///< Mixtral: always true

  // DeepSeek
  std::string scoring_func = "softmax";  ///< scoring_func (V3: "sigmoid")
  std::string topk_method = "greedy";    ///< greedy / group_limited_greedy / noaux_tc
  Index n_group = 1;                     ///< n_group
  Index topk_group = 1;                  ///< topk_group
  double routed_scaling_factor = 1.0;    ///< routed_scaling_factor
  Index first_k_dense_replace = 0;       ///< layers below it are dense
  Index moe_layer_freq = 1;              ///< moe_layer_freq
  /// FP8 block size of quantization_config.weight_block_size ([128, 128] in DeepSeek-V3).
  Index fp8_block_rows = 128, fp8_block_cols = 128;

  // Qwen2-MoE / Qwen3-MoE
  Index decoder_sparse_step = 1;       ///< decoder_sparse_step
  std::vector<Index> mlp_only_layers;  ///< mlp_only_layers (dense)

  // Switch Transformers
  Index num_encoder_layers = 0;   ///< num_layers
  Index num_decoder_layers = 0;   ///< num_decoder_layers
  Index encoder_sparse_step = 1;  ///< encoder_sparse_step
  Index expert_capacity = 0;      ///< expert_capacity
  bool router_bias = false;       ///< router_bias (a classifier bias; not supported)

  // Scored routing (RoutingKind scored / biased_scored / sparsemixer): the family type's
  // defaults with what config.json gives (the row's keys).
  gating::BiasedScoredTopK::Options biased_options;
  gating::ScoredTopK::Options scored_options;
  gating::ScoredTopK::Options hash_options;  ///< DeepSeek-V4 hash layers
  double jitter_eps = 0.01;                  ///< Sparsemixer router_jitter_noise

  /// Whether `layer` routes by token id (the row's layer_types_key names it "hash_moe").
  bool is_hash_layer(Index layer) const {
    if (row().layer_types_key == nullptr) return false;
    const nlohmann::json* v = detail::find_key(json, row().layer_types_key);
    return v != nullptr && v->is_array() && layer >= 0 &&
           static_cast<std::size_t>(layer) < v->size() &&
           (*v)[static_cast<std::size_t>(layer)] == "hash_moe";
  }

  /// The family's row of the table (key and tensor names, rules).
  const FamilyRow& row() const { return family_row(family); }

  /// Integer `key` of config.json. Throws io_error when it is absent (or null) or not an integer.
  Index get_int(const std::string& key) const {
    const nlohmann::json* v = detail::find_key(json, key);
    if (v == nullptr) throw io_error("moe: " + source + ": missing key '" + key + "'");
    return as_int(key, *v);
  }
  /// Integer `key`, or `fallback` when absent or null.
  Index get_int(const std::string& key, Index fallback) const {
    const nlohmann::json* v = detail::find_key(json, key);
    return v == nullptr ? fallback : as_int(key, *v);
  }
  /// Integer under the first present name of `key` (a key and its aliases). Throws io_error
  /// "missing key 'a' (or 'b')" when none is present.
  Index get_int(const ConfigKey& key) const {
    for (const char* name : key) {
      if (name != nullptr && detail::find_key(json, name) != nullptr) return get_int(name);
    }
    std::string names = std::string("'") + key[0] + "'";
    for (std::size_t i = 1; i < key.size() && key[i] != nullptr; ++i) {
      names += std::string(i == 1 ? " (or '" : ", '") + key[i] + "'";
    }
    if (key[1] != nullptr) names += ")";
    throw io_error("moe: " + source + ": missing key " + names);
  }
  /// Integer under the first present name of `key`, or `fallback` (also when `key` is empty).
  Index get_int(const ConfigKey& key, Index fallback) const {
    for (const char* name : key) {
      if (name != nullptr && detail::find_key(json, name) != nullptr) return get_int(name);
    }
    return fallback;
  }
  /// Number `key` (integer or float), or `fallback` when absent or null.
  double get_double(const std::string& key, double fallback) const {
    const nlohmann::json* v = detail::find_key(json, key);
    if (v == nullptr) return fallback;
    if (!v->is_number()) throw type_error(key, *v, "a number");
    return v->get<double>();
  }
  /// Boolean `key`, or `fallback` when absent or null.
  bool get_bool(const std::string& key, bool fallback) const {
    const nlohmann::json* v = detail::find_key(json, key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) throw type_error(key, *v, "true or false");
    return v->get<bool>();
  }
  /// String `key`, or `fallback` when absent or null.
  std::string get_string(const std::string& key, const std::string& fallback) const {
    const nlohmann::json* v = detail::find_key(json, key);
    if (v == nullptr) return fallback;
    if (!v->is_string()) throw type_error(key, *v, "a string");
    return v->get<std::string>();
  }

  /// Total layer count addressed by `layer` arguments (Switch: encoder + decoder blocks).
  Index total_layers() const {
    return row().sparse_layers == SparseLayers::switch_stacks
               ? num_encoder_layers + num_decoder_layers
               : num_layers;
  }

  /// Whether `layer` holds a sparse MoE block (else a dense FFN), as the HF model decides:
  /// Qwen: not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0; DeepSeek:
  /// layer >= first_k_dense_replace and layer % moe_layer_freq == 0; Switch: i % step == 1 or
  /// step == 1 within its stack. Throws config_error for a layer out of range.
  bool is_moe_layer(Index layer) const {
    check_layer(layer);
    switch (row().sparse_layers) {
      case SparseLayers::every_layer:
        return true;
      case SparseLayers::qwen_step:
        return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) ==
                   mlp_only_layers.end() &&
               (layer + 1) % decoder_sparse_step == 0;
      case SparseLayers::deepseek_dense:
        return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
      case SparseLayers::listed: {
        const nlohmann::json* v = detail::find_key(json, row().layers_key);
        if (v == nullptr || !v->is_array() || static_cast<std::size_t>(layer) >= v->size()) {
          return true;
        }
        const auto& type = (*v)[static_cast<std::size_t>(layer)];
        return type == "moe" || type == "hash_moe" || type == "sparse";
      }
      case SparseLayers::switch_stacks: {
        const bool decoder = layer >= num_encoder_layers;
        const Index i = decoder ? layer - num_encoder_layers : layer;
        const Index step = decoder ? decoder_sparse_step : encoder_sparse_step;
        return step > 0 && (step == 1 || i % step == 1);
      }
    }
    return false;
  }

  /// Module prefix of layer `layer`'s FFN, ending in '.': the row's sparse_prefix for a sparse
  /// layer ("model.layers.N.mlp.", Mixtral "model.layers.N.block_sparse_moe."), its dense_prefix
  /// for a dense one; Switch: "encoder.block.i.layer.1.mlp." or "decoder.block.i.layer.2.mlp.".
  std::string moe_prefix(Index layer) const {
    check_layer(layer);
    const FamilyRow& r = row();
    if (r.decoder_prefix != nullptr && layer >= num_encoder_layers) {
      return expand_name(r.decoder_prefix, layer - num_encoder_layers);
    }
    return expand_name(is_moe_layer(layer) ? r.sparse_prefix : r.dense_prefix, layer);
  }

  /// Throws config_error unless 0 <= layer < total_layers().
  void check_layer(Index layer) const {
    if (layer < 0 || layer >= total_layers()) {
      throw config_error(moe::detail::concat("moe: layer ", layer, " out of range [0, ",
                                             total_layers(), ") of ", source));
    }
  }

 private:
  io_error type_error(const std::string& key, const nlohmann::json& v, const char* want) const {
    return io_error("moe: " + source + ": '" + key + "' is " + detail::json_kind(v) +
                    ", expected " + want);
  }
  Index as_int(const std::string& key, const nlohmann::json& v) const {
    if (!v.is_number_integer()) throw type_error(key, v, "an integer");
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > (std::uint64_t(1) << 62)) {
      throw io_error("moe: " + source + ": '" + key + "' = " + v.dump() + " is out of range");
    }
    return static_cast<Index>(v.get<std::int64_t>());
  }
};

/// Largest layer count or shared width a config.json may give: sums and products of two such
/// values stay inside 64 bits.
inline constexpr Index kMaxConfigCount = Index(1) << 40;

namespace detail {

/// The routing keys of config.json for the row's RoutingKind (DeepSeek groups and scaling, FP8
/// block size; Switch capacity).
inline void parse_routing_keys(ModelSpec& s, const std::string& where,
                               const std::string& model_type) {
  const RoutingKind kind = s.row().routing;
  if (kind == RoutingKind::capacity_top_1) {
    s.expert_capacity = s.get_int("expert_capacity", 64);
    s.router_bias = s.get_bool("router_bias", false);
    return;
  }
  if (kind != RoutingKind::deepseek_v2 && kind != RoutingKind::deepseek_v3) return;
  const bool v3 = kind == RoutingKind::deepseek_v3;
  s.scoring_func = s.get_string("scoring_func", v3 ? "sigmoid" : "softmax");
  s.topk_method = s.get_string("topk_method", v3 ? "noaux_tc" : "greedy");
  s.n_group = s.get_int("n_group", 1);
  s.topk_group = s.get_int("topk_group", 1);
  s.routed_scaling_factor = s.get_double("routed_scaling_factor", 1.0);
  const std::string want = v3 ? "sigmoid" : "softmax";
  if (s.scoring_func != want) {
    throw config_error("moe: " + where + ": scoring_func '" + s.scoring_func + "' is not " +
                       "supported for " + model_type + " (expected '" + want + "')");
  }
  if (v3 ? s.topk_method != "noaux_tc"
         : (s.topk_method != "greedy" && s.topk_method != "group_limited_greedy")) {
    throw config_error("moe: " + where + ": topk_method '" + s.topk_method +
                       "' is not supported for " + model_type);
  }
  if (!v3 && s.topk_method == "greedy") s.n_group = s.topk_group = 1;
  if (const nlohmann::json* q = find_key(s.json, "quantization_config")) {
    if (const nlohmann::json* b = q->is_object() ? find_key(*q, "weight_block_size") : nullptr) {
      if (!b->is_array() || b->size() != 2 || !(*b)[0].is_number_integer() ||
          !(*b)[1].is_number_integer() || (*b)[0].get<std::int64_t>() <= 0 ||
          (*b)[1].get<std::int64_t>() <= 0) {
        throw io_error("moe: " + where +
                       ": quantization_config.weight_block_size must be two positive integers");
      }
      s.fp8_block_rows = static_cast<Index>((*b)[0].get<std::int64_t>());
      s.fp8_block_cols = static_cast<Index>((*b)[1].get<std::int64_t>());
    }
  }
}

/// The keys of the row's SparseLayers rule (steps, dense layers, encoder/decoder stacks).
inline void parse_layer_keys(ModelSpec& s, const std::string& where) {
  switch (s.row().sparse_layers) {
    case SparseLayers::every_layer:
    case SparseLayers::listed:
      return;
    case SparseLayers::qwen_step:
      s.decoder_sparse_step = s.get_int("decoder_sparse_step", 1);
      if (const nlohmann::json* v = find_key(s.json, "mlp_only_layers")) {
        if (!v->is_array()) {
          throw io_error("moe: " + where + ": 'mlp_only_layers' is " + json_kind(*v) +
                         ", expected an array");
        }
        for (const auto& e : *v) {
          if (!e.is_number_integer()) {
            throw io_error("moe: " + where + ": 'mlp_only_layers' holds " + json_kind(e) +
                           ", expected integers");
          }
          s.mlp_only_layers.push_back(static_cast<Index>(e.get<std::int64_t>()));
        }
      }
      return;
    case SparseLayers::deepseek_dense:
      s.first_k_dense_replace = s.get_int("first_k_dense_replace", 0);
      s.moe_layer_freq = s.get_int("moe_layer_freq", 1);
      return;
    case SparseLayers::switch_stacks:
      s.num_encoder_layers = s.num_layers;
      s.num_decoder_layers = s.get_int("num_decoder_layers", s.num_encoder_layers);
      s.encoder_sparse_step = s.get_int("encoder_sparse_step", 1);
      s.decoder_sparse_step = s.get_int("decoder_sparse_step", 1);
      if (s.num_decoder_layers < 0) {
        throw config_error(moe::detail::concat(
            "moe: ", where, ": num_decoder_layers = ", s.num_decoder_layers, " must be >= 0"));
      }
      return;
  }
}

}  // namespace detail

/// Parses the text of a config.json. `where` names the file in messages. Keys are the HF ones,
/// aliases included (the family's row in families.hpp); absent optional keys take the HF
/// defaults of the family.
/// Throws io_error for text that is not a JSON object, a missing "model_type", an unknown family
/// (the message lists the supported ones), a missing required size or a value of the wrong JSON
/// type; config_error for sizes out of range (MoeConfig::validate) and a non-positive step or
/// group count.
inline ModelSpec parse_model_spec(const std::string& text, const std::string& where) {
  ModelSpec s;
  s.source = where;
  try {
    // Duplicate keys: the last wins, as in Python's json; Infinity / NaN literals read as null.
    s.json = nlohmann::json::parse(detail::python_literals_to_null(text));
  } catch (const nlohmann::json::exception& e) {
    throw io_error("moe: " + where + " is not valid JSON: " + e.what());
  }
  if (!s.json.is_object()) {
    throw io_error("moe: " + where + " is " + detail::json_kind(s.json) + ", expected an object");
  }
  const std::string model_type = s.get_string("model_type", "");
  if (model_type.empty()) throw io_error("moe: " + where + ": missing key 'model_type'");
  s.family = parse_family(model_type, where);
  const FamilyRow& row = s.row();

  MoeConfig& m = s.moe;
  const nlohmann::json* layer_list =
      row.layers_key != nullptr ? detail::find_key(s.json, row.layers_key) : nullptr;
  if (layer_list != nullptr && layer_list->is_array() && s.get_int(row.num_layers, -1) == -1) {
    s.num_layers = static_cast<Index>(layer_list->size());
  } else {
    s.num_layers = s.get_int(row.num_layers);
  }
  m.d_model = s.get_int(row.d_model);
  m.d_ff = s.get_int(row.d_ff);
  s.dense_d_ff = row.dense_is_d_ff ? m.d_ff : s.get_int(row.dense_d_ff, 0);
  m.num_experts = s.get_int(row.num_experts);
  m.top_k = row.top_k[0] != nullptr ? s.get_int(row.top_k) : row.fixed_top_k;
  s.norm_topk_prob = row.norm_topk_prob != nullptr
                         ? s.get_bool(row.norm_topk_prob, row.norm_topk_prob_default)
                         : row.norm_topk_prob_default;
  s.hidden_act = s.get_string(row.hidden_act, row.hidden_act_default);
  switch (row.shared_width) {
    case SharedWidth::none:
      break;
    case SharedWidth::width:
      m.shared_d_ff = s.get_int(row.shared_key, 0);
      break;
    case SharedWidth::one_expert:
      m.shared_d_ff = m.d_ff * s.get_int(row.shared_key, 1);
      break;
    case SharedWidth::expert_count: {
      const Index count = s.get_int(row.shared_key, 0);
      if (count < 0 || (m.d_ff > 0 && count > kMaxConfigCount / m.d_ff)) {
        throw config_error(moe::detail::concat("moe: ", where, ": ", row.shared_key[0], " = ",
                                               count, " is out of range"));
      }
      m.shared_d_ff = count * m.d_ff;
      break;
    }
  }
  m.shared_expert_gate = row.shared_expert_gate && m.shared_d_ff > 0;
  detail::parse_layer_keys(s, where);
  detail::parse_routing_keys(s, where, model_type);
  detail::parse_family_numbers(s, where);

  for (const Index layers : {s.num_layers, s.num_decoder_layers}) {
    if (layers > kMaxConfigCount) {
      throw config_error(moe::detail::concat("moe: ", where, ": the number of layers = ", layers,
                                             " is out of range"));
    }
  }
  if (s.num_layers <= 0) {
    throw config_error(moe::detail::concat(
        "moe: ", where, ": the number of layers = ", s.num_layers, " must be positive"));
  }
  auto positive = [&](const char* name, Index v) {
    if (v <= 0) {
      throw config_error(
          moe::detail::concat("moe: ", where, ": ", name, " = ", v, " must be positive"));
    }
  };
  if (row.sparse_layers != SparseLayers::switch_stacks) {
    positive("decoder_sparse_step", s.decoder_sparse_step);
  }
  positive("moe_layer_freq", s.moe_layer_freq);
  positive("n_group", s.n_group);
  positive("topk_group", s.topk_group);
  if (s.first_k_dense_replace < 0) {
    throw config_error(moe::detail::concat(
        "moe: ", where, ": first_k_dense_replace = ", s.first_k_dense_replace, " must be >= 0"));
  }
  try {
    m.validate();
  } catch (const config_error& e) {
    throw config_error(std::string(e.what()) + " (in " + where + ")");
  }
  return s;
}

/// Reads DIR/config.json (at most 16 MB) and parses it with parse_model_spec. Throws io_error
/// when the file cannot be read, plus parse_model_spec's errors.
inline ModelSpec read_model_spec(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw io_error("moe: " + path + ": cannot read: " + ec.message());
  if (size > (std::uintmax_t(16) << 20)) {
    throw io_error(
        moe::detail::concat("moe: ", path, ": ", size, " bytes is too large for a config"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("moe: " + path + ": cannot open");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_model_spec(text, path);
}

}  // namespace moe::io
