// Test support: replays one v2 golden case (tests/data/reference/v2/FORMAT.md) THROUGH THE LOADER:
// the case's hf_config_json becomes config.json and its hf.* tensors a model.safetensors of a
// one-layer checkpoint in a scratch directory, load_any_moe_layer<double / float> builds the block
// from them, and its output and routing are compared with HF's:
//   output, double: |y - y_hf| <= 1e-6 (1 + |y_hf|) per element (HF computes most routers in
//                   float32); float: 1e-5 (1 + |y_hf|);
//   routing (double): per token the (expert, weight) set equals HF's topk_idx / topk_weight
//                   (HF's slot order is often unsorted), weights within 1e-6 (1 + |w|).
// A case the library does not model yet returns false with the reason (SKIP).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/io/model.hpp"
#include "moe/io/safetensors.hpp"

#include "reference/golden_case.hpp"
#include "reference/golden_case_v2.hpp"
#include <unistd.h>

namespace moe::golden::v2 {

/// A scratch directory removed at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "moe_v2_XXXXXX").string();
    if (mkdtemp(templ.data()) == nullptr) throw io_error("moe: cannot create a scratch directory");
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& str() const { return path_; }

 private:
  std::string path_;
};

/// Writes the case as a one-layer checkpoint into dir (config.json + model.safetensors). The case
/// holds the HF module alone, so its names are relative to that module: they are written under
/// the layer prefix config.json implies, plus the part of the family's router name the case
/// lacks (Granite's "block_sparse_moe." when the case is the MoE module itself).
inline void write_case_checkpoint(const Case& c, const std::string& path, const std::string& dir) {
  nlohmann::json config = c.hf_config();
  // The Switch case builds the sparse MLP directly; its config's encoder_sparse_step (0) makes no
  // layer of the HF model sparse.
  if (config.value("model_type", "") == "switch_transformers") config["encoder_sparse_step"] = 1;
  {
    std::ofstream out(dir + "/config.json");
    out << config.dump(2);
    if (!out) throw io_error("moe: cannot write " + dir + "/config.json");
  }
  const io::ModelSpec spec = io::parse_model_spec(config.dump(), dir + "/config.json");
  std::string prefix = spec.moe_prefix(0);
  const std::string router = spec.row().router;
  if (!c.has_hf(router)) {
    for (std::size_t dot = router.find('.'); dot != std::string::npos;
         dot = router.find('.', dot + 1)) {
      if (c.has_hf(router.substr(dot + 1))) {
        prefix += router.substr(0, dot + 1);
        break;
      }
    }
  }
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  std::vector<io::TensorToWrite> tensors;
  for (const std::string& name : file.names()) {
    if (name.rfind("hf.", 0) != 0) continue;
    const bool integer = file.info(name).dtype == io::Dtype::I64;
    io::TensorToWrite t =
        integer ? io::make_tensor(prefix + name.substr(3), file.read_matrix<std::int64_t>(name),
                                  io::Dtype::I64)
                : io::make_tensor(prefix + name.substr(3), file.read_matrix<double>(name),
                                  io::Dtype::F64);
    t.shape = file.info(name).shape;
    tensors.push_back(std::move(t));
  }
  io::write_safetensors(dir + "/model.safetensors", tensors);
}

/// Output of the loaded block on the case's input (with its token ids), and the routing left in
/// the workspace as (expert, weight) pairs per token.
template <class T>
RowMatrix<double> run_loaded(const io::AnyMoeBlock<T>& block, const Case& c,
                             std::vector<std::vector<std::pair<std::int64_t, double>>>* routing) {
  const RowMatrix<T> x = c.input().cast<T>();
  RowMatrix<T> y(x.rows(), x.cols());
  Workspace<T> ws;
  const std::vector<std::int64_t> ids = c.input_ids();
  if (!ids.empty()) ws.set_token_ids(ids.data(), static_cast<Index>(ids.size()));
  block.forward(x, y, ws);
  if (routing != nullptr) {
    const auto& r = ws.routing();
    routing->assign(static_cast<std::size_t>(r.num_tokens()), {});
    for (Index t = 0; t < r.num_tokens(); ++t) {
      for (Index j = 0; j < r.slots(); ++j) {
        if (!r.kept()(t, j)) continue;
        (*routing)[static_cast<std::size_t>(t)].emplace_back(
            r.experts()(t, j), static_cast<double>(r.weights()(t, j)));
      }
    }
  }
  return y.template cast<double>();
}

