// moe/io: a Hugging Face MoE model directory (config.json + safetensors) mapped onto our blocks.
//
//   auto model = moe::io::ModelCheckpoint::open("Mixtral-8x7B-v0.1");
//   // the block type named by the caller (compile-time family):
//   auto block = moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(model, 3);
//   // or chosen at run time from config.json "model_type":
//   moe::io::AnyMoeBlock<float> any = moe::io::load_any_moe_layer<float>(model, 3);
//   moe::io::forward(any, x, y, ws);
//
// config.json is read once into a ModelSpec (family, sizes, routing numbers, which layers are
// sparse). The name mapping of every family lives here and nowhere else:
//
//   family               sparse-layer prefix                     router / experts
//   mixtral              model.layers.N.block_sparse_moe.        gate.weight; experts.{e}.w1/w3/w2
//   qwen2_moe            model.layers.N.mlp.                     gate.weight; experts.{e}.{gate,up,
//   qwen3_moe, olmoe                                             down}_proj; Qwen2: shared_expert.*
//   deepseek_v2/v3                                               + shared_expert_gate; DeepSeek:
//                                                                shared_experts.*, V3: gate.
//                                                                e_score_correction_bias
//   switch_transformers  encoder.block.i.layer.1.mlp.            router.classifier.weight;
//                        decoder.block.i.layer.2.mlp.            experts.expert_{e}.wi/wo
//
// The transformers v5 fused layout, PREFIX.experts.gate_up_proj [E, 2I, H] (gate rows first) and
// PREFIX.experts.down_proj [E, H, I], is accepted instead of the per-expert names for every gated
// family (Mixtral under model.layers.N.mlp. as v5 names it in memory). Switch experts stay a
// ModuleDict in transformers 5.x, so Switch has per-expert names only.
//
// Every tensor's shape is checked against config.json before anything is allocated, so sizes are
// bounded by the files. Floating dtypes (F32, F64, F16, BF16, F8_E4M3) convert to the block's
// scalar; a DeepSeek-V3 FP8 weight W with a sibling W_scale_inv is dequantised block by block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/activations.hpp"
#include "moe/block.hpp"
#include "moe/config.hpp"
#include "moe/dense.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/tensor.hpp"
#include "moe/weights.hpp"

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

/// The config.json "model_type" string of a family.
inline const char* family_name(Family f) {
  switch (f) {
    case Family::mixtral:
      return "mixtral";
    case Family::qwen2_moe:
      return "qwen2_moe";
    case Family::qwen3_moe:
      return "qwen3_moe";
    case Family::olmoe:
      return "olmoe";
    case Family::deepseek_v2:
      return "deepseek_v2";
    case Family::deepseek_v3:
      return "deepseek_v3";
    case Family::switch_transformers:
      return "switch_transformers";
  }
  return "?";
}

/// The family of a "model_type" string. Throws io_error "moe: <where>: unknown model_type 'x'
/// (known: mixtral, ...)"; `where` names the config file.
inline Family parse_family(const std::string& model_type, const std::string& where) {
  for (Family f : {Family::mixtral, Family::qwen2_moe, Family::qwen3_moe, Family::olmoe,
                   Family::deepseek_v2, Family::deepseek_v3, Family::switch_transformers}) {
    if (model_type == family_name(f)) return f;
  }
  throw io_error("moe: " + where + ": unknown model_type '" + model_type +
                 "' (known: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, "
                 "switch_transformers)");
}

