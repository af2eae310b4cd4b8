// Family types (gating/family.hpp): every family name, constructed with no Options, computes its
// family's published behaviour, checked against the family's golden case (HF transformers 5.17
// in float64; v1 cases in tests/data/reference, DeepSeek-V2 from the v2 set).
#include <algorithm>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case.hpp"
#include "reference/golden_case_v2.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

const std::string kV1 = std::string(MOE_TEST_DATA_DIR) + "/reference/";
const std::string kV2 = std::string(MOE_TEST_DATA_DIR) + "/reference/v2/";

/// Largest |a - b| / (1 + max |b|) (the golden files' tolerance form).
double relative_error(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  return (a - b).cwiseAbs().maxCoeff() / (1 + b.cwiseAbs().maxCoeff());
}

/// Per token, the (expert, weight) slots as a set equal HF's, weights within 1e-6 relative.
template <class S>
void expect_same_selection(const Routing<S>& routing, const RowMatrix<std::int64_t>& idx,
                           const RowMatrix<double>& w) {
  ASSERT_EQ(routing.num_tokens(), idx.rows());
  ASSERT_EQ(routing.slots(), idx.cols());
  for (Index t = 0; t < idx.rows(); ++t) {
    std::vector<std::pair<std::int64_t, double>> mine, theirs;
    for (Index j = 0; j < idx.cols(); ++j) {
      if (routing.kept()(t, j)) mine.emplace_back(routing.experts()(t, j), routing.weights()(t, j));
      if (idx(t, j) >= 0) theirs.emplace_back(idx(t, j), w(t, j));
    }
    std::sort(mine.begin(), mine.end());
    std::sort(theirs.begin(), theirs.end());
    ASSERT_EQ(mine.size(), theirs.size()) << "token " << t;
    for (std::size_t j = 0; j < mine.size(); ++j) {
      ASSERT_EQ(mine[j].first, theirs[j].first) << "token " << t;
      EXPECT_NEAR(mine[j].second, theirs[j].second, 1e-6 * std::abs(theirs[j].second))
          << "token " << t << " expert " << mine[j].first;
    }
  }
}

/// Runs a double block on a v1 case and compares with HF's output and routing.
template <class Block>
void expect_matches_v1(const golden::Case& c, const Block& block_double,
                       const RowMatrix<double>& hf_output) {
  const RowMatrix<double> x = c.mat("input");
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  block_double.forward(x, y, ws);
  EXPECT_LE(relative_error(y, hf_output), 1e-6) << c.name();
  expect_same_selection(ws.routing(), c.mat<std::int64_t>("topk_idx"), c.mat("topk_weight"));
}

// ---- the types themselves -------------------------------------------------------------------

TEST(GatingFamily, TypesDeriveFromTheirGenericPolicy) {
  static_assert(std::is_base_of_v<gating::SoftmaxTopK, gating::Mixtral>);
  static_assert(std::is_base_of_v<gating::SoftmaxTopK, gating::Olmoe>);
  static_assert(std::is_base_of_v<gating::BasicGroupLimitedTopK<false>, gating::DeepSeekV2>);
  static_assert(std::is_base_of_v<gating::BasicGroupLimitedTopK<true>, gating::DeepSeekV3>);
  static_assert(std::is_base_of_v<gating::CapacityTopK, gating::SwitchTop1>);
  // Distinct types: a block names its family.
  static_assert(!std::is_same_v<gating::Mixtral, gating::Qwen3Moe>);
  static_assert(!std::is_same_v<gating::Olmoe, gating::Qwen2Moe>);
  static_assert(gating::DeepSeekV3::uses_bias && !gating::DeepSeekV2::uses_bias);
}

