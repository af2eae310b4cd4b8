// Test support: one golden reference case (tests/data/reference/FORMAT.md), loaded with moe::io,
// and the comparison bookkeeping of the reference runner.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/io/safetensors.hpp"
#include "moe/moe.hpp"

namespace moe::golden {

/// A golden case file: metadata and canonical tensors.
class Case {
 public:
  explicit Case(const std::string& path)
      : file_(io::SafetensorsFile::open(path)),
        name_(path.substr(path.find_last_of('/') + 1)) {}

  const std::string& name() const { return name_; }
  const io::SafetensorsFile& file() const { return file_; }

  /// Metadata value; throws io_error naming the key when absent.
  const std::string& meta(const std::string& key) const {
    const auto& m = file_.metadata();
    const auto it = m.find(key);
    if (it == m.end()) throw io_error("moe: " + name_ + ": metadata has no key '" + key + "'");
    return it->second;
  }
  std::string meta_or(const std::string& key, const std::string& fallback) const {
    const auto& m = file_.metadata();
    const auto it = m.find(key);
    return it == m.end() || it->second == "none" ? fallback : it->second;
  }
  Index meta_int(const std::string& key) const { return parse_int(key, meta(key)); }
  Index meta_int_or(const std::string& key, Index fallback) const {
    const std::string v = meta_or(key, "");
    return v.empty() ? fallback : parse_int(key, v);
  }
  double meta_double_or(const std::string& key, double fallback) const {
    const std::string v = meta_or(key, "");
    if (v.empty()) return fallback;
    try {
      return std::stod(v);
    } catch (const std::exception&) {
      throw io_error("moe: " + name_ + ": metadata '" + key + "' = '" + v + "' is not a number");
    }
  }
  bool meta_bool_or(const std::string& key, bool fallback) const {
    const std::string v = meta_or(key, "");
    if (v.empty()) return fallback;
    if (v == "true") return true;
    if (v == "false") return false;
    throw io_error("moe: " + name_ + ": metadata '" + key + "' = '" + v + "' is not a boolean");
  }

  bool has(const std::string& tensor) const { return file_.contains(tensor); }
  template <class T = double>
  RowMatrix<T> mat(const std::string& tensor) const {
    return file_.read_matrix<T>(tensor);
  }

  /// The block configuration the metadata describes (sizes and shared expert).
  MoeConfig config() const {
    MoeConfig c;
    c.d_model = meta_int("d_model");
    c.d_ff = meta_int("d_ff");
    c.num_experts = meta_int("num_experts");
    c.top_k = meta_int("top_k");
    if (has("shared.down.weight")) {
      c.shared_d_ff = mat("shared.down.weight").cols();
      c.shared_expert_gate = has("shared_gate.weight");
    }
    return c;
  }

  /// The canonical tensors as block weights (gated: experts.{e}.gate/up/down; plain: wi/wo).
  template <class T>
  MoeWeights<T> weights(const MoeConfig& c, bool gated, bool with_bias) const {
    auto w = MoeWeights<T>::zeros(c, gated, with_bias);
    w.router = mat<T>("router.weight");
    if (with_bias) w.router_bias = mat<T>("router.bias").transpose();
    for (Index e = 0; e < c.num_experts; ++e) {
      const std::string p = "experts." + std::to_string(e) + ".";
      if (gated) {
        w.experts.set_gated(e, mat<T>(p + "gate.weight"), mat<T>(p + "up.weight"),
                            mat<T>(p + "down.weight"));
      } else {
        w.experts.set_plain(e, mat<T>(p + "wi.weight"), mat<T>(p + "wo.weight"));
      }
    }
    if (c.shared_d_ff > 0) {
      w.shared.set_gated(0, mat<T>("shared.gate.weight"), mat<T>("shared.up.weight"),
                         mat<T>("shared.down.weight"));
      if (c.shared_expert_gate) w.shared_gate = mat<T>("shared_gate.weight");
    }
    return w;
  }

 private:
  Index parse_int(const std::string& key, const std::string& v) const {
    try {
      std::size_t used = 0;
      const long long x = std::stoll(v, &used);
      if (used == v.size()) return static_cast<Index>(x);
    } catch (const std::exception&) {
    }
    throw io_error("moe: " + name_ + ": metadata '" + key + "' = '" + v + "' is not an integer");
  }

