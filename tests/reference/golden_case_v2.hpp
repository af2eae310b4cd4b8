// Test support: one v2 golden case (tests/data/reference/v2/FORMAT.md, schema moe-golden-v2): the
// metadata (sizes, the HF config.json as `hf_config_json`), the parameters under their Hugging Face
// state_dict names (`hf.<name>`), and the reference tensors (input, output, topk_idx, topk_weight,
// input_ids, router_logits). Reading only: mapping HF names to block weights is the loader's job.
#pragma once

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/io/json.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/moe.hpp"

namespace moe::golden::v2 {

/// A v2 case file. Every accessor throws io_error naming the file and the key or tensor when it
/// is absent or malformed, so a runner can report a FAIL with a reason instead of crashing.
class Case {
 public:
  explicit Case(const std::string& path)
      : file_(io::SafetensorsFile::open(path)),
        file_name_(path.substr(path.find_last_of('/') + 1)) {
    const std::string schema = meta("schema");
    if (schema != "moe-golden-v2") fail("schema '" + schema + "' is not moe-golden-v2");
    try {
      config_ = nlohmann::json::parse(io::detail::python_literals_to_null(meta("hf_config_json")));
      const auto f32 = nlohmann::json::parse(meta_or("float32_tensors_in_hf", "[]"));
      for (const auto& name : f32) float32_in_hf_.insert(name.get<std::string>());
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("metadata JSON: ") + e.what());
    }
    if (!config_.is_object()) fail("hf_config_json is not an object");
  }

  /// The file name (e.g. "olmoe.safetensors").
  const std::string& file_name() const { return file_name_; }
  /// Metadata `family` (e.g. "deepseek_v4"; several cases share a family).
  std::string family() const { return meta("family"); }
  /// Metadata `case` (e.g. "deepseek_v4_hash").
  std::string case_name() const { return meta("case"); }

  // Sizes (metadata B, S, T, D, F, Fs, E, k, capacity, zero_experts).
  Index tokens() const { return meta_int("T"); }
  Index d_model() const { return meta_int("D"); }
  Index d_ff() const { return meta_int("F"); }
  /// Fs as the generator was asked; a case has a shared expert only when its tensors say so.
  Index shared_d_ff() const { return meta_int("Fs"); }
  Index num_experts() const { return meta_int("E"); }
  Index top_k() const { return meta_int("k"); }
  Index batch() const { return meta_int("B"); }
  Index seq_len() const { return meta_int("S"); }
  /// Expert capacity (capacity families), -1 when `none`.
  Index capacity() const {
    return meta_or("capacity", "none") == "none" ? -1 : meta_int("capacity");
  }
  /// Zero (identity) experts after the E routed ones (LongCat), 0 when `none`.
  Index zero_experts() const {
    return meta_or("zero_experts", "none") == "none" ? 0 : meta_int("zero_experts");
  }

  /// The HF config (`config.to_dict()`), as HF wrote it: keys and aliases of the family's class.
  const nlohmann::json& hf_config() const { return config_; }
  /// hf_config()[key] when present and not null (a nested key as "ffn_config.moe_top_k").
  const nlohmann::json* config_value(const std::string& key) const {
    const nlohmann::json* node = &config_;
    std::size_t start = 0;
    while (true) {
      const std::size_t dot = key.find('.', start);
      const std::string part = key.substr(start, dot == std::string::npos ? dot : dot - start);
      if (!node->is_object()) return nullptr;
      const auto it = node->find(part);
      if (it == node->end() || it->is_null()) return nullptr;
      node = &*it;
      if (dot == std::string::npos) return node;
      start = dot + 1;
    }
  }
  double config_double(const std::string& key, double fallback) const {
    const auto* v = config_value(key);
    if (v == nullptr) return fallback;
    if (v->is_array() && !v->empty() && (*v)[0].is_number()) return (*v)[0].get<double>();
    if (!v->is_number()) fail("hf_config_json '" + key + "' is not a number");
    return v->get<double>();
  }
  Index config_int(const std::string& key, Index fallback) const {
    const auto* v = config_value(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) fail("hf_config_json '" + key + "' is not an integer");
    return v->get<Index>();
  }
  bool config_bool(const std::string& key, bool fallback) const {
    const auto* v = config_value(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) fail("hf_config_json '" + key + "' is not a boolean");
    return v->get<bool>();
  }
  std::string config_string(const std::string& key, const std::string& fallback) const {
    const auto* v = config_value(key);
    if (v == nullptr) return fallback;
    if (!v->is_string()) fail("hf_config_json '" + key + "' is not a string");
    return v->get<std::string>();
  }

  /// True when HF held `name` (a stored tensor name, e.g. "hf.gate.e_score_correction_bias") in
  /// float32 (metadata float32_tensors_in_hf).
  bool float32_in_hf(const std::string& name) const { return float32_in_hf_.count(name) != 0; }