TEST(GatingFamily, DefaultOptionsArePublishedBehaviour) {
  EXPECT_TRUE(gating::Mixtral::Options().normalize);
  EXPECT_FALSE(gating::Qwen2Moe::Options().normalize);
  EXPECT_TRUE(gating::Qwen3Moe::Options().normalize);
  EXPECT_FALSE(gating::Olmoe::Options().normalize);
  // The generic policy keeps its own default (renormalise), for users who mix.
  EXPECT_TRUE(gating::SoftmaxTopK::Options().normalize);

  const gating::DeepSeekV2::Options v2;
  EXPECT_EQ(v2.scoring, gating::Scoring::softmax);
  EXPECT_EQ(v2.group_score, gating::GroupScore::max);
  EXPECT_FALSE(v2.normalize);
  EXPECT_EQ(v2.n_group, 8);
  EXPECT_EQ(v2.topk_group, 3);
  EXPECT_EQ(v2.routed_scaling_factor, 16.0);
  EXPECT_TRUE(v2.float32);

  const gating::DeepSeekV3::Options v3;
  EXPECT_EQ(v3.scoring, gating::Scoring::sigmoid);
  EXPECT_EQ(v3.group_score, gating::GroupScore::top2_sum);
  EXPECT_TRUE(v3.normalize);
  EXPECT_EQ(v3.n_group, 8);
  EXPECT_EQ(v3.topk_group, 4);
  EXPECT_EQ(v3.routed_scaling_factor, 2.5);
  EXPECT_FALSE(v3.hf_zero_group_mask);
  EXPECT_TRUE(v3.float32);
  EXPECT_FALSE(gating::GroupLimitedTopK::Options().float32);

  const gating::SwitchTop1::Options sw;
  EXPECT_EQ(sw.capacity, gating::CapacityTopK::Capacity::absolute);
  EXPECT_EQ(sw.expert_capacity, 64);
  EXPECT_EQ(sw.renormalize, gating::CapacityTopK::Renormalize::none);
  const gating::GShardTop2::Options gs;
  EXPECT_EQ(gs.capacity, gating::CapacityTopK::Capacity::factor);
  EXPECT_EQ(gs.capacity_factor, 1.0);
  EXPECT_EQ(gs.renormalize, gating::CapacityTopK::Renormalize::after_drop);

  // A default-constructed family policy holds the family's Options; generic presets convert.
  EXPECT_FALSE(gating::Olmoe().options.normalize);
  EXPECT_TRUE(gating::Olmoe(gating::SoftmaxTopK::Options::qwen3_moe(true)).options.normalize);
  gating::Qwen2Moe::Options q2 = gating::SoftmaxTopK::Options{true};
  EXPECT_TRUE(q2.normalize);
}

// ---- against the golden cases, no Options ---------------------------------------------------

template <class G>
void check_softmax_family(const std::string& file) {
  const golden::Case c(kV1 + file);
  const MoeConfig cfg = c.config();
  SparseMoeBlock<double, G> block(cfg, c.weights<double>(cfg, true, false));
  expect_matches_v1(c, block, c.mat("output"));
  // float block, no Options either: 1e-5 relative (FORMAT.md section 9).
  SparseMoeBlock<float, G> block_f(cfg, c.weights<float>(cfg, true, false));
  const RowMatrix<float> x = c.mat<float>("input");
  RowMatrix<float> y(x.rows(), x.cols());
  Workspace<float> ws;
  block_f.forward(x, y, ws);
  EXPECT_LE(relative_error(y.cast<double>(), c.mat("output")), 1e-5) << file;
}

TEST(GatingFamilyGolden, MixtralWithNoOptions) {
  check_softmax_family<gating::Mixtral>("mixtral.safetensors");
}
TEST(GatingFamilyGolden, Qwen2MoeWithNoOptions) {
  check_softmax_family<gating::Qwen2Moe>("qwen2_moe.safetensors");
}
TEST(GatingFamilyGolden, Qwen3MoeWithNoOptions) {
  check_softmax_family<gating::Qwen3Moe>("qwen3_moe.safetensors");
}
TEST(GatingFamilyGolden, OlmoeWithNoOptions) {
  check_softmax_family<gating::Olmoe>("olmoe.safetensors");
}

// The generic policy with its own defaults renormalises: on the OLMoE case that is wrong, which
// is what the family type prevents (the test would not notice a family type that renormalised).
TEST(GatingFamilyGolden, GenericSoftmaxTopKDefaultsDoNotMatchOlmoe) {
  const golden::Case c(kV1 + "olmoe.safetensors");
  const MoeConfig cfg = c.config();
  SparseMoeBlock<double, gating::SoftmaxTopK> block(cfg, c.weights<double>(cfg, true, false));
  const RowMatrix<double> x = c.mat("input");
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  block.forward(x, y, ws);
  EXPECT_GT(relative_error(y, c.mat("output")), 1e-3);
}

