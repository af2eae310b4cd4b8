// moe/io/model.hpp: config.json parsing, the per-family name mapping, per-expert vs fused
// layouts, sharded directories, dtype conversion, FP8 block scales, and the error messages.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moe/io/model.hpp"

#include "io_test_util.hpp"
#include "test_util.hpp"

namespace {

using moe::Index;
using moe::MoeConfig;
using moe::MoeWeights;
using moe::RowMatrix;
using moe::io::Dtype;
using moe::io::Family;
using moe::io::ModelCheckpoint;
using moe::io::TensorToWrite;
using moe::test::expect_error;
using Json = nlohmann::json;
using moe::test::add_moe_layer;
using moe::test::deepseek_v3_config;
using moe::test::expect_same_weights;
using moe::test::Layout;
using moe::test::mixtral_config;
using moe::test::qwen2_config;
using moe::test::random_layer;
using moe::test::ScratchDir;
using moe::test::tensor;
using moe::test::write_model;
using moe::test::write_text;

// ---------------------------------------------------------------------------------------------
// config.json

TEST(IoModelSpec, MixtralSizesAndDefaults) {
  const auto s = moe::io::parse_model_spec(mixtral_config(3).dump(), "c.json");
  EXPECT_EQ(s.family, Family::mixtral);
  EXPECT_EQ(s.num_layers, 3);
  EXPECT_EQ(s.moe.d_model, 8);
  EXPECT_EQ(s.moe.d_ff, 6);
  EXPECT_EQ(s.moe.num_experts, 4);
  EXPECT_EQ(s.moe.top_k, 2);
  EXPECT_EQ(s.moe.shared_d_ff, 0);
  EXPECT_TRUE(s.norm_topk_prob);
  EXPECT_EQ(s.moe_prefix(2), "model.layers.2.block_sparse_moe.");
  for (Index l = 0; l < 3; ++l) EXPECT_TRUE(s.is_moe_layer(l));
}

TEST(IoModelSpec, QwenSparseStepAndMlpOnlyLayers) {
  Json j = qwen2_config();
  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  const auto s = moe::io::parse_model_spec(j.dump(), "c.json");
  EXPECT_EQ(s.moe.shared_d_ff, 10);
  EXPECT_TRUE(s.moe.shared_expert_gate);
  EXPECT_FALSE(s.norm_topk_prob);
  EXPECT_EQ(s.dense_d_ff, 20);
  // (layer + 1) % 2 == 0 and not in mlp_only_layers.
  const std::vector<bool> expected{false, true, false, false, false, true};
  for (Index l = 0; l < 6; ++l) EXPECT_EQ(s.is_moe_layer(l), expected[std::size_t(l)]) << l;
  j["model_type"] = "qwen3_moe";
  j["norm_topk_prob"] = true;
  const auto q3 = moe::io::parse_model_spec(j.dump(), "c.json");
  EXPECT_EQ(q3.family, Family::qwen3_moe);
  EXPECT_TRUE(q3.norm_topk_prob);
  EXPECT_EQ(q3.moe.shared_d_ff, 0);
}

TEST(IoModelSpec, OlmoeUsesIntermediateSizeForExperts) {
  const Json j{{"model_type", "olmoe"}, {"hidden_size", 16},        {"intermediate_size", 12},
               {"num_experts", 16},     {"num_experts_per_tok", 4}, {"num_hidden_layers", 2}};
  const auto s = moe::io::parse_model_spec(j.dump(), "c.json");
  EXPECT_EQ(s.moe.d_ff, 12);
  EXPECT_EQ(s.moe.num_experts, 16);
  EXPECT_FALSE(s.norm_topk_prob);
  EXPECT_EQ(s.moe_prefix(1), "model.layers.1.mlp.");
}

TEST(IoModelSpec, DeepSeekDenseLayersAndGroups) {
  Json j = deepseek_v3_config();
  j["num_hidden_layers"] = 5;
  j["moe_layer_freq"] = 2;
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {64, 32}}};
  const auto s = moe::io::parse_model_spec(j.dump(), "c.json");
  EXPECT_EQ(s.moe.shared_d_ff, 12);  // n_shared_experts * moe_intermediate_size
  EXPECT_FALSE(s.moe.shared_expert_gate);
  EXPECT_EQ(s.n_group, 4);
  EXPECT_EQ(s.topk_group, 2);
  EXPECT_DOUBLE_EQ(s.routed_scaling_factor, 2.5);
  EXPECT_EQ(s.fp8_block_rows, 64);
  EXPECT_EQ(s.fp8_block_cols, 32);
  const std::vector<bool> expected{false, false, true, false, true};
  for (Index l = 0; l < 5; ++l) EXPECT_EQ(s.is_moe_layer(l), expected[std::size_t(l)]) << l;
}

