// Routing of every v2 golden case (tests/data/reference/v2, HF transformers 5.17 in float64): the
// family's policy type, its Options read from the case's hf_config_json, router logits from the
// case's HF router weights; the (expert, weight) set of every token must equal HF's topk_idx /
// topk_weight, weights within 1e-6 relative in double (1e-5 in float).
//
// Router-level extras that are not the policy's (they move into the Router): gpt-oss's bias on
// the logits, Laguna's soft-capping, Gemma 4's input norm and per-expert scale. Here the test
// applies them around the policy, as HF does, in HF's precision.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case_v2.hpp"
#include <dirent.h>

namespace moe {
namespace {

using golden::v2::Case;

const std::string kDir = std::string(MOE_TEST_DATA_DIR) + "/reference/v2";

std::vector<std::string> case_files() {
  std::vector<std::string> files;
  if (DIR* d = opendir(kDir.c_str())) {
    while (const dirent* entry = readdir(d)) {
      const std::string name = entry->d_name;
      const std::string ext = ".safetensors";
      if (name.size() > ext.size() &&
          name.compare(name.size() - ext.size(), ext.size(), ext) == 0) {
        files.push_back(name);
      }
    }
    closedir(d);
  }
  std::sort(files.begin(), files.end());
  return files;
}

/// What the router hands the policy, in double: logits [T x E'], the selection bias [E'] (empty
/// when the case has none), token ids and the hash table, and the per-expert scale of the weights
/// (Gemma 4; empty otherwise).
struct RouterInputs {
  RowMatrix<double> logits;
  std::vector<double> bias;
  std::vector<std::int64_t> token_ids;
  RowMatrix<std::int64_t> table;
  std::vector<double> expert_scale;
};

std::string first_present(const Case& c, std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (c.has_hf(n)) return n;
  }
  return "";
}

/// x W^T (+ b) in double, from the case's router weights (whatever HF names them).
RouterInputs router_inputs(const Case& c) {
  RouterInputs in;
  const RowMatrix<double> x = c.input();
  const std::string router =
      first_present(c, {"gate.weight", "router.weight", "router.layer.weight", "router.gate.weight",
                        "router.classifier.weight", "gate.wg.weight",
                        "block_sparse_moe.router.weight", "router.proj.weight"});
  if (router.empty()) throw io_error("moe: " + c.file_name() + ": no router weight found");
  const RowMatrix<double> w = c.hf(router);
  if (c.family() == "gemma4") {
    // Gemma4TextRouter: h = x / rms(x) * scale * d^-1/2 (float64, RMSNorm without weight).
    const double eps = c.config_double("rms_norm_eps", 1e-6);
    const RowMatrix<double> scale = c.hf("router.scale");
    RowMatrix<double> h = x;
    const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(x.cols()));
    for (Index t = 0; t < x.rows(); ++t) {
      const double ms = x.row(t).squaredNorm() / static_cast<double>(x.cols());
      const double inv = 1.0 / std::sqrt(ms + eps);
      for (Index d = 0; d < x.cols(); ++d) h(t, d) = x(t, d) * inv * scale(0, d) * inv_sqrt_d;
    }
    in.logits = h * w.transpose();
    const RowMatrix<double> s = c.hf("router.per_expert_scale");
    in.expert_scale.assign(s.data(), s.data() + s.size());
  } else {
    in.logits = x * w.transpose();
  }
  if (c.family() == "gpt_oss") in.logits.rowwise() += c.hf("router.bias").row(0);
  if (c.family() == "laguna") {
    // z = tanh(z / c) * c on the float32 logits, in float32.
    const float cap = static_cast<float>(c.config_double("moe_router_logit_softcapping", 0.0));
    if (cap > 0) {
      for (Index i = 0; i < in.logits.size(); ++i) {
        const float z = static_cast<float>(in.logits.data()[i]);
        in.logits.data()[i] = static_cast<double>(std::tanh(z / cap) * cap);
      }
    }
  }
  const std::string bias = first_present(
      c, {"gate.e_score_correction_bias", "e_score_correction_bias", "expert_bias",
          "gate.moe_statics.e_score_correction_bias", "router.e_score_correction_bias"});
  if (!bias.empty()) {
    const RowMatrix<double> b = c.hf(bias);
    in.bias.assign(b.data(), b.data() + b.size());
  }
  in.token_ids = c.input_ids();
  if (c.has_hf("gate.tid2eid")) in.table = c.hf<std::int64_t>("gate.tid2eid");
  return in;
}