// Switch: SwitchTop1 with no Options (expert_capacity 64 >= T) is HF 5.17 as shipped (the case
// `switch`, which never drops); the capacity case needs only its checkpoint number.
TEST(GatingFamilyGolden, SwitchTop1WithNoOptions) {
  const golden::Case c(kV1 + "switch.safetensors");
  const MoeConfig cfg = c.config();
  SparseMoeBlock<double, gating::SwitchTop1, ReluMlp> block(cfg,
                                                            c.weights<double>(cfg, false, false));
  expect_matches_v1(c, block, c.mat("output"));

  const golden::Case cap(kV1 + "switch_capacity.safetensors");
  const MoeConfig cfg_cap = cap.config();
  gating::SwitchTop1::Options o;
  o.expert_capacity = cap.meta_int("capacity");
  SparseMoeBlock<double, gating::SwitchTop1, ReluMlp> capped(
      cfg_cap, cap.weights<double>(cfg_cap, false, false), o);
  const RowMatrix<double> x = cap.mat("input");
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  capped.forward(x, y, ws);
  EXPECT_LE(relative_error(y, cap.mat("output")), 1e-6);
  EXPECT_GT(ws.stats().dropped_tokens, 0);
}

// DeepSeek-V3: the case uses n_group 4 / topk_group 2 (the published model has 8 / 4 over 256
// experts), numbers the loader fills per checkpoint; everything else is the type's default.
TEST(GatingFamilyGolden, DeepSeekV3DefaultsWithTheCheckpointGroups) {
  const golden::Case c(kV1 + "deepseek_v3.safetensors");
  const MoeConfig cfg = c.config();
  gating::DeepSeekV3::Options o;
  o.n_group = c.meta_int("n_group");
  o.topk_group = c.meta_int("topk_group");
  ASSERT_EQ(c.meta_double_or("routed_scaling_factor", 0), o.routed_scaling_factor);
  SparseMoeBlock<double, gating::DeepSeekV3> block(cfg, c.weights<double>(cfg, true, true), o);
  expect_matches_v1(c, block, c.mat("output"));

  // No Options at all: the published 8 groups / 4 kept, bitwise what the explicit preset gives.
  SparseMoeBlock<double, gating::DeepSeekV3> plain(cfg, c.weights<double>(cfg, true, true));
  auto v3 = gating::GroupLimitedTopK::Options::deepseek_v3(8, 4, 2.5, true);
  v3.float32 = true;
  SparseMoeBlock<double, gating::GroupLimitedTopK> preset(cfg, c.weights<double>(cfg, true, true),
                                                          v3);
  const RowMatrix<double> x = c.mat("input");
  RowMatrix<double> y1(x.rows(), x.cols()), y2(x.rows(), x.cols());
  Workspace<double> ws;
  plain.forward(x, y1, ws);
  preset.forward(x, y2, ws);
  EXPECT_TRUE(y1 == y2);
}

// DeepSeek-V2 has no v1 case: the v2 cases (HF names, Mixtral layout) with the checkpoint's
// numbers (greedy = one group; group_limited_greedy 4 / 2; scaling 2.5); scoring, group score
// and renormalisation are the type's defaults.
TEST(GatingFamilyGolden, DeepSeekV2DefaultsWithTheCheckpointNumbers) {
  for (const char* file : {"deepseek_v2.safetensors", "deepseek_v2_group.safetensors"}) {
    const golden::v2::Case c(kV2 + file);
    MoeConfig cfg;
    const auto w = golden::v2::mixtral_layout_weights<double>(c, cfg, "gate.weight");
    gating::DeepSeekV2::Options o;
    const bool grouped = c.config_string("topk_method", "greedy") == "group_limited_greedy";
    o.n_group = grouped ? c.config_int("n_group", 1) : 1;
    o.topk_group = grouped ? c.config_int("topk_group", 1) : 1;
    o.routed_scaling_factor = c.config_double("routed_scaling_factor", 1.0);
    ASSERT_FALSE(c.config_bool("norm_topk_prob", false));
    SparseMoeBlock<double, gating::DeepSeekV2> block(cfg, w, o);
    const RowMatrix<double> x = c.input();
    RowMatrix<double> y(x.rows(), x.cols());
    Workspace<double> ws;
    block.forward(x, y, ws);
    EXPECT_LE(relative_error(y, c.output()), 1e-6) << file;
    expect_same_selection(ws.routing(), c.topk_idx(), c.topk_weight());
  }
}