namespace detail {

/// config.json value of `key`, or nullptr when absent or JSON null (HF writes "head_dim": null).
inline const nlohmann::json* find_key(const nlohmann::json& j, const std::string& key) {
  const auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? nullptr : &*it;
}

/// The Python-style spelling of a JSON value's kind for messages.
inline std::string kind_of(const nlohmann::json& j) { return json_kind(j); }

}  // namespace detail

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
    return family == Family::switch_transformers ? num_encoder_layers + num_decoder_layers
                                                 : num_layers;
  }

  /// Whether `layer` holds a sparse MoE block (else a dense FFN), as the HF model decides:
  /// Qwen: not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0; DeepSeek:
  /// layer >= first_k_dense_replace and layer % moe_layer_freq == 0; Switch: i % step == 1 or
  /// step == 1 within its stack. Throws config_error for a layer out of range.
  bool is_moe_layer(Index layer) const {
    check_layer(layer);
    switch (family) {
      case Family::mixtral:
      case Family::olmoe:
        return true;
      case Family::qwen2_moe:
      case Family::qwen3_moe:
        return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) ==
                   mlp_only_layers.end() &&
               (layer + 1) % decoder_sparse_step == 0;
      case Family::deepseek_v2:
      case Family::deepseek_v3:
        return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
      case Family::switch_transformers: {
        const bool decoder = layer >= num_encoder_layers;
        const Index i = decoder ? layer - num_encoder_layers : layer;
        const Index step = decoder ? decoder_sparse_step : encoder_sparse_step;
        return step > 0 && (step == 1 || i % step == 1);
      }
    }
    return false;
  }

  /// Module prefix of layer `layer`'s FFN, ending in '.': "model.layers.N.mlp." (Mixtral:
  /// "model.layers.N.block_sparse_moe." for the sparse block); Switch:
  /// "encoder.block.i.layer.1.mlp." or "decoder.block.i.layer.2.mlp.".
  std::string moe_prefix(Index layer) const {
    check_layer(layer);
    using moe::detail::concat;
    if (family == Family::switch_transformers) {
      return layer < num_encoder_layers
                 ? concat("encoder.block.", layer, ".layer.1.mlp.")
                 : concat("decoder.block.", layer - num_encoder_layers, ".layer.2.mlp.");
    }
    if (family == Family::mixtral) return concat("model.layers.", layer, ".block_sparse_moe.");
    return concat("model.layers.", layer, ".mlp.");
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
    return io_error("moe: " + source + ": '" + key + "' is " + detail::kind_of(v) + ", expected " +
                    want);
  }
  Index as_int(const std::string& key, const nlohmann::json& v) const {
    if (!v.is_number_integer()) throw type_error(key, v, "an integer");
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > (std::uint64_t(1) << 62)) {
      throw io_error("moe: " + source + ": '" + key + "' = " + v.dump() + " is out of range");
    }
    return static_cast<Index>(v.get<std::int64_t>());
  }
};

