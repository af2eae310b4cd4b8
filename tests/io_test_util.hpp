// Helpers of the io tests: scratch directories and tensors to write.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moe/io/model.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/tensor.hpp"

#include "test_util.hpp"
#include <unistd.h>

namespace moe::test {

/// The model types issue 12 added to the family table, in table order (pinned: the unknown
/// model_type message lists them after the first seven).
inline const std::string kV2ModelTypes =
    "flex_olmo, jamba, minimax, qwen3_next, qwen3_5_moe_text, hunyuan_v1_moe, gemma4_text, "
    "gpt_oss, llama4_text, granitemoe, granitemoeshared, jetmoe, cohere2_moe, dbrx, mistral4, "
    "phimoe, deepseek_v32, dots1, glm4_moe, glm4_moe_lite, solar_open, exaone_moe, mimo_v2_flash, "
    "deepseek_v4, nemotron_h, afmoe, hy_v3, minimax_m2, laguna, step3p5, lfm2_moe, ernie4_5_moe, "
    "longcat_flash";

namespace fs = std::filesystem;

/// A fresh directory under the system temp dir, removed with its contents at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("moe_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

/// A tensor of `m` stored as `dtype` under `shape` (same element count as m).
inline moe::io::TensorToWrite tensor(const std::string& name, const moe::RowMatrix<float>& m,
                                     std::vector<std::int64_t> shape = {},
                                     moe::io::Dtype dtype = moe::io::Dtype::F32) {
  moe::io::TensorToWrite t = moe::io::make_tensor(name, m, dtype);
  if (!shape.empty()) t.shape = std::move(shape);
  return t;
}

using Json = nlohmann::json;
using moe::io::Dtype;
using moe::io::Family;
using moe::io::TensorToWrite;

enum class Layout { per_expert, fused };

/// The tensors of one sparse layer of `family` under the hub's per-expert names or the
/// transformers v5 fused names (the inverse of the mapping under test, written out by hand).
inline void add_moe_layer(std::vector<TensorToWrite>& out, Family family, Index layer,
                          const MoeWeights<float>& w, const MoeConfig& c, Layout layout,
                          Dtype dtype = Dtype::F32) {
  using moe::detail::concat;
  const std::int64_t E = c.num_experts, H = c.d_model, I = c.d_ff;
  const bool mixtral = family == Family::mixtral;
  std::string p = concat("model.layers.", layer, ".mlp.");
  if (mixtral && layout == Layout::per_expert) {
    p = concat("model.layers.", layer, ".block_sparse_moe.");
  }
  if (family == Family::switch_transformers) {
    p = concat("encoder.block.", layer, ".layer.1.mlp.");
    out.push_back(tensor(p + "router.classifier.weight", w.router, {}, dtype));
    for (Index e = 0; e < E; ++e) {
      out.push_back(
          tensor(concat(p, "experts.expert_", e, ".wi.weight"), w.experts.gate(e), {}, dtype));
      out.push_back(
          tensor(concat(p, "experts.expert_", e, ".wo.weight"), w.experts.w_out(e), {}, dtype));
    }
    return;
  }
  out.push_back(tensor(p + "gate.weight", w.router, {}, dtype));
  if (w.router_bias.size() != 0) {
    out.push_back(tensor(p + "gate.e_score_correction_bias", w.router_bias, {E}, Dtype::F32));
  }
  if (layout == Layout::fused) {
    out.push_back(tensor(p + "experts.gate_up_proj", w.experts.stacked_in(), {E, 2 * I, H}, dtype));
    out.push_back(tensor(p + "experts.down_proj", w.experts.stacked_out(), {E, H, I}, dtype));
  } else {
    for (Index e = 0; e < E; ++e) {
      const std::string q = concat(p, "experts.", e, '.');
      out.push_back(
          tensor(q + (mixtral ? "w1" : "gate_proj") + ".weight", w.experts.gate(e), {}, dtype));
      out.push_back(
          tensor(q + (mixtral ? "w3" : "up_proj") + ".weight", w.experts.up(e), {}, dtype));
      out.push_back(
          tensor(q + (mixtral ? "w2" : "down_proj") + ".weight", w.experts.w_out(e), {}, dtype));
    }
  }
  if (c.shared_d_ff > 0) {
    const std::string s = p + (family == Family::qwen2_moe ? "shared_expert." : "shared_experts.");
    out.push_back(tensor(s + "gate_proj.weight", w.shared.gate(0), {}, dtype));
    out.push_back(tensor(s + "up_proj.weight", w.shared.up(0), {}, dtype));
    out.push_back(tensor(s + "down_proj.weight", w.shared.w_out(0), {}, dtype));
    if (c.shared_expert_gate) {
      out.push_back(tensor(p + "shared_expert_gate.weight", w.shared_gate, {}, dtype));
    }
  }
}

inline void expect_same_weights(const MoeWeights<float>& a, const MoeWeights<float>& b) {
  EXPECT_EQ(a.router, b.router);
  EXPECT_EQ(a.router_bias, b.router_bias);
  EXPECT_EQ(a.experts.stacked_in(), b.experts.stacked_in());
  EXPECT_EQ(a.experts.stacked_out(), b.experts.stacked_out());
  EXPECT_EQ(a.shared.stacked_in(), b.shared.stacked_in());
  EXPECT_EQ(a.shared.stacked_out(), b.shared.stacked_out());
  EXPECT_EQ(a.shared_gate, b.shared_gate);
}

inline Json mixtral_config(Index layers = 2) {
  return Json{{"model_type", "mixtral"}, {"hidden_size", 8},         {"intermediate_size", 6},
              {"num_local_experts", 4},  {"num_experts_per_tok", 2}, {"num_hidden_layers", layers},
              {"hidden_act", "silu"}};
}

inline Json qwen2_config() {
  return Json{{"model_type", "qwen2_moe"},
              {"hidden_size", 8},
              {"intermediate_size", 20},
              {"moe_intermediate_size", 6},
              {"shared_expert_intermediate_size", 10},
              {"num_experts", 4},
              {"num_experts_per_tok", 2},
              {"num_hidden_layers", 2},
              {"norm_topk_prob", false}};
}

inline Json deepseek_v3_config() {
  return Json{{"model_type", "deepseek_v3"},
              {"hidden_size", 8},
              {"intermediate_size", 20},
              {"moe_intermediate_size", 6},
              {"n_routed_experts", 8},
              {"n_shared_experts", 2},
              {"num_experts_per_tok", 2},
              {"num_hidden_layers", 3},
              {"n_group", 4},
              {"topk_group", 2},
              {"routed_scaling_factor", 2.5},
              {"norm_topk_prob", true},
              {"scoring_func", "sigmoid"},
              {"topk_method", "noaux_tc"},
              {"first_k_dense_replace", 1}};
}

/// Random weights of a layer of `spec` (with a bias for DeepSeek-V3, plain for Switch).
inline MoeWeights<float> random_layer(const moe::io::ModelSpec& spec, std::mt19937_64& rng) {
  return moe::test::random_weights<float>(spec.moe, rng, spec.family != Family::switch_transformers,
                                          spec.family == Family::deepseek_v3);
}

/// Writes config.json and model.safetensors (every layer sparse) into dir; returns the weights.
inline std::vector<MoeWeights<float>> write_model(const ScratchDir& dir, const Json& config,
                                                  Layout layout, std::uint64_t seed,
                                                  Dtype dtype = Dtype::F32) {
  write_text(dir.file("config.json"), config.dump(2));
  const moe::io::ModelSpec spec = moe::io::parse_model_spec(config.dump(), "config.json");
  std::mt19937_64 rng(seed);
  std::vector<MoeWeights<float>> layers;
  std::vector<TensorToWrite> tensors;
  for (Index l = 0; l < spec.total_layers(); ++l) {
    layers.push_back(random_layer(spec, rng));
    if (spec.is_moe_layer(l))
      add_moe_layer(tensors, spec.family, l, layers.back(), spec.moe, layout, dtype);
  }
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors, {{"format", "pt"}});
  return layers;
}

}  // namespace moe::test