/// A routing result in double, slot order as the policy wrote it (kept slots only: -1 otherwise).
struct Result {
  RowMatrix<std::int64_t> idx;
  RowMatrix<double> w;
};

/// Runs policy G (Options o) on the inputs in scalar S; validates it against the config first.
template <class G, class S>
Result run(const Case& c, const typename G::Options& o, const RouterInputs& in) {
  MoeConfig cfg;
  cfg.d_model = c.d_model();
  cfg.d_ff = c.d_ff();
  cfg.num_experts = c.num_experts();
  cfg.top_k = c.top_k();
  const G policy(o);
  policy.validate(cfg);
  const Index T = in.logits.rows(), E = in.logits.cols();
  Routing<S> routing;
  routing.resize(T, E, policy.slots(cfg));
  // In float: the double logits rounded once (the policy in float, not a float router).
  const RowMatrix<S> logits = in.logits.template cast<S>();
  std::copy(logits.data(), logits.data() + logits.size(), routing.logits().data());
  std::vector<S> bias(in.bias.begin(), in.bias.end());
  std::vector<Index> scratch(static_cast<std::size_t>(E), 0);
  RouteContext<S> ctx;
  ctx.scratch = scratch.data();
  ctx.scratch_size = E;
  if (G::uses_bias) {
    if (bias.empty()) throw io_error("moe: " + c.file_name() + ": the policy needs a bias");
    ctx.selection_bias = bias.data();
  }
  if (!in.token_ids.empty()) {
    ctx.token_ids = in.token_ids.data();
    ctx.expert_table = in.table.data();
    ctx.expert_table_rows = in.table.rows();
  }
  policy.route(cfg, ctx, routing);
  Result r;
  const Index k = routing.slots();
  r.idx.resize(T, k);
  r.w.resize(T, k);
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      const bool kept = routing.kept()(t, j) != 0;
      const std::int32_t e = routing.experts()(t, j);
      r.idx(t, j) = kept ? e : -1;
      double w = static_cast<double>(routing.weights()(t, j));
      if (!in.expert_scale.empty() && kept) w *= in.expert_scale[static_cast<std::size_t>(e)];
      r.w(t, j) = kept ? w : 0.0;
    }
  }
  return r;
}

