// Test support: builds the block a golden case's `family` metadata names and checks its forward.
#pragma once

#include <string>

#include "reference/golden_case.hpp"

namespace moe::golden {

/// Tolerances of FORMAT.md section 9.
struct Tolerances {
  double output_ref64 = 1e-10;  ///< double block vs ref64.output, times (1 + max|ref|)
  double output_hf = 1e-6;      ///< double block vs HF output (HF routes in float32)
  double output_float = 1e-5;   ///< float block vs HF output
  double logits = 1e-12;
  double weight_ref64 = 1e-12;
  double weight_hf = 1e-6;
};

/// Compares a double run with the case's tensors, and a float run with HF's output.
inline void check_forward(const Case& c, Report& r, const Outputs& d, const Outputs& f,
                          bool set_compare) {
  const Tolerances tol;
  r.compare("output vs ref64", d.output, c.mat("ref64.output"), tol.output_ref64);
  r.compare("output vs hf", d.output, c.mat("output"), tol.output_hf);
  r.compare("float output vs hf", f.output, c.mat("output"), tol.output_float);
  r.compare("router logits", d.logits, c.mat("router_logits"), tol.logits);
  compare_selection(r, "ref64 top-k", d, c.mat<std::int64_t>("ref64.topk_idx"),
                    c.mat("ref64.topk_weight"), tol.weight_ref64, set_compare);
  compare_selection(r, "hf top-k", d, c.mat<std::int64_t>("topk_idx"), c.mat("topk_weight"),
                    tol.weight_hf, set_compare);
}

/// Compares the case's `dropped` tensor ([T], 1 = HF dropped the token) with the slots the block
/// did not keep (top-1: a token is dropped when its only slot is not kept). Exact.
inline void check_dropped(const Case& c, Report& r, const Outputs& o, const std::string& what) {
  const RowMatrix<std::int64_t> ref = c.mat<std::int64_t>("dropped");
  const Index T = o.kept.rows();
  if (ref.size() != T) {
    r.fail(detail::concat(what, ": dropped has ", ref.size(), " entries, expected ", T));
    return;
  }
  Index mismatches = 0, first = -1, count = 0;
  for (Index t = 0; t < T; ++t) {
    bool dropped = true;
    for (Index j = 0; j < o.kept.cols(); ++j) dropped = dropped && o.kept(t, j) == 0;
    count += dropped ? 1 : 0;
    if (dropped != (ref.data()[t] != 0)) {
      ++mismatches;
      if (first < 0) first = t;
    }
  }
  r.extra.emplace_back(what + "_dropped", static_cast<double>(count));
  if (mismatches > 0) {
    r.fail(detail::concat(what, ": ", mismatches, " tokens dropped differently from the reference",
                          " (first: token ", first, ")"));
  }
}

/// Runs Gating in double and float on the case and checks the forward (and `dropped` when the
/// case stores it).
template <class Gating, class Ffn>
void run_and_check(const Case& c, Report& r, const MoeConfig& config,
                   const typename Gating::Options& options, bool set_compare) {
  const bool bias = Gating::uses_bias;
  const auto d = run_block<double, Gating, Ffn>(c, config, options, bias);
  const auto f = run_block<float, Gating, Ffn>(c, config, options, bias);
  check_forward(c, r, d, f, set_compare);
  if (c.has("dropped")) {
    check_dropped(c, r, d, "double");
    check_dropped(c, r, f, "float");
  }
}

/// Runs the family's block in double and float and checks it. Returns false (with the reason)
/// when this build does not implement the family. Everything comes from the case's metadata and
/// tensors (never from the file name), so other seeds and sizes run unchanged.
inline bool run_family(const Case& c, Report& r, std::string& skip_reason) {
  const std::string family = c.meta("family");
  const MoeConfig config = c.config();
  // FORMAT.md 5.1-5.3: softmax, top-k, renormalise when norm_topk_prob (Mixtral: always).
  if (family == "mixtral" || family == "qwen2_moe" || family == "qwen3_moe" || family == "olmoe") {
    const bool family_default = family == "mixtral" || family == "qwen3_moe";
    gating::SoftmaxTopK::Options o;
    o.normalize = family == "mixtral" ? true : c.meta_bool_or("norm_topk_prob", family_default);
    run_and_check<gating::SoftmaxTopK, SwiGLU>(c, r, config, o, false);
    return true;
  }
  // FORMAT.md 5.4: sigmoid, selection bias, top-2-sum groups; HF's top-k is unsorted (sets).
  if (family == "deepseek_v3") {
    const Index n_group = c.meta_int_or("n_group", 1), topk_group = c.meta_int_or("topk_group", 1);
    const double scaling = c.meta_double_or("routed_scaling_factor", 1.0);
    const bool normalize = c.meta_bool_or("norm_topk_prob", true);
    if (c.has("router.bias")) {
      using G = gating::GroupLimitedTopK;
      const auto o = G::Options::deepseek_v3(n_group, topk_group, scaling, normalize);
      run_and_check<G, SwiGLU>(c, r, config, o, true);
    } else {
      using G = gating::BasicGroupLimitedTopK<false>;
      const auto o = G::Options::deepseek_v3(n_group, topk_group, scaling, normalize);
      run_and_check<G, SwiGLU>(c, r, config, o, true);
    }
    return true;
  }
  // FORMAT.md 5.5-5.6: top-1, plain ReLU experts, capacity by position; `capacity_rule` starting
  // with "none in effect" means HF 5.17 as shipped, which never drops (run dropless).
  if (family == "switch") {
    const std::string rule = c.meta_or("capacity_rule", "none in effect");
    const Index capacity = c.meta_int_or("capacity", 0);
    const bool dropless = rule.rfind("none in effect", 0) == 0 || capacity <= 0;
    const auto o = dropless ? gating::CapacityTopK::Options::dropless()
                            : gating::CapacityTopK::Options::switch_transformers(capacity);
    run_and_check<gating::CapacityTopK, ReluMlp>(c, r, config, o, false);
    return true;
  }
  skip_reason = "family '" + family + "' is not implemented in this build";
  return false;
}

}  // namespace moe::golden