  /// True when the file stores `name` (the full stored name).
  bool has(const std::string& name) const { return file_.contains(name); }
  /// True when the file stores the HF parameter `name` (stored as "hf.<name>").
  bool has_hf(const std::string& name) const { return has("hf." + name); }
  /// The stored shape of `name`.
  const std::vector<std::int64_t>& shape(const std::string& name) const {
    return file_.info(name).shape;
  }
  /// HF parameter `name` as a [prod(leading dims) x last] matrix (a 1-D tensor is [1 x n]).
  template <class T = double>
  RowMatrix<T> hf(const std::string& name) const {
    return file_.read_matrix<T>("hf." + name);
  }
  /// Any stored tensor as a matrix (same shape rule).
  template <class T = double>
  RowMatrix<T> mat(const std::string& name) const {
    return file_.read_matrix<T>(name);
  }

  /// [T x D] block input and output.
  RowMatrix<double> input() const { return mat("input"); }
  RowMatrix<double> output() const { return mat("output"); }
  /// [T x k] experts used per token in HF's slot order; -1 is an empty slot.
  RowMatrix<std::int64_t> topk_idx() const { return mat<std::int64_t>("topk_idx"); }
  /// [T x k] weight of each slot (0 in empty slots).
  RowMatrix<double> topk_weight() const { return mat("topk_weight"); }
  /// [T] token ids (only where the block takes them: DeepSeek-V4 hash layers), else empty.
  std::vector<std::int64_t> input_ids() const {
    return has("input_ids") ? file_.read_vector<std::int64_t>("input_ids")
                            : std::vector<std::int64_t>();
  }

  /// Metadata value; io_error naming the key when absent.
  std::string meta(const std::string& key) const {
    const auto& m = file_.metadata();
    const auto it = m.find(key);
    if (it == m.end()) fail("metadata has no key '" + key + "'");
    return it->second;
  }
  std::string meta_or(const std::string& key, const std::string& fallback) const {
    const auto& m = file_.metadata();
    const auto it = m.find(key);
    return it == m.end() ? fallback : it->second;
  }

 private:
  Index meta_int(const std::string& key) const {
    const std::string v = meta(key);
    try {
      std::size_t used = 0;
      const long long x = std::stoll(v, &used);
      if (used == v.size()) return static_cast<Index>(x);
    } catch (const std::exception&) {
    }
    fail("metadata '" + key + "' = '" + v + "' is not an integer");
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw io_error("moe: " + file_name_ + ": " + why);
  }

  io::SafetensorsFile file_;
  std::string file_name_;
  nlohmann::json config_;
  std::set<std::string> float32_in_hf_;
};

/// Block weights of a case stored in the Mixtral layout: router `<router>` [E x D],
/// `<prefix>experts.gate_up_proj` [E, 2F, D] (rows 0..F-1 gate, F..2F-1 up),
/// `<prefix>experts.down_proj` [E, D, F], an optional [E] selection bias `<bias>`, and the shared
/// expert `<shared>.{gate,up,down}_proj.weight` when stored. cfg gets the sizes from the tensors.
template <class T>
MoeWeights<T> mixtral_layout_weights(const Case& c, MoeConfig& cfg, const std::string& router,
                                     const std::string& bias = "",
                                     const std::string& shared = "shared_experts") {
  const auto& gu = c.shape("hf.experts.gate_up_proj");
  cfg.num_experts = static_cast<Index>(gu.at(0));
  cfg.d_ff = static_cast<Index>(gu.at(1) / 2);
  cfg.d_model = static_cast<Index>(gu.at(2));
  cfg.top_k = c.top_k();
  const bool has_shared = c.has_hf(shared + ".down_proj.weight");
  cfg.shared_d_ff =
      has_shared ? static_cast<Index>(c.shape("hf." + shared + ".down_proj.weight")[1]) : 0;
  const Index E = cfg.num_experts, F = cfg.d_ff, D = cfg.d_model;
  auto w = MoeWeights<T>::zeros(cfg, /*gated=*/true, /*with_bias=*/!bias.empty());
  w.router = c.hf<T>(router);
  if (!bias.empty()) w.router_bias = c.hf<T>(bias).transpose();
  const RowMatrix<T> gate_up = c.hf<T>("experts.gate_up_proj");  // [E*2F x D]
  const RowMatrix<T> down = c.hf<T>("experts.down_proj");        // [E*D x F]
  for (Index e = 0; e < E; ++e) {
    w.experts.set_gated(e, gate_up.block(e * 2 * F, 0, F, D), gate_up.block(e * 2 * F + F, 0, F, D),
                        down.block(e * D, 0, D, F));
  }
  if (has_shared) {
    w.shared.set_gated(0, c.hf<T>(shared + ".gate_proj.weight"),
                       c.hf<T>(shared + ".up_proj.weight"), c.hf<T>(shared + ".down_proj.weight"));
  }
  return w;
}

}  // namespace moe::golden::v2