/// Per family: the policy type and its Options from hf_config_json; runs it in S.
template <class S>
Result route_case(const Case& c, const RouterInputs& in) {
  const std::string f = c.family();
  auto norm = [&](bool fallback) { return c.config_bool("norm_topk_prob", fallback); };
  // Softmax over all experts (SoftmaxTopK families).
  if (f == "mixtral") return run<gating::Mixtral, S>(c, {}, in);
  if (f == "minimax") return run<gating::MiniMax, S>(c, {}, in);
  if (f == "hunyuan_v1_moe") return run<gating::HunYuanV1Moe, S>(c, {}, in);
  if (f == "gemma4") return run<gating::Gemma4, S>(c, {}, in);
  if (f == "jamba") return run<gating::Jamba, S>(c, {}, in);
  if (f == "qwen2_moe")
    return run<gating::Qwen2Moe, S>(c, gating::SoftmaxTopK::Options{norm(false)}, in);
  if (f == "qwen3_moe")
    return run<gating::Qwen3Moe, S>(c, gating::SoftmaxTopK::Options{norm(true)}, in);
  if (f == "olmoe") return run<gating::Olmoe, S>(c, gating::SoftmaxTopK::Options{norm(false)}, in);
  if (f == "flex_olmo")
    return run<gating::FlexOlmo, S>(c, gating::SoftmaxTopK::Options{norm(false)}, in);
  if (f == "qwen3_next")
    return run<gating::Qwen3Next, S>(c, gating::SoftmaxTopK::Options{norm(true)}, in);
  if (f == "qwen3_5_moe")
    return run<gating::Qwen3_5Moe, S>(c, gating::SoftmaxTopK::Options{norm(true)}, in);
  // Switch: the capacity applies only where the case re-executed HF's router with it (hf_patch):
  // HF 5.17 as shipped never drops (FORMAT.md section 6).
  if (f == "switch_transformers") {
    gating::SwitchTop1::Options o;
    if (c.meta_or("hf_patch", "none") != "none")
      o.expert_capacity = c.config_int("expert_capacity", 64);
    else
      o.capacity = gating::CapacityTopK::Capacity::unlimited;
    return run<gating::SwitchTop1, S>(c, o, in);
  }
  // Group-limited and scored families.
  auto groups = [&](auto o) {
    o.n_group = c.config_int("n_group", 1);
    o.topk_group = c.config_int("topk_group", 1);
    o.routed_scaling_factor = c.config_double("routed_scaling_factor", o.routed_scaling_factor);
    o.normalize = norm(o.normalize);
    return o;
  };
  if (f == "deepseek_v2") {
    gating::DeepSeekV2::Options o = groups(gating::DeepSeekV2::Options());
    if (c.config_string("topk_method", "greedy") != "group_limited_greedy")
      o.n_group = o.topk_group = 1;
    return run<gating::DeepSeekV2, S>(c, o, in);
  }
  if (f == "deepseek_v3") {
    return run<gating::DeepSeekV3, S>(c, groups(gating::DeepSeekV3::Options()), in);
  }
  if (f == "deepseek_v32")
    return run<gating::DeepSeekV32, S>(c, groups(gating::DeepSeekV32::Options()), in);
  if (f == "dots1") return run<gating::Dots1, S>(c, groups(gating::Dots1::Options()), in);
  if (f == "glm4_moe") return run<gating::Glm4Moe, S>(c, groups(gating::Glm4Moe::Options()), in);
  if (f == "glm4_moe_lite")
    return run<gating::Glm4MoeLite, S>(c, groups(gating::Glm4MoeLite::Options()), in);
  if (f == "solar_open")
    return run<gating::SolarOpen, S>(c, groups(gating::SolarOpen::Options()), in);
  if (f == "exaone_moe")
    return run<gating::ExaoneMoe, S>(c, groups(gating::ExaoneMoe::Options()), in);
  if (f == "mimo_v2_flash")
    return run<gating::MimoV2Flash, S>(c, groups(gating::MimoV2Flash::Options()), in);
  if (f == "nemotron_h")
    return run<gating::NemotronH, S>(c, groups(gating::NemotronH::Options()), in);
  if (f == "mistral4") return run<gating::Mistral4, S>(c, groups(gating::Mistral4::Options()), in);
  if (f == "deepseek_v4") {
    const auto* types = c.config_value("mlp_layer_types");
    const bool hash =
        types != nullptr && types->is_array() && !types->empty() && (*types)[0] == "hash_moe";
    auto fill = [&](auto o) {
      o.routed_scaling_factor = c.config_double("routed_scaling_factor", o.routed_scaling_factor);
      o.normalize = norm(o.normalize);
      return o;
    };
    if (hash) return run<gating::DeepSeekV4Hash, S>(c, fill(gating::DeepSeekV4Hash::Options()), in);
    return run<gating::DeepSeekV4, S>(c, fill(gating::DeepSeekV4::Options()), in);
  }
  if (f == "afmoe") {
    gating::Afmoe::Options o;
    o.routed_scaling_factor = c.config_double("route_scale", 1.0);
    return run<gating::Afmoe, S>(c, o, in);
  }
  if (f == "hy_v3") {
    gating::HyV3::Options o;
    o.routed_scaling_factor = c.config_double("router_scaling_factor", o.routed_scaling_factor);
    return run<gating::HyV3, S>(c, o, in);
  }
  if (f == "minimax_m2") return run<gating::MiniMaxM2, S>(c, {}, in);
  if (f == "laguna") {
    gating::Laguna::Options o;
    o.routed_output_scale = c.config_double("moe_routed_scaling_factor", o.routed_output_scale);
    return run<gating::Laguna, S>(c, o, in);
  }
  if (f == "step3p7") {
    gating::Step3p7::Options o;
    o.routed_output_scale = c.config_double("moe_router_scaling_factor", o.routed_output_scale);
    return run<gating::Step3p7, S>(c, o, in);
  }
  if (f == "lfm2_moe") {
    gating::Lfm2Moe::Options o;
    o.routed_scaling_factor = c.config_double("routed_scaling_factor", o.routed_scaling_factor);
    o.normalize = norm(o.normalize);
    return run<gating::Lfm2Moe, S>(c, o, in);
  }
  if (f == "ernie4_5_moe") {
    gating::Ernie4_5Moe::Options o;
    o.normalize_min = c.config_double("moe_norm_min", o.normalize_min);
    return run<gating::Ernie4_5Moe, S>(c, o, in);
  }
  if (f == "longcat_flash") {
    gating::LongcatFlash::Options o;
    o.zero_experts = c.config_int("zero_expert_num", 0);
    o.routed_scaling_factor = c.config_double("routed_scaling_factor", o.routed_scaling_factor);
    return run<gating::LongcatFlash, S>(c, o, in);
  }
  if (f == "dbrx") {
    gating::Dbrx::Options o;
    o.normalize_p = c.config_double("ffn_config.moe_normalize_expert_weights", 1.0);
    return run<gating::Dbrx, S>(c, o, in);
  }
  if (f == "gpt_oss") return run<gating::GptOss, S>(c, {}, in);
  if (f == "llama4") return run<gating::Llama4, S>(c, {}, in);
  if (f == "granitemoe" || f == "granitemoeshared") return run<gating::GraniteMoe, S>(c, {}, in);
  if (f == "jetmoe") return run<gating::JetMoe, S>(c, {}, in);
  if (f == "cohere2_moe") {
    gating::Cohere2Moe::Options o;
    if (c.config_string("expert_selection_fn", "softmax") == "sigmoid") {
      o.scoring = gating::Scoring::sigmoid;
      o.float32 = false;
      o.normalize = norm(false);
      o.normalize_epsilon = 0;
    }
    return run<gating::Cohere2Moe, S>(c, o, in);
  }
  if (f == "phimoe") {
    gating::PhiMoe::Options o;
    o.jitter_eps = c.config_double("router_jitter_noise", o.jitter_eps);
    return run<gating::PhiMoe, S>(c, o, in);
  }
  throw io_error("moe: " + c.file_name() + ": no policy for family '" + f + "'");
}