TEST(IoModelSpec, SwitchNumbersEncoderThenDecoderBlocks) {
  const Json j{{"model_type", "switch_transformers"},
               {"d_model", 8},
               {"d_ff", 6},
               {"num_experts", 4},
               {"expert_capacity", 3},
               {"num_layers", 4},
               {"num_decoder_layers", 2},
               {"encoder_sparse_step", 2},
               {"decoder_sparse_step", 1}};
  const auto s = moe::io::parse_model_spec(j.dump(), "c.json");
  EXPECT_EQ(s.total_layers(), 6);
  EXPECT_EQ(s.moe.top_k, 1);
  EXPECT_EQ(s.hidden_act, "relu");
  const std::vector<bool> expected{false, true, false, true, true, true};
  for (Index l = 0; l < 6; ++l) EXPECT_EQ(s.is_moe_layer(l), expected[std::size_t(l)]) << l;
  EXPECT_EQ(s.moe_prefix(3), "encoder.block.3.layer.1.mlp.");
  EXPECT_EQ(s.moe_prefix(5), "decoder.block.1.layer.2.mlp.");
}

TEST(IoModelSpec, ErrorsNameTheKey) {
  expect_error<moe::io_error>(
      [] {
        Json j = mixtral_config();
        j["model_type"] = "llama";
        moe::io::parse_model_spec(j.dump(), "d/config.json");
      },
      "moe: d/config.json: unknown model_type 'llama' (known: mixtral, qwen2_moe, qwen3_moe, "
      "olmoe, deepseek_v2, deepseek_v3, switch_transformers, " +
          std::string(moe::test::kV2ModelTypes) + ")");
  expect_error<moe::io_error>(
      [] {
        Json j = mixtral_config();
        j.erase("hidden_size");
        moe::io::parse_model_spec(j.dump(), "d/config.json");
      },
      "moe: d/config.json: missing key 'hidden_size'");
  expect_error<moe::io_error>(
      [] {
        Json j = mixtral_config();
        j["num_local_experts"] = "8";
        moe::io::parse_model_spec(j.dump(), "d/config.json");
      },
      "moe: d/config.json: 'num_local_experts' is a JSON string, expected an integer");
  expect_error<moe::io_error>(
      [] {
        Json j = mixtral_config();
        j.erase("model_type");
        moe::io::parse_model_spec(j.dump(), "d/config.json");
      },
      "moe: d/config.json: missing key 'model_type'");
  expect_error<moe::io_error>([] { moe::io::parse_model_spec("[1, 2]", "d/config.json"); },
                              "moe: d/config.json is a JSON array, expected an object");
  expect_error<moe::config_error>(
      [] {
        Json j = mixtral_config();
        j["num_experts_per_tok"] = 5;
        moe::io::parse_model_spec(j.dump(), "d/config.json");
      },
      "moe: top_k = 5 exceeds num_experts = 4 (in d/config.json)");
  EXPECT_THROW(moe::io::parse_model_spec("{\"model_type\": ", "d/config.json"), moe::io_error);
  expect_error<moe::io_error>([] { moe::io::read_model_spec("/nonexistent/dir"); },
                              "moe: /nonexistent/dir/config.json: cannot read: No such file or "
                              "directory");
}

