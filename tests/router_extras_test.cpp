// Router extras (router.hpp): the logit bias (gpt-oss), soft-capping (Laguna), the input RMS norm
// and per-expert weight scale (Gemma 4), token ids and the expert table (DeepSeek-V4 hash
// layers), through a block of the family type with no Options; the routing must equal HF's
// (tests/data/reference/v2) as (expert, weight) sets, 1e-6 relative in double, 1e-5 in float.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case_v2.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using golden::v2::Case;
const std::string kDir = std::string(MOE_TEST_DATA_DIR) + "/reference/v2/";

template <class T>
Vector<T> vec(const Case& c, const std::string& name) {
  const RowMatrix<T> m = c.hf<T>(name);
  return Eigen::Map<const Vector<T>>(m.data(), m.size());
}

/// Runs SparseMoeBlock<T, G> (zero experts: only the routing matters) on the case's input with
/// the router weights and extras `fill` sets, and compares the routing with HF's.
template <class T, class G, class Fill>
void expect_block_routes_as_hf(const std::string& file, MoeConfig cfg, Fill&& fill, double tol) {
  const Case c(kDir + file);
  cfg.d_model = c.d_model();
  cfg.d_ff = c.d_ff();
  cfg.num_experts = c.num_experts();
  cfg.top_k = c.top_k();
  auto w = MoeWeights<T>::zeros(cfg, true, G::uses_bias);
  fill(c, w);
  SparseMoeBlock<T, G> block(cfg, std::move(w));
  const RowMatrix<T> x = c.input().cast<T>();
  RowMatrix<T> y(x.rows(), x.cols());
  Workspace<T> ws;
  const std::vector<std::int64_t> ids = c.input_ids();
  if (!ids.empty()) ws.set_token_ids(ids.data(), static_cast<Index>(ids.size()));
  block.forward(x, y, ws);
  const auto& r = ws.routing();
  const RowMatrix<std::int64_t> idx = c.topk_idx();
  const RowMatrix<double> hw = c.topk_weight();
  ASSERT_EQ(r.slots(), idx.cols());
  for (Index t = 0; t < idx.rows(); ++t) {
    std::vector<std::pair<std::int64_t, double>> mine, theirs;
    for (Index j = 0; j < idx.cols(); ++j) {
      mine.emplace_back(r.experts()(t, j), static_cast<double>(r.weights()(t, j)));
      theirs.emplace_back(idx(t, j), hw(t, j));
    }
    std::sort(mine.begin(), mine.end());
    std::sort(theirs.begin(), theirs.end());
    for (std::size_t j = 0; j < mine.size(); ++j) {
      ASSERT_EQ(mine[j].first, theirs[j].first) << file << " token " << t;
      EXPECT_NEAR(mine[j].second, theirs[j].second, tol * std::abs(theirs[j].second))
          << file << " token " << t;
    }
  }
}

template <class T>
void gpt_oss(const std::string& file, double tol) {
  expect_block_routes_as_hf<T, gating::GptOss>(
      file, MoeConfig{},
      [](const Case& c, MoeWeights<T>& w) {
        w.router = c.hf<T>("router.weight");
        w.router_logit_bias = vec<T>(c, "router.bias");
      },
      tol);
}

template <class T>
void gemma4(const std::string& file, double tol) {
  const Case c(kDir + file);
  MoeConfig cfg;
  cfg.router_norm_eps = c.config_double("rms_norm_eps", 1e-6);
  expect_block_routes_as_hf<T, gating::Gemma4>(
      file, cfg,
      [](const Case& cc, MoeWeights<T>& w) {
        w.router = cc.hf<T>("router.proj.weight");
        w.router_input_scale = vec<T>(cc, "router.scale");
        w.expert_weight_scale = vec<T>(cc, "router.per_expert_scale");
      },
      tol);
}

template <class T>
void laguna(double tol) {
  const Case c(kDir + "laguna.safetensors");
  MoeConfig cfg;
  cfg.router_logit_softcap = c.config_double("moe_router_logit_softcapping", 0.0);
  ASSERT_GT(cfg.router_logit_softcap, 0);
  expect_block_routes_as_hf<T, gating::Laguna>(
      "laguna.safetensors", cfg,
      [](const Case& cc, MoeWeights<T>& w) {
        w.router = cc.hf<T>("gate.weight");
        w.router_bias = vec<T>(cc, "gate.e_score_correction_bias");
      },
      tol);
}

template <class T>
void deepseek_v4_hash(double tol) {
  const Case c(kDir + "deepseek_v4_hash.safetensors");
  gating::DeepSeekV4Hash::Options o;
  ASSERT_EQ(o.routed_scaling_factor, c.config_double("routed_scaling_factor", 0));
  expect_block_routes_as_hf<T, gating::DeepSeekV4Hash>(
      "deepseek_v4_hash.safetensors", MoeConfig{},
      [](const Case& cc, MoeWeights<T>& w) {
        w.router = cc.hf<T>("gate.weight");
        w.expert_table = cc.hf<std::int64_t>("gate.tid2eid");
      },
      tol);
}