// GShard has no golden case: with no Options it equals the explicit preset bitwise.
TEST(GatingFamily, GShardTop2WithNoOptionsIsThePreset) {
  const golden::Case c(kV1 + "switch.safetensors");
  MoeConfig cfg = c.config();
  cfg.top_k = 2;
  SparseMoeBlock<double, gating::GShardTop2, ReluMlp> plain(cfg,
                                                            c.weights<double>(cfg, false, false));
  SparseMoeBlock<double, gating::CapacityTopK, ReluMlp> preset(
      cfg, c.weights<double>(cfg, false, false), gating::CapacityTopK::Options::gshard(1.0));
  const RowMatrix<double> x = c.mat("input");
  RowMatrix<double> y1(x.rows(), x.cols()), y2(x.rows(), x.cols());
  Workspace<double> ws;
  plain.forward(x, y1, ws);
  preset.forward(x, y2, ws);
  EXPECT_TRUE(y1 == y2);
  EXPECT_GT(ws.stats().dropped, 0);  // capacity 2 * 36 / 8 = 9 binds on this routing
}

// ---- every family type in a block, no Options -------------------------------------------------

template <class G>
class EveryFamily : public ::testing::Test {};
using FamilyTypes = ::testing::Types<
    gating::Mixtral, gating::Qwen2Moe, gating::Qwen3Moe, gating::Olmoe, gating::DeepSeekV2,
    gating::DeepSeekV3, gating::SwitchTop1, gating::GShardTop2, gating::MiniMax, gating::Jamba,
    gating::FlexOlmo, gating::Qwen3Next, gating::Qwen3_5Moe, gating::HunYuanV1Moe, gating::Gemma4,
    gating::DeepSeekV32, gating::Dots1, gating::Glm4Moe, gating::Glm4MoeLite, gating::SolarOpen,
    gating::ExaoneMoe, gating::MimoV2Flash, gating::NemotronH, gating::Mistral4, gating::DeepSeekV4,
    gating::Afmoe, gating::HyV3, gating::MiniMaxM2, gating::Laguna, gating::Step3p7,
    gating::Lfm2Moe, gating::Ernie4_5Moe, gating::LongcatFlash, gating::Dbrx, gating::GptOss,
    gating::Llama4, gating::GraniteMoe, gating::JetMoe, gating::Cohere2Moe, gating::PhiMoe>;
TYPED_TEST_SUITE(EveryFamily, FamilyTypes);

// SparseMoeBlock<double, G>(cfg, w) with no Options constructs, forwards, and routes exactly as
// the family's policy with default Options applied to the block's own logits.
TYPED_TEST(EveryFamily, BlockWithNoOptionsRoutesAsTheDefaultPolicy) {
  using G = TypeParam;
  MoeConfig cfg;
  cfg.d_model = 8;
  cfg.d_ff = 5;
  cfg.num_experts = 16;
  cfg.top_k = 2;
  std::mt19937_64 rng(42);
  SparseMoeBlock<double, G> block(cfg, test::random_weights<double>(cfg, rng, true, G::uses_bias));
  const RowMatrix<double> x = test::random_matrix<double>(31, cfg.d_model, rng);
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  block.forward(x, y, ws);
  EXPECT_TRUE(y.allFinite());

  const G policy;  // default Options: the family's
  Routing<double> r;
  r.resize(x.rows(), cfg.num_experts, policy.slots(cfg));
  const auto logits = ws.routing().logits();
  std::copy(logits.data(), logits.data() + logits.size(), r.logits().data());
  RouteContext<double> ctx;
  if constexpr (G::uses_bias) ctx.selection_bias = block.weights().router_bias.data();
  policy.route(cfg, ctx, r);
  EXPECT_TRUE(r.experts() == ws.routing().experts());
  EXPECT_TRUE(r.weights() == ws.routing().weights());
}

// DeepSeek-V4 hash layers need the token ids: until the block passes them (RouteContext::token_ids)
// a forward fails with a message that says so.
TEST(GatingFamily, HashLayerWithoutTokenIdsFailsClearly) {
  MoeConfig cfg;
  cfg.d_model = 8;
  cfg.d_ff = 5;
  cfg.num_experts = 16;
  cfg.top_k = 2;
  std::mt19937_64 rng(1);
  SparseMoeBlock<double, gating::DeepSeekV4Hash> block(cfg, test::random_weights<double>(cfg, rng));
  const RowMatrix<double> x = test::random_matrix<double>(3, cfg.d_model, rng);
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  test::expect_error<config_error>([&] { block.forward(x, y, ws); },
                                   "moe: Selection::token_table needs the token ids and the expert "
                                   "table (RouteContext::token_ids, expert_table)");
}

}  // namespace
}  // namespace moe