// ---------------------------------------------------------------------------------------------
// Layouts, families, round trips

TEST(IoModelLoad, MixtralPerExpertAndFusedGiveTheSameBlock) {
  ScratchDir a, b;
  const auto wa = write_model(a, mixtral_config(), Layout::per_expert, 7);
  const auto wb = write_model(b, mixtral_config(), Layout::fused, 7);
  const auto ma = ModelCheckpoint::open(a.str());
  const auto mb = ModelCheckpoint::open(b.str());
  using Block = moe::SparseMoeBlock<float>;
  for (Index l = 0; l < 2; ++l) {
    const Block ba = moe::io::load_moe_layer<Block>(ma, l);
    const Block bb = moe::io::load_moe_layer<Block>(mb, l);
    expect_same_weights(ba.weights(), wa[std::size_t(l)]);
    expect_same_weights(bb.weights(), wa[std::size_t(l)]);
    EXPECT_TRUE(ba.gating().options.normalize);
    // And the two blocks compute the same thing.
    std::mt19937_64 rng(3);
    const RowMatrix<float> x = moe::test::random_matrix<float>(5, 8, rng);
    RowMatrix<float> ya(5, 8), yb(5, 8);
    moe::Workspace<float> ws;
    ba.forward(x, ya, ws);
    bb.forward(x, yb, ws);
    EXPECT_EQ(ya, yb);
  }
  (void)wb;
}

TEST(IoModelLoad, Qwen2MoeSharedExpertBothLayouts) {
  for (Layout layout : {Layout::per_expert, Layout::fused}) {
    ScratchDir dir;
    const auto w = write_model(dir, qwen2_config(), layout, 11);
    const auto any = moe::io::load_any_moe_layer<float>(dir.str(), 1);
    ASSERT_EQ(any.index(), 0u);
    const auto& block = any.get<0>();
    expect_same_weights(block.weights(), w[1]);
    EXPECT_FALSE(block.gating().options.normalize);
    EXPECT_EQ(moe::io::config_of(any).shared_d_ff, 10);
    EXPECT_TRUE(moe::io::config_of(any).shared_expert_gate);
  }
}

TEST(IoModelLoad, DeepSeekV3BiasSharedExpertsAndDenseLayer) {
  ScratchDir dir;
  const Json config = deepseek_v3_config();
  write_text(dir.file("config.json"), config.dump());
  const auto spec = moe::io::parse_model_spec(config.dump(), "config.json");
  std::mt19937_64 rng(5);
  std::vector<TensorToWrite> tensors;
  // Layer 0 is dense (first_k_dense_replace = 1): mlp.{gate,up,down}_proj of intermediate_size.
  const RowMatrix<float> g = moe::test::random_matrix<float>(20, 8, rng);
  const RowMatrix<float> u = moe::test::random_matrix<float>(20, 8, rng);
  const RowMatrix<float> d = moe::test::random_matrix<float>(8, 20, rng);
  tensors.push_back(tensor("model.layers.0.mlp.gate_proj.weight", g));
  tensors.push_back(tensor("model.layers.0.mlp.up_proj.weight", u));
  tensors.push_back(tensor("model.layers.0.mlp.down_proj.weight", d));
  const auto w1 = random_layer(spec, rng);
  const auto w2 = random_layer(spec, rng);
  add_moe_layer(tensors, Family::deepseek_v3, 1, w1, spec.moe, Layout::per_expert);
  add_moe_layer(tensors, Family::deepseek_v3, 2, w2, spec.moe, Layout::fused);
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);

  const auto m = ModelCheckpoint::open(dir.str());
  const auto any1 = moe::io::load_any_moe_layer<float>(m, 1);
  ASSERT_EQ(any1.index(), 2u);
  const auto& b1 = any1.get<2>();
  expect_same_weights(b1.weights(), w1);
  EXPECT_EQ(b1.gating().options.n_group, 4);
  EXPECT_EQ(b1.gating().options.topk_group, 2);
  EXPECT_DOUBLE_EQ(b1.gating().options.routed_scaling_factor, 2.5);
  EXPECT_TRUE(b1.gating().options.normalize);
  using V3 = moe::SparseMoeBlock<float, moe::gating::GroupLimitedTopK>;
  expect_same_weights(moe::io::load_moe_layer<V3>(m, 2).weights(), w2);

  const auto dense = moe::io::load_dense_ffn<float>(m, 0);
  EXPECT_EQ(dense.weights().gate(0), g);
  EXPECT_EQ(dense.weights().up(0), u);
  EXPECT_EQ(dense.weights().w_out(0), d);

  expect_error<moe::config_error>(
      [&] { moe::io::load_any_moe_layer<float>(m, 0); },
      "moe: " + dir.file("config.json") + ": layer 0 is a dense layer, not a sparse MoE layer");
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, 1); },
      "moe: " + dir.file("config.json") +
          ": deepseek_v3 routes with gating::GroupLimitedTopK; the block type uses "
          "gating::SoftmaxTopK");
  expect_error<moe::config_error>([&] { moe::io::load_any_moe_layer<float>(m, 3); },
                                  "moe: layer 3 out of range [0, 3) of " + dir.file("config.json"));
}