/// Parses the text of a config.json. `where` names the file in messages. Keys are the HF ones
/// (ROUTING.md "Checkpoint names"); absent optional keys take the HF defaults of the family.
/// Throws io_error for text that is not a JSON object, a missing "model_type", an unknown family,
/// a missing required size or a value of the wrong JSON type; config_error for sizes out of range
/// (MoeConfig::validate) and a non-positive step or group count.
inline ModelSpec parse_model_spec(const std::string& text, const std::string& where) {
  ModelSpec s;
  s.source = where;
  try {
    s.json = nlohmann::json::parse(text);  // duplicate keys: the last wins, as in Python's json
  } catch (const nlohmann::json::exception& e) {
    throw io_error("moe: " + where + " is not valid JSON: " + e.what());
  }
  if (!s.json.is_object()) {
    throw io_error("moe: " + where + " is " + detail::kind_of(s.json) + ", expected an object");
  }
  const std::string model_type = s.get_string("model_type", "");
  if (model_type.empty()) throw io_error("moe: " + where + ": missing key 'model_type'");
  s.family = parse_family(model_type, where);

  MoeConfig& m = s.moe;
  switch (s.family) {
    case Family::mixtral:
      s.num_layers = s.get_int("num_hidden_layers");
      m.d_model = s.get_int("hidden_size");
      m.d_ff = s.get_int("intermediate_size");
      m.num_experts = s.get_int("num_local_experts");
      m.top_k = s.get_int("num_experts_per_tok");
      s.norm_topk_prob = true;
      s.hidden_act = s.get_string("hidden_act", "silu");
      break;
    case Family::qwen2_moe:
    case Family::qwen3_moe:
      s.num_layers = s.get_int("num_hidden_layers");
      m.d_model = s.get_int("hidden_size");
      m.d_ff = s.get_int("moe_intermediate_size");
      s.dense_d_ff = s.get_int("intermediate_size", 0);
      m.num_experts = s.get_int("num_experts");
      m.top_k = s.get_int("num_experts_per_tok");
      s.norm_topk_prob = s.get_bool("norm_topk_prob", false);
      s.hidden_act = s.get_string("hidden_act", "silu");
      s.decoder_sparse_step = s.get_int("decoder_sparse_step", 1);
      if (const nlohmann::json* v = detail::find_key(s.json, "mlp_only_layers")) {
        if (!v->is_array()) {
          throw io_error("moe: " + where + ": 'mlp_only_layers' is " + detail::kind_of(*v) +
                         ", expected an array");
        }
        for (const auto& e : *v) {
          if (!e.is_number_integer()) {
            throw io_error("moe: " + where + ": 'mlp_only_layers' holds " + detail::kind_of(e) +
                           ", expected integers");
          }
          s.mlp_only_layers.push_back(static_cast<Index>(e.get<std::int64_t>()));
        }
      }
      if (s.family == Family::qwen2_moe) {
        m.shared_d_ff = s.get_int("shared_expert_intermediate_size", 0);
        m.shared_expert_gate = m.shared_d_ff > 0;
      }
      break;
    case Family::olmoe:
      s.num_layers = s.get_int("num_hidden_layers");
      m.d_model = s.get_int("hidden_size");
      m.d_ff = s.get_int("intermediate_size");
      m.num_experts = s.get_int("num_experts");
      m.top_k = s.get_int("num_experts_per_tok");
      s.norm_topk_prob = s.get_bool("norm_topk_prob", false);
      s.hidden_act = s.get_string("hidden_act", "silu");
      break;
    case Family::deepseek_v2:
    case Family::deepseek_v3: {
      const bool v3 = s.family == Family::deepseek_v3;
      s.num_layers = s.get_int("num_hidden_layers");
      m.d_model = s.get_int("hidden_size");
      m.d_ff = s.get_int("moe_intermediate_size");
      s.dense_d_ff = s.get_int("intermediate_size", 0);
      m.num_experts = s.get_int("n_routed_experts");
      m.top_k = s.get_int("num_experts_per_tok");
      m.shared_d_ff = s.get_int("n_shared_experts", 0) * m.d_ff;
      s.norm_topk_prob = s.get_bool("norm_topk_prob", v3);
      s.hidden_act = s.get_string("hidden_act", "silu");
      s.scoring_func = s.get_string("scoring_func", v3 ? "sigmoid" : "softmax");
      s.topk_method = s.get_string("topk_method", v3 ? "noaux_tc" : "greedy");
      s.n_group = s.get_int("n_group", 1);
      s.topk_group = s.get_int("topk_group", 1);
      s.routed_scaling_factor = s.get_double("routed_scaling_factor", 1.0);
      s.first_k_dense_replace = s.get_int("first_k_dense_replace", 0);
      s.moe_layer_freq = s.get_int("moe_layer_freq", 1);
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
      if (const nlohmann::json* q = detail::find_key(s.json, "quantization_config")) {
        if (const nlohmann::json* b =
                q->is_object() ? detail::find_key(*q, "weight_block_size") : nullptr) {
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
      break;
    }
    case Family::switch_transformers:
      s.num_encoder_layers = s.get_int("num_layers");
      s.num_decoder_layers = s.get_int("num_decoder_layers", s.num_encoder_layers);
      s.num_layers = s.num_encoder_layers;
      m.d_model = s.get_int("d_model");
      m.d_ff = s.get_int("d_ff");
      s.dense_d_ff = m.d_ff;
      m.num_experts = s.get_int("num_experts");
      m.top_k = 1;
      s.norm_topk_prob = false;
      s.hidden_act = s.get_string("dense_act_fn", "relu");
      s.encoder_sparse_step = s.get_int("encoder_sparse_step", 1);
      s.decoder_sparse_step = s.get_int("decoder_sparse_step", 1);
      s.expert_capacity = s.get_int("expert_capacity", 64);
      s.router_bias = s.get_bool("router_bias", false);
      if (s.num_decoder_layers < 0) {
        throw config_error(moe::detail::concat(
            "moe: ", where, ": num_decoder_layers = ", s.num_decoder_layers, " must be >= 0"));
      }
      break;
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
  if (s.family != Family::switch_transformers)
    positive("decoder_sparse_step", s.decoder_sparse_step);
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

/// A checkpoint directory opened once: its config.json (spec) and its tensors (single file or
/// sharded through model.safetensors.index.json). Immutable, move-only; loading layers from many
/// threads at once is safe.
class ModelCheckpoint {
 public:
  /// Reads DIR/config.json and maps DIR's safetensors. Throws io_error / config_error.
  static ModelCheckpoint open(const std::string& dir) {
    ModelSpec spec = read_model_spec(dir);
    return ModelCheckpoint(std::move(spec), Checkpoint::open_directory(dir));
  }
  /// Combines a spec and tensors obtained separately (a config from elsewhere, tests).
  ModelCheckpoint(ModelSpec spec, Checkpoint tensors)
      : spec_(std::move(spec)), tensors_(std::move(tensors)) {}

  const ModelSpec& spec() const { return spec_; }
  const Checkpoint& tensors() const { return tensors_; }
  const std::string& directory() const { return tensors_.directory(); }

 private:
  ModelSpec spec_;
  Checkpoint tensors_;
};

/// What load_* may do beyond config.json.
struct LoadOptions {
  /// Switch: route without a capacity limit, as transformers 5.17 does in fact (FORMAT.md 5.6:
  /// its capacity rule never drops a token). false: drop beyond config.json expert_capacity.
  bool switch_dropless = false;
};

namespace detail {

/// Reads tensors of one layer with every shape checked against config.json first.
class LayerReader {
 public:
  LayerReader(const ModelCheckpoint& m, Index layer) : m_(m), layer_(layer) {}

  bool has(const std::string& name) const { return m_.tensors().contains(name); }

  /// Throws io_error when `name` is absent, shape_error when its shape is not `expected`.
  void check(const std::string& name, const std::vector<std::int64_t>& expected) const {
    if (!has(name)) {
      throw io_error(moe::detail::concat("moe: ", m_.directory(), ": layer ", layer_, " (",
                                         family_name(m_.spec().family), "): missing tensor '", name,
                                         "'"));
    }
    const TensorInfo& info = m_.tensors().info(name);
    if (info.shape != expected) {
      throw shape_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", name,
                                            "' has shape ", io::detail::shape_str(info.shape),
                                            ", config.json implies ",
                                            io::detail::shape_str(expected)));
    }
    if (!dtype_is_floating(info.dtype)) {
      throw io_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", name,
                                         "' has dtype ", dtype_name(info.dtype),
                                         ", expected a floating dtype"));
    }
    const std::string scale = name + "_scale_inv";
    if (has(scale)) {
      if (expected.size() != 2) {
        throw io_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", scale,
                                           "': block scales are supported for 2-D weights only"));
      }
      const std::int64_t br = m_.spec().fp8_block_rows, bc = m_.spec().fp8_block_cols;
      check(scale, {(expected[0] + br - 1) / br, (expected[1] + bc - 1) / bc});
    }
  }

  /// `name` as [rows x cols] of T (rank 3 [a, b, c] gives [a*b x c]); a W_scale_inv sibling
  /// multiplies each fp8_block_rows x fp8_block_cols block of W. Call check() first.
  template <class T>
  RowMatrix<T> read(const std::string& name) const {
    RowMatrix<T> w = m_.tensors().read_matrix<T>(name);
    const std::string scale = name + "_scale_inv";
    if (has(scale)) {
      const RowMatrix<double> s = m_.tensors().read_matrix<double>(scale);
      const Index br = m_.spec().fp8_block_rows, bc = m_.spec().fp8_block_cols;
      for (Index i = 0; i < w.rows(); ++i) {
        for (Index j = 0; j < w.cols(); ++j) {
          w(i, j) = static_cast<T>(static_cast<double>(w(i, j)) * s(i / br, j / bc));
        }
      }
    }
    return w;
  }

  /// Reads 2-D `name` into `dst` (same shape, checked by check()). When the file stores T
  /// itself, aligned and unscaled, the bytes are copied straight from the mapping (no
  /// temporary); otherwise through read().
  template <class T>
  void read_into(const std::string& name, MutMap<T> dst) const {
    const TensorInfo& info = m_.tensors().info(name);
    const auto address = reinterpret_cast<std::uintptr_t>(m_.tensors().file_of(name).data(name));
    if (info.dtype == io::detail::native_dtype<T>() && address % alignof(T) == 0 &&
        !has(name + "_scale_inv")) {
      dst = m_.tensors().map_matrix<T>(name);
    } else {
      dst = read<T>(name);
    }
  }

 private:
  const ModelCheckpoint& m_;
  Index layer_;
};

