// moe/io loaders: config.json as transformers 5.17 writes it (the v2 reference cases' own
// hf_config_json and HF state_dict names, replayed through a checkpoint directory), expert
// subsets (load_moe_shard), non-finite values named by file/layer/tensor, and AnyMoeBlock.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moe/io/model.hpp"

#include "io_test_util.hpp"
#include "reference/golden_v2_runner.hpp"
#include "test_util.hpp"

namespace {

using moe::Index;
using moe::MoeWeights;
using moe::RowMatrix;
using moe::io::Dtype;
using moe::io::Family;
using moe::io::LoadOptions;
using moe::io::ModelCheckpoint;
using moe::io::TensorToWrite;
using moe::test::expect_error;
using moe::test::Layout;
using moe::test::ScratchDir;
using moe::test::write_model;
using moe::test::write_text;
using Json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// config.json and HF names as transformers 5.17 writes them: the v2 golden cases

class IoHfConfig : public ::testing::TestWithParam<const char*> {};

// Every v2 case (one per family at least): its config.json and HF names written as a checkpoint,
// the block built by load_any_moe_layer, output and routing equal to HF's (double and float;
// tests/reference/golden_v2_runner.hpp holds the tolerances).
TEST_P(IoHfConfig, LayerLoadsFromHfConfigAndNamesAndMatchesHfOutput) {
  const std::string path =
      std::string(MOE_TEST_DATA_DIR) + "/reference/v2/" + GetParam() + ".safetensors";
  const moe::golden::v2::Case c(path);
  moe::golden::Report report;
  std::string skip;
  ASSERT_TRUE(moe::golden::v2::run_case(c, path, report, skip)) << skip;
  for (const std::string& why : report.failures) ADD_FAILURE() << GetParam() << ": " << why;
}

INSTANTIATE_TEST_SUITE_P(
    V2Cases, IoHfConfig,
    ::testing::Values("afmoe", "cohere2_moe", "cohere2_moe_sigmoid", "dbrx", "deepseek_v2",
                      "deepseek_v2_group", "deepseek_v3", "deepseek_v32", "deepseek_v4",
                      "deepseek_v4_hash", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo",
                      "gemma4", "gemma4_branch", "glm4_moe", "glm4_moe_lite", "gpt_oss",
                      "gpt_oss_clamp", "granitemoe", "granitemoeshared", "granitemoeshared_layer",
                      "hunyuan_v1_moe", "hy_v3", "hy_v3_fp32_combine", "jamba", "jetmoe", "laguna",
                      "lfm2_moe", "llama4", "llama4_top2", "longcat_flash", "mimo_v2_flash",
                      "minimax", "minimax_m2", "mistral4", "mixtral", "nemotron_h", "olmoe",
                      "phimoe", "phimoe_eps001", "qwen2_moe", "qwen3_5_moe", "qwen3_moe",
                      "qwen3_next", "solar_open", "step3p7", "step3p7_noclamp", "switch",
                      "switch_capacity"),
    [](const auto& info) { return std::string(info.param); });

TEST(IoHfConfigKeys, Qwen3MoeNumLocalExpertsAndAliases) {
  // transformers 5.17's Qwen3MoeConfig saves num_local_experts (the v2 case's config says so).
  const auto c = moe::io::SafetensorsFile::open(std::string(MOE_TEST_DATA_DIR) +
                                                "/reference/v2/qwen3_moe.safetensors");
  const Json hf = Json::parse(c.metadata().at("hf_config_json"));
  ASSERT_TRUE(hf.contains("num_local_experts"));
  ASSERT_FALSE(hf.contains("num_experts"));
  EXPECT_EQ(moe::io::parse_model_spec(hf.dump(), "c.json").moe.num_experts, 8);
  // Either spelling, for every family that has the key under another name.
  for (const char* family : {"qwen2_moe", "qwen3_moe", "olmoe", "mixtral"}) {
    Json j = moe::test::mixtral_config(1);
    j["model_type"] = family;
    j["moe_intermediate_size"] = 6;
    j.erase("num_local_experts");
    for (const char* key : {"num_experts", "num_local_experts"}) {
      Json k = j;
      k[key] = 4;
      EXPECT_EQ(moe::io::parse_model_spec(k.dump(), "c.json").moe.num_experts, 4)
          << family << " " << key;
    }
    expect_error<moe::io_error>(
        [&] { moe::io::parse_model_spec(j.dump(), "c.json"); },
        std::string("moe: c.json: missing key ") +
            (std::string(family) == "mixtral" ? "'num_local_experts' (or 'num_experts')"
                                              : "'num_experts' (or 'num_local_experts')"));
  }
  Json ds = moe::test::deepseek_v3_config();
  ds.erase("n_routed_experts");
  ds["num_local_experts"] = 8;
  EXPECT_EQ(moe::io::parse_model_spec(ds.dump(), "c.json").moe.num_experts, 8);
}

TEST(IoHfConfigKeys, UnknownModelTypeListsTheTable) {
  Json j = moe::test::mixtral_config(1);
  j["model_type"] = "mixtral2";
  std::string known;
  for (const auto& row : moe::io::kFamilies)
    known += (known.empty() ? "" : ", ") + std::string(row.model_type);
  EXPECT_EQ(
      known,
      "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, switch_transformers, " +
          moe::test::kV2ModelTypes);
  expect_error<moe::io_error>([&] { moe::io::parse_model_spec(j.dump(), "c.json"); },
                              "moe: c.json: unknown model_type 'mixtral2' (known: " + known + ")");
}

// ---------------------------------------------------------------------------------------------
// Expert subsets (an expert-parallel rank's shard)

TEST(IoShard, SubsetInGivenOrderBothLayouts) {
  for (Layout layout : {Layout::per_expert, Layout::fused}) {
    ScratchDir dir;
    const auto w = write_model(dir, moe::test::qwen2_config(), layout, 21);
    const auto m = ModelCheckpoint::open(dir.str());
    LoadOptions o;
    o.experts = {3, 0, 2};
    const auto shard = moe::io::load_moe_shard<float>(m, 1, o);
    EXPECT_EQ(shard.experts, o.experts);
    EXPECT_EQ(shard.config().num_experts, 4);
    const MoeWeights<float>& got = shard.weights;
    ASSERT_EQ(got.experts.num_experts(), 3);
    for (Index j = 0; j < 3; ++j) {
      const Index e = o.experts[static_cast<std::size_t>(j)];
      EXPECT_EQ(RowMatrix<float>(got.experts.w_in(j)), RowMatrix<float>(w[1].experts.w_in(e)));
      EXPECT_EQ(RowMatrix<float>(got.experts.w_out(j)), RowMatrix<float>(w[1].experts.w_out(e)));
    }
    // Replicated on every rank: the whole router, the shared expert and its gate.
    EXPECT_EQ(got.router, w[1].router);
    EXPECT_EQ(got.shared.stacked_in(), w[1].shared.stacked_in());
    EXPECT_EQ(got.shared.stacked_out(), w[1].shared.stacked_out());
    EXPECT_EQ(got.shared_gate, w[1].shared_gate);
    EXPECT_FALSE(shard.gating_options<moe::gating::SoftmaxTopK>().normalize);
    // Empty: every expert, the same weights as the block's.
    const auto all = moe::io::load_moe_shard<float>(dir.str(), 1, {});
    EXPECT_EQ(all.experts, (std::vector<Index>{0, 1, 2, 3}));
    moe::test::expect_same_weights(all.weights, w[1]);
  }
}

TEST(IoShard, OnlyTheChosenExpertsAreRead) {
  // Experts outside the subset may even be missing from the files (another rank's shard).
  ScratchDir dir;
  const auto spec = moe::io::parse_model_spec(moe::test::mixtral_config(1).dump(), "c");
  std::mt19937_64 rng(4);
  const auto w = moe::test::random_layer(spec, rng);
  std::vector<TensorToWrite> tensors;
  moe::test::add_moe_layer(tensors, Family::mixtral, 0, w, spec.moe, Layout::per_expert);
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [](const TensorToWrite& t) {
                                 return t.name.find("experts.1.") != std::string::npos;
                               }),
                tensors.end());
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  write_text(dir.file("config.json"), moe::test::mixtral_config(1).dump());
  LoadOptions o;
  o.experts = {2};
  const auto shard = moe::io::load_moe_shard<float>(dir.str(), 0, o);
  EXPECT_EQ(RowMatrix<float>(shard.weights.experts.w_in(0)), RowMatrix<float>(w.experts.w_in(2)));
  o.experts = {2, 1};
  expect_error<moe::io_error>([&] { moe::io::load_moe_shard<float>(dir.str(), 0, o); },
                              "moe: " + dir.str() +
                                  ": layer 0 (mixtral): missing tensor "
                                  "'model.layers.0.block_sparse_moe.experts.1.w1.weight'");
}