TEST(IoModelLoad, DeepSeekV2GroupLimitedWithoutBias) {
  ScratchDir dir;
  Json config = deepseek_v3_config();
  config["model_type"] = "deepseek_v2";
  config["scoring_func"] = "softmax";
  config["topk_method"] = "group_limited_greedy";
  config["norm_topk_prob"] = false;
  config["first_k_dense_replace"] = 0;
  config["num_hidden_layers"] = 1;
  write_model(dir, config, Layout::per_expert, 9);
  const auto any = moe::io::load_any_moe_layer<double>(dir.str(), 0);
  ASSERT_EQ(any.index(), 1u);
  const auto& o = any.get<1>().gating().options;
  EXPECT_EQ(o.scoring, moe::gating::Scoring::softmax);
  EXPECT_EQ(o.group_score, moe::gating::GroupScore::max);
  EXPECT_FALSE(o.normalize);
  EXPECT_DOUBLE_EQ(o.routed_scaling_factor, 2.5);
}

TEST(IoModelLoad, SwitchPlainExpertsAndCapacity) {
  ScratchDir dir;
  const Json config{{"model_type", "switch_transformers"},
                    {"d_model", 8},
                    {"d_ff", 6},
                    {"num_experts", 4},
                    {"expert_capacity", 3},
                    {"num_layers", 2},
                    {"num_decoder_layers", 0},
                    {"encoder_sparse_step", 1}};
  const auto w = write_model(dir, config, Layout::per_expert, 13);
  const auto m = ModelCheckpoint::open(dir.str());
  const auto any = moe::io::load_any_moe_layer<float>(m, 1);
  ASSERT_EQ(any.index(), 3u);
  const auto& block = any.get<3>();
  expect_same_weights(block.weights(), w[1]);
  EXPECT_EQ(block.gating().options.expert_capacity, 3);
  EXPECT_EQ(block.gating().options.capacity, moe::gating::CapacityTopK::Capacity::absolute);
  moe::io::LoadOptions dropless;
  dropless.switch_dropless = true;
  const auto b2 = moe::io::load_any_moe_layer<float>(m, 1, dropless);
  EXPECT_EQ(b2.get<3>().gating().options.capacity, moe::gating::CapacityTopK::Capacity::unlimited);
  // A gated Ffn does not fit ReLU MLP experts.
  using Wrong = moe::SparseMoeBlock<float, moe::gating::CapacityTopK, moe::SwiGLU>;
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_layer<Wrong>(m, 0); },
      "moe: " + dir.file("config.json") +
          ": switch_transformers experts are plain with activation 'relu'; the block type's "
          "Ffn is gated and does not match");
}

