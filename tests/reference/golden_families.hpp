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

/// Runs the family's block in double and float and checks it. Returns false (with the reason)
/// when this build does not implement the family.
inline bool run_family(const Case& c, Report& r, std::string& skip_reason) {
  const std::string family = c.meta("family");
  const MoeConfig config = c.config();
  if (family == "mixtral") {
    const gating::SoftmaxTopK::Options o{/*normalize=*/true};
    const auto d = run_block<double, gating::SoftmaxTopK, SwiGLU>(c, config, o, false);
    const auto f = run_block<float, gating::SoftmaxTopK, SwiGLU>(c, config, o, false);
    check_forward(c, r, d, f, false);
    return true;
  }
  skip_reason = "family '" + family + "' is not implemented in this build";
  return false;
}

}  // namespace moe::golden