inline bool gated_family(Family f) { return f != Family::switch_transformers; }

/// Does the Ffn type compute what config.json's activation names?
template <class Ffn>
bool ffn_matches(const std::string& act) {
  using A = typename Ffn::activation;
  if constexpr (std::is_same_v<A, Silu>) return act == "silu" || act == "swish";
  if constexpr (std::is_same_v<A, Relu>) return act == "relu";
  if constexpr (std::is_same_v<A, Gelu>) return act == "gelu";
  if constexpr (std::is_same_v<A, GeluTanh>) {
    return act == "gelu_pytorch_tanh" || act == "gelu_new" || act == "gelu_fast";
  }
  return false;
}

template <class Ffn>
void check_ffn(const ModelSpec& s) {
  if (Ffn::gated != gated_family(s.family) || !ffn_matches<Ffn>(s.hidden_act)) {
    throw config_error(moe::detail::concat(
        "moe: ", s.source, ": ", family_name(s.family), " experts are ",
        gated_family(s.family) ? "gated" : "plain", " with activation '", s.hidden_act,
        "'; the block type's Ffn is ", Ffn::gated ? "gated" : "plain", " and does not match"));
  }
}

/// The name of the gating policy a family routes with (for messages).
inline const char* gating_name(Family f) {
  switch (f) {
    case Family::deepseek_v2:
      return "gating::DeepSeekV2";
    case Family::deepseek_v3:
      return "gating::GroupLimitedTopK";
    case Family::switch_transformers:
      return "gating::CapacityTopK";
    default:
      return "gating::SoftmaxTopK";
  }
}