TEST(IoShard, BadIdsAreConfigErrorsNamingTheId) {
  ScratchDir dir;
  write_model(dir, moe::test::mixtral_config(1), Layout::fused, 5);
  const auto m = ModelCheckpoint::open(dir.str());
  LoadOptions o;
  o.experts = {1, 4};
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_shard<float>(m, 0, o); },
      "moe: LoadOptions::experts[1] = 4 is out of range [0, 4) of " + dir.file("config.json"));
  o.experts = {-1};
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_shard<float>(m, 0, o); },
      "moe: LoadOptions::experts[0] = -1 is out of range [0, 4) of " + dir.file("config.json"));
  o.experts = {2, 0, 2};
  expect_error<moe::config_error>([&] { moe::io::load_moe_shard<float>(m, 0, o); },
                                  "moe: LoadOptions::experts names expert 2 twice (at [2])");
  // A block holds every expert.
  o.experts = {0, 1};
  expect_error<moe::config_error>(
      [&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, 0, o); },
      "moe: LoadOptions::experts selects 2 of 4 experts; a block holds every expert "
      "(load_moe_shard reads a subset)");
}

// ---------------------------------------------------------------------------------------------
// Non-finite values: named by file, layer and tensor at load

TEST(IoNonFinite, NanRouterAndInfExpertNameFileLayerAndTensor) {
  for (Layout layout : {Layout::per_expert, Layout::fused}) {
    ScratchDir dir;
    const auto spec = moe::io::parse_model_spec(moe::test::mixtral_config(2).dump(), "c");
    std::mt19937_64 rng(8);
    auto w0 = moe::test::random_layer(spec, rng);
    auto w1 = moe::test::random_layer(spec, rng);
    w1.router(2, 5) = std::numeric_limits<float>::quiet_NaN();
    w1.experts.w_out(3)(1, 4) = -std::numeric_limits<float>::infinity();
    std::vector<TensorToWrite> tensors;
    moe::test::add_moe_layer(tensors, Family::mixtral, 0, w0, spec.moe, layout);
    moe::test::add_moe_layer(tensors, Family::mixtral, 1, w1, spec.moe, layout);
    moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
    write_text(dir.file("config.json"), moe::test::mixtral_config(2).dump());
    const auto m = ModelCheckpoint::open(dir.str());
    EXPECT_NO_THROW(moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, 0));
    const std::string p =
        layout == Layout::fused ? "model.layers.1.mlp." : "model.layers.1.block_sparse_moe.";
    expect_error<moe::io_error>([&] { moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(m, 1); },
                                "moe: " + dir.file("model.safetensors") + ": layer 1: tensor '" +
                                    p + "gate.weight' has a non-finite value (nan at [2, 5])");
    // Without the router's NaN, the expert's -inf: fused rows count from the tensor's first.
    w1.router(2, 5) = 0.5f;
    tensors.clear();
    moe::test::add_moe_layer(tensors, Family::mixtral, 1, w1, spec.moe, layout);
    moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
    LoadOptions o;
    o.experts = {3};
    const std::string down = layout == Layout::fused ? "experts.down_proj' has a non-finite "
                                                       "value (-inf at [25, 4])"
                                                     : "experts.3.w2.weight' has a non-finite "
                                                       "value (-inf at [1, 4])";
    expect_error<moe::io_error>(
        [&] { moe::io::load_moe_shard<float>(dir.str(), 1, o); },
        "moe: " + dir.file("model.safetensors") + ": layer 1: tensor '" + p + down);
  }
}