/// max |got - ref| and max |got - ref| / (1 + |ref|) per element; a failure when the latter
/// exceeds tol.
inline void compare_elementwise(Report& report, const std::string& what,
                                const RowMatrix<double>& got, const RowMatrix<double>& ref,
                                double tol) {
  if (got.rows() != ref.rows() || got.cols() != ref.cols()) {
    report.failures.push_back(what + ": shape mismatch");
    return;
  }
  double max_abs = 0, max_rel = 0;
  for (Index i = 0; i < got.size(); ++i) {
    const double err = std::abs(got.data()[i] - ref.data()[i]);
    max_abs = std::max(max_abs, err);
    max_rel = std::max(max_rel, err / (1 + std::abs(ref.data()[i])));
  }
  if (what == "output") {
    report.max_abs = max_abs;
    report.max_rel = max_rel;
  } else {
    report.extra.emplace_back(what + "_rel", max_rel);
  }
  if (!(max_rel <= tol)) {
    report.failures.push_back(
        moe::detail::concat(what, ": max error / (1 + |ref|) = ", max_rel, " exceeds ", tol));
  }
}

/// HF's routing as (expert, weight) sets per token compared with ours.
inline void compare_routing(Report& report, const Case& c,
                            std::vector<std::vector<std::pair<std::int64_t, double>>> ours) {
  const RowMatrix<std::int64_t> idx = c.topk_idx();
  const RowMatrix<double> w = c.topk_weight();
  if (static_cast<Index>(ours.size()) != idx.rows()) {
    report.failures.push_back("routing: token count differs");
    return;
  }
  double max_err = 0;
  Index mismatched = 0;
  for (Index t = 0; t < idx.rows(); ++t) {
    std::vector<std::pair<std::int64_t, double>> hf;
    for (Index j = 0; j < idx.cols(); ++j) {
      if (idx(t, j) >= 0) hf.emplace_back(idx(t, j), w(t, j));
    }
    auto& mine = ours[static_cast<std::size_t>(t)];
    std::sort(hf.begin(), hf.end());
    std::sort(mine.begin(), mine.end());
    bool same = hf.size() == mine.size();
    for (std::size_t j = 0; same && j < hf.size(); ++j) {
      same = hf[j].first == mine[j].first;
      if (same) {
        const double err = std::abs(hf[j].second - mine[j].second) / (1 + std::abs(hf[j].second));
        max_err = std::max(max_err, err);
        same = err <= 1e-6;
      }
    }
    if (!same) ++mismatched;
  }
  report.extra.emplace_back("routing_w_rel", max_err);
  if (mismatched > 0) {
    report.failures.push_back(moe::detail::concat(
        "routing: ", mismatched, " tokens differ from HF's (expert, weight) sets"));
  }
}

/// Runs a v2 case; false (with skip_reason) when the loader refuses a feature as not supported.
inline bool run_case(const Case& c, const std::string& path, Report& report,
                     std::string& skip_reason) {
  TempDir dir;
  write_case_checkpoint(c, path, dir.str());
  io::LoadOptions o;
  // transformers 5.17's capacity rule never drops (FORMAT.md 5.6); the _capacity case patches
  // HF to drop beyond expert_capacity, as the library's capacity gating does.
  o.switch_dropless = c.case_name().find("capacity") == std::string::npos;
  std::vector<std::vector<std::pair<std::int64_t, double>>> routing;
  RowMatrix<double> y;
  try {
    const io::ModelCheckpoint m = io::ModelCheckpoint::open(dir.str());
    const auto block = io::load_any_moe_layer<double>(m, 0, o);
    y = run_loaded(block, c, &routing);
    const auto block_f = io::load_any_moe_layer<float>(m, 0, o);
    const RowMatrix<double> y_f = run_loaded(block_f, c, nullptr);
    compare_elementwise(report, "output", y, c.output(), 1e-6);
    compare_elementwise(report, "float_output", y_f, c.output(), 1e-5);
  } catch (const config_error& e) {
    const std::string what = e.what();
    if (what.find("is not supported") != std::string::npos) {
      skip_reason = what;
      return false;
    }
    throw;
  }
  compare_routing(report, c, routing);
  return true;
}

}  // namespace moe::golden::v2