/// The gating options of family `s.family` for policy G; config_error when G is not the
/// family's policy.
template <class G>
typename G::Options gating_options(const ModelSpec& s, const LoadOptions& lo) {
  auto mismatch = [&](const char* have) {
    return config_error(moe::detail::concat("moe: ", s.source, ": ", family_name(s.family),
                                            " routes with ", gating_name(s.family),
                                            "; the block type uses ", have));
  };
  using P = gating::generic_policy_t<G>;  // family types (gating::Olmoe, ...) fill as their policy
  if constexpr (std::is_same_v<P, gating::SoftmaxTopK>) {
    if (s.family != Family::mixtral && s.family != Family::qwen2_moe &&
        s.family != Family::qwen3_moe && s.family != Family::olmoe) {
      throw mismatch("gating::SoftmaxTopK");
    }
    typename P::Options o;
    o.normalize = s.norm_topk_prob;
    return o;
  } else if constexpr (std::is_same_v<P, gating::GroupLimitedTopK>) {
    if (s.family != Family::deepseek_v3) throw mismatch("gating::GroupLimitedTopK");
    return G::Options::deepseek_v3(s.n_group, s.topk_group, s.routed_scaling_factor,
                                   s.norm_topk_prob);
  } else if constexpr (std::is_same_v<G, gating::DeepSeekV2>) {
    if (s.family != Family::deepseek_v2) throw mismatch("gating::DeepSeekV2");
    // HF DeepseekV2: with norm_topk_prob the weights are renormalised and NOT scaled.
    auto o = G::Options::deepseek_v2(s.n_group, s.topk_group,
                                     s.norm_topk_prob ? 1.0 : s.routed_scaling_factor);
    o.normalize = s.norm_topk_prob;
    return o;
  } else if constexpr (std::is_same_v<P, gating::CapacityTopK>) {
    if (s.family != Family::switch_transformers) throw mismatch("gating::CapacityTopK");
    return lo.switch_dropless ? G::Options::dropless()
                              : G::Options::switch_transformers(s.expert_capacity);
  } else {
    static_assert(always_false_v<G>, "moe::io: no checkpoint family routes with this policy");
  }
}

}  // namespace detail