/// Largest relative weight error over tokens whose (expert) sets agree; "" or the first mismatch.
std::string compare(const Result& r, const Case& c, double tol, double& max_rel) {
  const RowMatrix<std::int64_t> idx = c.topk_idx();
  const RowMatrix<double> w = c.topk_weight();
  if (r.idx.rows() != idx.rows() || r.idx.cols() != idx.cols()) return "routing shape differs";
  max_rel = 0;
  for (Index t = 0; t < idx.rows(); ++t) {
    std::vector<std::pair<std::int64_t, double>> mine, theirs;
    for (Index j = 0; j < idx.cols(); ++j) {
      if (r.idx(t, j) >= 0) mine.emplace_back(r.idx(t, j), r.w(t, j));
      if (idx(t, j) >= 0) theirs.emplace_back(idx(t, j), w(t, j));
    }
    std::sort(mine.begin(), mine.end());
    std::sort(theirs.begin(), theirs.end());
    if (mine.size() != theirs.size()) {
      return detail::concat("token ", t, ": ", mine.size(), " experts, HF ", theirs.size());
    }
    for (std::size_t j = 0; j < mine.size(); ++j) {
      if (mine[j].first != theirs[j].first) {
        return detail::concat("token ", t, ": expert ", mine[j].first, ", HF ", theirs[j].first);
      }
      const double rel = std::abs(mine[j].second - theirs[j].second) /
                         std::max(std::abs(theirs[j].second), 1e-300);
      max_rel = std::max(max_rel, rel);
    }
  }
  if (!(max_rel <= tol)) return detail::concat("weight relative error ", max_rel, " > ", tol);
  return "";
}

class V2Routing : public ::testing::TestWithParam<std::string> {};

TEST_P(V2Routing, MatchesHuggingFace) {
  const Case c(kDir + "/" + GetParam());
  const RouterInputs in = router_inputs(c);
  double rel_double = 0, rel_float = 0;
  const std::string d = compare(route_case<double>(c, in), c, 1e-6, rel_double);
  const std::string f = compare(route_case<float>(c, in), c, 1e-5, rel_float);
  std::printf("ROUTING %s %s double %s max_rel=%.3g float %s max_rel=%.3g\n", GetParam().c_str(),
              c.family().c_str(), d.empty() ? "PASS" : "FAIL", rel_double,
              f.empty() ? "PASS" : "FAIL", rel_float);
  EXPECT_EQ(d, "") << "double";
  EXPECT_EQ(f, "") << "float";
}

std::string case_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param.substr(0, info.param.find('.'));
  for (char& ch : n) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return n;
}

INSTANTIATE_TEST_SUITE_P(Cases, V2Routing, ::testing::ValuesIn(case_files()), case_name);

TEST(V2RoutingCases, AllShipped) { EXPECT_EQ(case_files().size(), 52u); }

}  // namespace
}  // namespace moe