// ---------------------------------------------------------------------------------------------
// AnyMoeBlock

TEST(IoAnyMoeBlock, ForwardsMatchTheHeldBlock) {
  ScratchDir dir;
  write_model(dir, moe::test::deepseek_v3_config(), Layout::fused, 17);
  const auto any = moe::io::load_any_moe_layer<float>(dir.str(), 1);
  ASSERT_EQ(any.index(), 2u);
  ASSERT_NE(any.get_if<moe::io::AnyMoeBlock<float>::Alternative<2>>(), nullptr);
  EXPECT_EQ(any.get_if<moe::io::AnyMoeBlock<float>::Alternative<0>>(), nullptr);
  EXPECT_EQ(any.config().num_experts, 8);
  EXPECT_EQ(moe::io::config_of(any).num_experts, 8);
  for (Index tokens : {1, 7, 31}) {
    std::mt19937_64 rng(static_cast<std::uint64_t>(tokens));
    const RowMatrix<float> x = moe::test::random_matrix<float>(tokens, 8, rng);
    RowMatrix<float> want(tokens, 8), y(tokens, 8), y2(tokens, 8);
    moe::Workspace<float> ws;
    any.get<2>().forward(x, want, ws);
    any.forward(x, y, ws);
    moe::io::forward(any, x, y2, ws);  // the README's call, T deduced from the block
    EXPECT_EQ(y, want);
    EXPECT_EQ(y2, want);
    EXPECT_EQ(any.forward(x), want);  // allocating, serial
  }
  const RowMatrix<float> bad(3, 5);
  RowMatrix<float> y(3, 8);
  moe::Workspace<float> ws;
  EXPECT_THROW(any.forward(bad, y, ws), moe::shape_error);
}

}  // namespace