/// The weights of sparse layer `layer` in checkpoint orientation, converted to T. Reads, for the
/// family of m.spec(): router [E x H]; the routed experts, per-expert names or the v5 fused
/// gate_up_proj/down_proj; DeepSeek-V3's e_score_correction_bias [E]; the shared expert(s) and
/// Qwen2-MoE's shared_expert_gate [1 x H]. Every shape is checked against config.json before
/// any weight is allocated.
/// Throws config_error when the layer is out of range or dense, io_error naming a missing tensor
/// ("moe: DIR: layer 3 (mixtral): missing tensor 'NAME'") or a non-floating dtype, shape_error
/// naming the tensor and both shapes ("moe: DIR: tensor 'NAME' has shape [a x b], config.json
/// implies [c x d]").
template <class T>
MoeWeights<T> load_moe_weights(const ModelCheckpoint& m, Index layer) {
  const ModelSpec& s = m.spec();
  if (!s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a dense layer, not a sparse MoE layer"));
  }
  const detail::LayerReader r(m, layer);
  const MoeConfig& c = s.moe;
  const std::int64_t E = c.num_experts, H = c.d_model, I = c.d_ff, S = c.shared_d_ff;
  using moe::detail::concat;

  // The prefix: Mixtral's hub name, or "mlp." as transformers v5 names its modules.
  std::string p = s.moe_prefix(layer);
  const bool switch_family = s.family == Family::switch_transformers;
  const std::string router_suffix = switch_family ? "router.classifier.weight" : "gate.weight";
  if (s.family == Family::mixtral && !r.has(p + router_suffix)) {
    const std::string v5 = concat("model.layers.", layer, ".mlp.");
    if (r.has(v5 + router_suffix)) p = v5;
  }
  const std::string router = p + router_suffix;
  r.check(router, {E, H});
  if (switch_family && (s.router_bias || r.has(p + "router.classifier.bias"))) {
    throw io_error("moe: " + m.directory() + ": '" + p +
                   "router.classifier.bias': a router bias is not supported");
  }
  const bool bias = s.family == Family::deepseek_v3;
  if (bias) r.check(p + "gate.e_score_correction_bias", {E});

  // Routed experts: fused (v5) or per expert.
  const std::string fused_in = p + "experts.gate_up_proj", fused_out = p + "experts.down_proj";
  const bool fused = !switch_family && (r.has(fused_in) || r.has(fused_out));
  auto expert_name = [&](std::int64_t e, const char* which) -> std::string {
    if (switch_family) return concat(p, "experts.expert_", e, '.', which, ".weight");
    if (s.family == Family::mixtral) return concat(p, "experts.", e, '.', which, ".weight");
    return concat(p, "experts.", e, '.', which, "_proj.weight");
  };
  const bool mixtral = s.family == Family::mixtral;
  const char* gate_n = mixtral ? "w1" : "gate";
  const char* up_n = mixtral ? "w3" : "up";
  const char* down_n = mixtral ? "w2" : "down";
  if (fused) {
    r.check(fused_in, {E, 2 * I, H});
    r.check(fused_out, {E, H, I});
  } else {
    for (std::int64_t e = 0; e < E; ++e) {
      if (switch_family) {
        r.check(expert_name(e, "wi"), {I, H});
        r.check(expert_name(e, "wo"), {H, I});
      } else {
        r.check(expert_name(e, gate_n), {I, H});
        r.check(expert_name(e, up_n), {I, H});
        r.check(expert_name(e, down_n), {H, I});
      }
    }
  }
  // Shared expert(s).
  const std::string sp = p + (s.family == Family::qwen2_moe ? "shared_expert." : "shared_experts.");
  if (S > 0) {
    r.check(sp + "gate_proj.weight", {S, H});
    r.check(sp + "up_proj.weight", {S, H});
    r.check(sp + "down_proj.weight", {H, S});
    if (c.shared_expert_gate) r.check(p + "shared_expert_gate.weight", {1, H});
  }

  // Every shape agrees: allocate and read.
  MoeWeights<T> w = MoeWeights<T>::zeros(c, !switch_family, bias);
  w.router = r.read<T>(router);
  if (bias) w.router_bias = r.read<T>(p + "gate.e_score_correction_bias").transpose();
  if (fused) {
    w.experts.stacked_in() = r.read<T>(fused_in);
    w.experts.stacked_out() = r.read<T>(fused_out);
  } else {
    for (Index e = 0; e < c.num_experts; ++e) {
      if (switch_family) {
        r.read_into<T>(expert_name(e, "wi"), w.experts.gate(e));
      } else {
        r.read_into<T>(expert_name(e, gate_n), w.experts.gate(e));
        r.read_into<T>(expert_name(e, up_n), w.experts.up(e));
      }
      r.read_into<T>(expert_name(e, switch_family ? "wo" : down_n), w.experts.w_out(e));
    }
  }
  if (S > 0) {
    r.read_into<T>(sp + "gate_proj.weight", w.shared.gate(0));
    r.read_into<T>(sp + "up_proj.weight", w.shared.up(0));
    r.read_into<T>(sp + "down_proj.weight", w.shared.w_out(0));
    if (c.shared_expert_gate) w.shared_gate = r.read<T>(p + "shared_expert_gate.weight");
  }
  return w;
}