TEST(RouterExtras, GptOssLogitBias) {
  gpt_oss<double>("gpt_oss.safetensors", 1e-6);
  gpt_oss<double>("gpt_oss_clamp.safetensors", 1e-6);
  gpt_oss<float>("gpt_oss.safetensors", 1e-5);
}
TEST(RouterExtras, Gemma4InputNormAndExpertScale) {
  gemma4<double>("gemma4.safetensors", 1e-6);
  gemma4<double>("gemma4_branch.safetensors", 1e-6);
  gemma4<float>("gemma4.safetensors", 1e-5);
}
TEST(RouterExtras, LagunaSoftCapping) {
  laguna<double>(1e-6);
  laguna<float>(1e-5);
}
TEST(RouterExtras, DeepSeekV4HashTokenIds) {
  deepseek_v4_hash<double>(1e-6);
  deepseek_v4_hash<float>(1e-5);
}

// Without the logit bias the gpt-oss case routes differently: the checks above can fail.
TEST(RouterExtras, WithoutTheLogitBiasTheRoutingDiffers) {
  const Case c(kDir + "gpt_oss.safetensors");
  MoeConfig cfg;
  cfg.d_model = c.d_model();
  cfg.d_ff = c.d_ff();
  cfg.num_experts = c.num_experts();
  cfg.top_k = c.top_k();
  auto w = MoeWeights<double>::zeros(cfg);
  w.router = c.hf("router.weight");
  SparseMoeBlock<double, gating::GptOss> block(cfg, std::move(w));
  const RowMatrix<double> x = c.input();
  RowMatrix<double> y(x.rows(), x.cols());
  Workspace<double> ws;
  block.forward(x, y, ws);
  const RowMatrix<std::int64_t> idx = c.topk_idx();
  Index differ = 0;
  for (Index t = 0; t < idx.rows(); ++t) {
    std::vector<std::int64_t> mine, theirs;
    for (Index j = 0; j < idx.cols(); ++j) {
      mine.push_back(ws.routing().experts()(t, j));
      theirs.push_back(idx(t, j));
    }
    std::sort(mine.begin(), mine.end());
    std::sort(theirs.begin(), theirs.end());
    differ += mine != theirs ? 1 : 0;
  }
  EXPECT_GT(differ, 0);
}

TEST(RouterExtras, ValidationMessages) {
  MoeConfig cfg;
  cfg.d_model = 4;
  cfg.d_ff = 3;
  cfg.num_experts = 5;
  cfg.top_k = 2;
  cfg.router_logit_softcap = -1;
  test::expect_error<config_error>([&] { cfg.validate(); },
                                   "moe: router_logit_softcap = -1 must be finite and >= 0");
  cfg.router_logit_softcap = 0;
  cfg.router_norm_eps = 0;
  test::expect_error<config_error>([&] { cfg.validate(); },
                                   "moe: router_norm_eps = 0 must be finite and positive");
  cfg.router_norm_eps = 1e-6;
  std::mt19937_64 rng(3);
  auto w = test::random_weights<double>(cfg, rng);
  w.router_logit_bias = Vector<double>::Zero(4);
  test::expect_error<shape_error>([&] { w.validate(cfg, true, false, false); },
                                  "moe: router logit bias has shape [4 x 1], expected [5 x 1]");
  w.router_logit_bias = Vector<double>::Zero(5);
  w.expert_table = RowMatrix<std::int64_t>::Zero(3, 2);
  w.expert_table(1, 1) = 5;
  test::expect_error<value_error>([&] { w.validate(cfg, true, false, false); },
                                  "moe: expert table names experts outside [0, 5)");
  // Token ids must match the batch.
  SparseMoeBlock<double, gating::GptOss> block(cfg, test::random_weights<double>(cfg, rng));
  const RowMatrix<double> x = test::random_matrix<double>(3, 4, rng);
  RowMatrix<double> y(3, 4);
  Workspace<double> ws;
  const std::vector<std::int64_t> ids = {1, 2};
  ws.set_token_ids(ids.data(), 2);
  test::expect_error<shape_error>([&] { block.forward(x, y, ws); },
                                  "moe: 2 token ids for 3 tokens (Workspace::set_token_ids)");
}

// The backward pass refuses router extras it does not differentiate (rather than a wrong
// gradient).
TEST(RouterExtras, BackwardRefusesExtras) {
  MoeConfig cfg;
  cfg.d_model = 4;
  cfg.d_ff = 3;
  cfg.num_experts = 5;
  cfg.top_k = 2;
  std::mt19937_64 rng(4);
  auto w = test::random_weights<double>(cfg, rng);
  w.router_input_scale = Vector<double>::Ones(4);
  SparseMoeBlock<double, gating::Gemma4, GeGLUTanh> block(cfg, w);
  const RowMatrix<double> x = test::random_matrix<double>(3, 4, rng);
  RowMatrix<double> y(3, 4), dx(3, 4);
  Workspace<double> ws;
  ws.set_training(true);
  block.forward(x, y, ws);
  auto grads = MoeGradients<double>::zeros_like(block.weights());
  BackwardWorkspace<double> bws;
  const LossCoefficients coeffs;
  test::expect_error<config_error>(
      [&] { block_backward(block, x, y, ws, grads, dx, coeffs, bws); },
      "moe: block_backward does not differentiate the router input norm yet (the families that "
      "use it run inference only)");
}

}  // namespace
}  // namespace moe