  io::SafetensorsFile file_;
  std::string name_;
};

/// What a block run produced, in double, for comparison with a case.
struct Outputs {
  RowMatrix<double> output, logits, weights;
  RowMatrix<std::int32_t> experts;
  RowMatrix<std::uint8_t> kept;
};

/// Runs a block on the case's input and collects what the runner compares.
template <class T, class Gating, class Ffn>
Outputs run_block(const Case& c, const MoeConfig& config, typename Gating::Options options,
                  bool with_bias) {
  const bool gated = Ffn::gated;
  SparseMoeBlock<T, Gating, Ffn> block(config, c.weights<T>(config, gated, with_bias), options);
  const RowMatrix<T> x = c.mat<T>("input");
  RowMatrix<T> y(x.rows(), x.cols());
  Workspace<T> ws;
  block.forward(x, y, ws);
  Outputs o;
  o.output = y.template cast<double>();
  o.logits = ws.routing().logits().template cast<double>();
  o.weights = ws.routing().weights().template cast<double>();
  o.experts = ws.routing().experts();
  o.kept = ws.routing().kept();
  return o;
}

/// Collects the errors of one case: the largest absolute error, the largest error relative to
/// (1 + max |reference|) (the form of FORMAT.md section 9's tolerances), and failures.
struct Report {
  double max_abs = 0, max_rel = 0;
  std::vector<std::string> failures;
  std::vector<std::pair<std::string, double>> extra;  ///< printed as name=value

  /// Passes when |got - ref| <= tol * (1 + max|ref|) everywhere.
  void compare(const std::string& what, const RowMatrix<double>& got, const RowMatrix<double>& ref,
               double tol) {
    if (got.rows() != ref.rows() || got.cols() != ref.cols()) {
      failures.push_back(what + ": shape " + detail::shape_str(got.rows(), got.cols()) +
                         " vs reference " + detail::shape_str(ref.rows(), ref.cols()));
      return;
    }
    if (ref.size() == 0) return;
    const double s = ref.cwiseAbs().maxCoeff();
    const double err = (got - ref).cwiseAbs().maxCoeff();
    const double rel = err / (1 + s);
    max_abs = std::max(max_abs, err);
    max_rel = std::max(max_rel, rel);
    if (!(err <= tol * (1 + s))) {
      failures.push_back(detail::concat(what, ": max abs error ", err, " exceeds ", tol,
                                        " * (1 + ", s, ")"));
    }
  }
  /// Relative comparison of a scalar (loss values).
  void compare_scalar(const std::string& what, double got, double ref, double rel_tol) {
    const double err = std::abs(got - ref) / std::max(std::abs(ref), 1e-300);
    extra.emplace_back(what, err);
    if (!(err <= rel_tol)) {
      failures.push_back(detail::concat(what, ": ", got, " vs reference ", ref, " (relative error ",
                                        err, " > ", rel_tol, ")"));
    }
  }
  void fail(const std::string& why) { failures.push_back(why); }
  bool passed() const { return failures.empty(); }
};

/// Compares selected experts: in order (set_compare false), or as (index, weight) sets per token
/// (DeepSeek-V3, whose HF top-k is unsorted). Weights are compared slot for slot after matching.
inline void compare_selection(Report& report, const std::string& what, const Outputs& got,
                              const RowMatrix<std::int64_t>& ref_idx,
                              const RowMatrix<double>& ref_w, double weight_tol,
                              bool set_compare) {
  const Index T = ref_idx.rows(), k = ref_idx.cols();
  if (got.experts.rows() != T || got.experts.cols() < k) {
    report.fail(what + ": selection shape " + detail::shape_str(got.experts.rows(),
                                                                 got.experts.cols()) +
                " vs reference " + detail::shape_str(T, k));
    return;
  }
  RowMatrix<double> w_matched(T, k);
  for (Index t = 0; t < T; ++t) {
    std::vector<std::pair<std::int64_t, double>> mine, theirs;
    for (Index j = 0; j < k; ++j) {
      mine.emplace_back(got.experts(t, j), got.weights(t, j));
      theirs.emplace_back(ref_idx(t, j), ref_w(t, j));
    }
    if (set_compare) {
      std::sort(mine.begin(), mine.end());
      std::sort(theirs.begin(), theirs.end());
    }
    for (Index j = 0; j < k; ++j) {
      const auto ju = static_cast<std::size_t>(j);
      if (mine[ju].first != theirs[ju].first) {
        report.fail(detail::concat(what, ": token ", t, " slot ", j, " selected expert ",
                                   mine[ju].first, ", reference ", theirs[ju].first));
        return;
      }
      w_matched(t, j) = mine[ju].second;
    }
  }
  RowMatrix<double> ref_sorted(T, k);
  for (Index t = 0; t < T; ++t) {
    std::vector<std::pair<std::int64_t, double>> theirs;
    for (Index j = 0; j < k; ++j) theirs.emplace_back(ref_idx(t, j), ref_w(t, j));
    if (set_compare) std::sort(theirs.begin(), theirs.end());
    for (Index j = 0; j < k; ++j) ref_sorted(t, j) = theirs[static_cast<std::size_t>(j)].second;
  }
  report.compare(what + " weights", w_matched, ref_sorted, weight_tol);
}

}  // namespace moe::golden