/// Sparse layer `layer` as the block type the caller names, e.g.
/// `load_moe_layer<SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU>>(m, 3)`. The gating options
/// come from config.json (norm_topk_prob, n_group, topk_group, routed_scaling_factor,
/// expert_capacity). Throws config_error when Block's gating policy or Ffn is not the family's
/// ("moe: DIR/config.json: deepseek_v3 routes with gating::GroupLimitedTopK; the block type uses
/// gating::SoftmaxTopK"), plus the errors of load_moe_weights.
template <class Block>
Block load_moe_layer(const ModelCheckpoint& m, Index layer, const LoadOptions& options = {}) {
  using G = typename Block::GatingPolicy;
  detail::check_ffn<typename Block::FfnKind>(m.spec());
  const typename G::Options gating_options = detail::gating_options<G>(m.spec(), options);
  return Block(m.spec().moe, load_moe_weights<typename Block::Scalar>(m, layer), gating_options);
}

/// Opens `dir` (config.json + safetensors) and loads one layer: see the overload above. To load
/// several layers, open a ModelCheckpoint once.
template <class Block>
Block load_moe_layer(const std::string& dir, Index layer, const LoadOptions& options = {}) {
  return load_moe_layer<Block>(ModelCheckpoint::open(dir), layer, options);
}

/// One block type per routing family, for choosing the family at run time from config.json.
///   0: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE  (softmax top-k, SwiGLU)
///   1: DeepSeek-V2                          (group-limited, softmax, no bias)
///   2: DeepSeek-V3                          (group-limited, sigmoid + selection bias)
///   3: Switch Transformers                  (top-1 with capacity, ReLU MLP experts)
template <class T>
using AnyMoeBlock = std::variant<SparseMoeBlock<T, gating::SoftmaxTopK, SwiGLU>,
                                 SparseMoeBlock<T, gating::DeepSeekV2, SwiGLU>,
                                 SparseMoeBlock<T, gating::GroupLimitedTopK, SwiGLU>,
                                 SparseMoeBlock<T, gating::CapacityTopK, ReluMlp>>;