TEST(IoModelLoad, ShardedIndexGivesTheSameBlock) {
  ScratchDir single, sharded;
  const auto w = write_model(single, mixtral_config(), Layout::per_expert, 21);
  // The same tensors split by layer into two shards named by an index.
  std::vector<TensorToWrite> s0, s1;
  add_moe_layer(s0, Family::mixtral, 0, w[0],
                moe::io::parse_model_spec(mixtral_config().dump(), "c").moe, Layout::per_expert);
  add_moe_layer(s1, Family::mixtral, 1, w[1],
                moe::io::parse_model_spec(mixtral_config().dump(), "c").moe, Layout::per_expert);
  Json map = Json::object();
  for (const auto& t : s0) map[t.name] = "model-00001-of-00002.safetensors";
  for (const auto& t : s1) map[t.name] = "model-00002-of-00002.safetensors";
  moe::io::write_safetensors(sharded.file("model-00001-of-00002.safetensors"), s0);
  moe::io::write_safetensors(sharded.file("model-00002-of-00002.safetensors"), s1);
  write_text(sharded.file("model.safetensors.index.json"),
             Json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump());
  write_text(sharded.file("config.json"), mixtral_config().dump());
  const auto m = ModelCheckpoint::open(sharded.str());
  EXPECT_EQ(m.tensors().num_files(), 2u);
  for (Index l = 0; l < 2; ++l) {
    expect_same_weights(moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, l).weights(),
                        w[std::size_t(l)]);
  }
}

TEST(IoModelLoad, Bf16CheckpointConvertsToFloatAndDouble) {
  ScratchDir dir;
  const auto w = write_model(dir, mixtral_config(1), Layout::per_expert, 31, Dtype::BF16);
  auto rounded = [](const RowMatrix<float>& m) {
    RowMatrix<float> r(m.rows(), m.cols());
    for (Index i = 0; i < m.size(); ++i) {
      r.data()[i] = moe::io::bf16_to_float(moe::io::float_to_bf16(m.data()[i]));
    }
    return r;
  };
  const auto m = ModelCheckpoint::open(dir.str());
  const auto f = moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, 0);
  EXPECT_EQ(f.weights().router, rounded(w[0].router));
  EXPECT_EQ(f.weights().experts.stacked_in(), rounded(w[0].experts.stacked_in()));
  EXPECT_EQ(f.weights().experts.stacked_out(), rounded(w[0].experts.stacked_out()));
  const auto d = moe::io::load_moe_layer<moe::SparseMoeBlock<double>>(m, 0);
  EXPECT_EQ(d.weights().experts.stacked_in(),
            rounded(w[0].experts.stacked_in()).cast<double>().eval());
}

TEST(IoModelLoad, Fp8BlockScalesAreApplied) {
  ScratchDir dir;
  Json config = deepseek_v3_config();
  config["first_k_dense_replace"] = 0;
  config["num_hidden_layers"] = 1;
  config["n_shared_experts"] = 0;
  config["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {4, 4}}};
  write_text(dir.file("config.json"), config.dump());
  const auto spec = moe::io::parse_model_spec(config.dump(), "config.json");
  std::mt19937_64 rng(41);
  const auto w = random_layer(spec, rng);
  std::vector<TensorToWrite> plain;
  add_moe_layer(plain, Family::deepseek_v3, 0, w, spec.moe, Layout::per_expert);
  // Store every expert projection as F8_E4M3 with a [ceil(out/4) x ceil(in/4)] scale of 2^-k.
  std::vector<TensorToWrite> tensors;
  MoeWeights<float> expected = w;
  for (const TensorToWrite& t : plain) {
    const bool expert = t.name.find(".experts.") != std::string::npos;
    if (!expert) {
      tensors.push_back(t);
      continue;
    }
    const Index rows = t.shape[0], cols = t.shape[1];
    RowMatrix<float> q(rows, cols);  // the F32 values written by add_moe_layer
    std::memcpy(q.data(), t.bytes.data(), t.bytes.size());
    RowMatrix<float> scale((rows + 3) / 4, (cols + 3) / 4);
    for (Index i = 0; i < scale.size(); ++i) scale.data()[i] = std::ldexp(1.0f, -int(i % 3));
    tensors.push_back(tensor(t.name, q, {}, Dtype::F8_E4M3));
    tensors.push_back(tensor(t.name + "_scale_inv", scale));
    // Expected: e4m3(q) * scale block by block, written back into the expected weights.
    RowMatrix<float> deq(rows, cols);
    for (Index i = 0; i < rows; ++i) {
      for (Index j = 0; j < cols; ++j) {
        deq(i, j) = moe::io::e4m3_to_float(moe::io::float_to_e4m3(q(i, j))) * scale(i / 4, j / 4);
      }
    }
    const std::string e_str = t.name.substr(t.name.find(".experts.") + 9);
    const Index e = std::stol(e_str);
    if (t.name.find("gate_proj") != std::string::npos) expected.experts.gate(e) = deq;
    if (t.name.find("up_proj") != std::string::npos) expected.experts.up(e) = deq;
    if (t.name.find("down_proj") != std::string::npos) expected.experts.w_out(e) = deq;
  }
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  const auto block = moe::io::load_any_moe_layer<float>(dir.str(), 0);
  expect_same_weights(block.get<2>().weights(), expected);
}

// ---------------------------------------------------------------------------------------------
// Errors pinned by message

TEST(IoModelErrors, MissingTensorNamesTheTensor) {
  ScratchDir dir;
  const auto spec = moe::io::parse_model_spec(mixtral_config(1).dump(), "c");
  std::mt19937_64 rng(1);
  std::vector<TensorToWrite> tensors;
  add_moe_layer(tensors, Family::mixtral, 0, random_layer(spec, rng), spec.moe, Layout::per_expert);
  const std::string gone = "model.layers.0.block_sparse_moe.experts.1.w3.weight";
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [&](const TensorToWrite& t) { return t.name == gone; }),
                tensors.end());
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  write_text(dir.file("config.json"), mixtral_config(1).dump());
  expect_error<moe::io_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(dir.str(), 0); },
      "moe: " + dir.str() + ": layer 0 (mixtral): missing tensor '" + gone + "'");
  // Half of a fused pair is missing too.
  ScratchDir fused;
  write_model(fused, mixtral_config(1), Layout::fused, 2);
  const auto m = ModelCheckpoint::open(fused.str());
  std::vector<TensorToWrite> partial;
  for (const auto& name : m.tensors().names()) {
    if (name.find("down_proj") != std::string::npos) continue;
    partial.push_back(
        tensor(name, m.tensors().read_matrix<float>(name), m.tensors().info(name).shape));
  }
  moe::io::write_safetensors(fused.file("model.safetensors"), partial);
  expect_error<moe::io_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(fused.str(), 0); },
      "moe: " + fused.str() +
          ": layer 0 (mixtral): missing tensor 'model.layers.0.mlp.experts.down_proj'");
}