/// Sparse layer `layer` as the alternative of AnyMoeBlock<T> that config.json's family routes
/// with. Same errors as load_moe_layer.
template <class T>
AnyMoeBlock<T> load_any_moe_layer(const ModelCheckpoint& m, Index layer,
                                  const LoadOptions& options = {}) {
  switch (m.spec().family) {
    case Family::deepseek_v2:
      return load_moe_layer<std::variant_alternative_t<1, AnyMoeBlock<T>>>(m, layer, options);
    case Family::deepseek_v3:
      return load_moe_layer<std::variant_alternative_t<2, AnyMoeBlock<T>>>(m, layer, options);
    case Family::switch_transformers:
      return load_moe_layer<std::variant_alternative_t<3, AnyMoeBlock<T>>>(m, layer, options);
    default:
      return load_moe_layer<std::variant_alternative_t<0, AnyMoeBlock<T>>>(m, layer, options);
  }
}

/// Opens `dir` and loads one layer; see the overload above.
template <class T>
AnyMoeBlock<T> load_any_moe_layer(const std::string& dir, Index layer,
                                  const LoadOptions& options = {}) {
  return load_any_moe_layer<T>(ModelCheckpoint::open(dir), layer, options);
}

/// y = block(x) whichever family the block is (x, y [num_tokens x d_model] row-major).
template <class T>
void forward(const AnyMoeBlock<T>& block, const MatrixRef<T>& x, MatrixMut<T> y, Workspace<T>& ws,
             const Executor& executor = serial_executor()) {
  std::visit([&](const auto& b) { b.forward(x, y, ws, executor); }, block);
}

/// The config of any block (sizes are the same for every alternative).
template <class T>
const MoeConfig& config_of(const AnyMoeBlock<T>& block) {
  return std::visit([](const auto& b) -> const MoeConfig& { return b.config(); }, block);
}

/// The dense FFN of a layer that is not sparse (DeepSeek below first_k_dense_replace, Qwen
/// mlp_only_layers, Switch blocks between sparse ones): "PREFIX.{gate,up,down}_proj.weight" of
/// width intermediate_size, Switch "PREFIX.wi/wo.weight" of width d_ff. Throws config_error for a
/// sparse layer or a mismatched Ffn, io_error / shape_error as load_moe_weights.
template <class T, class Ffn = SwiGLU>
DenseFfn<T, Ffn> load_dense_ffn(const ModelCheckpoint& m, Index layer) {
  const ModelSpec& s = m.spec();
  if (s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a sparse MoE layer, not a dense one"));
  }
  detail::check_ffn<Ffn>(s);
  if (s.dense_d_ff <= 0) {
    throw config_error("moe: " + s.source + ": dense layers need intermediate_size");
  }
  const detail::LayerReader r(m, layer);
  const std::string p = s.moe_prefix(layer);
  const std::int64_t H = s.moe.d_model, F = s.dense_d_ff;
  ExpertStack<T> stack(1, H, F, Ffn::gated);
  if constexpr (Ffn::gated) {
    r.check(p + "gate_proj.weight", {F, H});
    r.check(p + "up_proj.weight", {F, H});
    r.check(p + "down_proj.weight", {H, F});
    r.read_into<T>(p + "gate_proj.weight", stack.gate(0));
    r.read_into<T>(p + "up_proj.weight", stack.up(0));
    r.read_into<T>(p + "down_proj.weight", stack.w_out(0));
  } else {
    r.check(p + "wi.weight", {F, H});
    r.check(p + "wo.weight", {H, F});
    r.read_into<T>(p + "wi.weight", stack.gate(0));
    r.read_into<T>(p + "wo.weight", stack.w_out(0));
  }
  return DenseFfn<T, Ffn>(std::move(stack));
}

}  // namespace moe::io