TEST(IoModelErrors, ShapeDisagreeingWithConfigNamesBothShapes) {
  ScratchDir dir;
  write_model(dir, mixtral_config(1), Layout::per_expert, 3);
  Json wrong = mixtral_config(1);
  wrong["intermediate_size"] = 7;
  write_text(dir.file("config.json"), wrong.dump());
  expect_error<moe::shape_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(dir.str(), 0); },
      "moe: " + dir.str() +
          ": tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape [6 x 8], "
          "config.json implies [7 x 8]");
  ScratchDir fused;
  write_model(fused, mixtral_config(1), Layout::fused, 3);
  write_text(fused.file("config.json"), wrong.dump());
  expect_error<moe::shape_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(fused.str(), 0); },
      "moe: " + fused.str() +
          ": tensor 'model.layers.0.mlp.experts.gate_up_proj' has shape [4 x 12 x 8], "
          "config.json implies [4 x 14 x 8]");
  wrong = mixtral_config(1);
  wrong["num_local_experts"] = 5;
  write_text(dir.file("config.json"), wrong.dump());
  expect_error<moe::shape_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(dir.str(), 0); },
      "moe: " + dir.str() +
          ": tensor 'model.layers.0.block_sparse_moe.gate.weight' has shape [4 x 8], "
          "config.json implies [5 x 8]");
}

TEST(IoModelErrors, UnknownModelTypeFromADirectory) {
  ScratchDir dir;
  write_model(dir, mixtral_config(1), Layout::per_expert, 3);
  Json j = mixtral_config(1);
  j["model_type"] = "gpt2";
  write_text(dir.file("config.json"), j.dump());
  expect_error<moe::io_error>(
      [&] { moe::io::load_any_moe_layer<float>(dir.str(), 0); },
      "moe: " + dir.file("config.json") +
          ": unknown model_type 'gpt2' (known: mixtral, qwen2_moe, qwen3_moe, olmoe, "
          "deepseek_v2, deepseek_v3, switch_transformers, " +
          moe::test::kV2ModelTypes + ")");
}

TEST(IoModelErrors, FfnMismatch) {
  ScratchDir dir;
  write_model(dir, mixtral_config(1), Layout::per_expert, 3);
  using GeGluBlock = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::GeGLU>;
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_layer<GeGluBlock>(dir.str(), 0); },
      "moe: " + dir.file("config.json") +
          ": mixtral experts are gated with activation 'silu'; the block type's Ffn is gated "
          "and does not match");
}

// ---------------------------------------------------------------------------------------------
// The tiny Hugging Face checkpoints

TEST(IoModelTiny, MixtralLayersLoadAsStored) {
  const std::string dir = std::string(MOE_TEST_DATA_DIR) + "/mixtral_tiny";
  const auto m = ModelCheckpoint::open(dir);
  EXPECT_EQ(m.spec().family, Family::mixtral);
  for (Index l = 0; l < 2; ++l) {
    const auto block = moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, l);
    const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    EXPECT_EQ(block.weights().router, m.tensors().read_matrix<float>(p + "gate.weight"));
    for (Index e = 0; e < 8; ++e) {
      const std::string q = p + "experts." + std::to_string(e) + ".";
      EXPECT_EQ(block.weights().experts.gate(e), m.tensors().read_matrix<float>(q + "w1.weight"));
      EXPECT_EQ(block.weights().experts.up(e), m.tensors().read_matrix<float>(q + "w3.weight"));
      EXPECT_EQ(block.weights().experts.w_out(e), m.tensors().read_matrix<float>(q + "w2.weight"));
    }
  }
}

TEST(IoModelTiny, Qwen2MoeLoadsWithSharedExpert) {
  const std::string dir = std::string(MOE_TEST_DATA_DIR) + "/qwen2_moe_tiny";
  const auto any = moe::io::load_any_moe_layer<float>(dir, 1);
  ASSERT_EQ(any.index(), 0u);
  const auto& b = any.get<0>();
  EXPECT_EQ(b.config().d_ff, 16);
  EXPECT_EQ(b.config().shared_d_ff, 32);
  EXPECT_FALSE(b.gating().options.normalize);
  const auto m = ModelCheckpoint::open(dir);
  EXPECT_EQ(b.weights().shared_gate,
            m.tensors().read_matrix<float>("model.layers.1.mlp.shared_expert_gate.weight"));
}

}  // namespace
