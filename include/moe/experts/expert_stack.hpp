// moe: the fp32 (or double) weights of the FFN experts of one layer, stacked.
#pragma once

#include <cstddef>
#include <string>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// The weights of `num_experts` FFN experts of one layer, stacked like ggml / transformers v5.
///
/// Per expert e, in checkpoint (nn.Linear [out x in]) orientation:
///   input projection  w_in(e):  [in_rows x d_model], in_rows = 2 d_ff when gated, gate rows
///                                first then up rows (HF v5 gate_up_proj[e]); d_ff when plain (wi);
///   output projection w_out(e): [d_model x d_ff] (down_proj / w2 / wo).
/// Fusing gate and up lets one product per expert compute both. Owned, contiguous storage.
template <class T>
class ExpertStack {
 public:
  ExpertStack() = default;
  /// Zero-initialised weights. Throws config_error on negative sizes.
  ExpertStack(Index num_experts, Index d_model, Index d_ff, bool gated)
      : num_experts_(num_experts), d_model_(d_model), d_ff_(d_ff), gated_(gated) {
    if (num_experts < 0 || d_model < 0 || d_ff < 0) {
      throw config_error(detail::concat("moe: ExpertStack sizes must be >= 0, got num_experts = ",
                                        num_experts, ", d_model = ", d_model, ", d_ff = ", d_ff));
    }
    w_in_ = RowMatrix<T>::Zero(num_experts * in_rows(), d_model);
    w_out_ = RowMatrix<T>::Zero(num_experts * d_model, d_ff);
  }

  Index num_experts() const { return num_experts_; }
  Index d_model() const { return d_model_; }
  Index d_ff() const { return d_ff_; }
  bool gated() const { return gated_; }
  bool empty() const { return num_experts_ == 0; }
  /// Rows of one expert's input projection: 2 d_ff (gate + up) or d_ff.
  Index in_rows() const { return gated_ ? 2 * d_ff_ : d_ff_; }

  /// [in_rows x d_model] fused input projection of expert e.
  ConstMap<T> w_in(Index e) const {
    return {w_in_.data() + e * in_rows() * d_model_, in_rows(), d_model_};
  }
  MutMap<T> w_in(Index e) { return {w_in_.data() + e * in_rows() * d_model_, in_rows(), d_model_}; }
  /// [d_model x d_ff] output projection of expert e.
  ConstMap<T> w_out(Index e) const {
    return {w_out_.data() + e * d_model_ * d_ff_, d_model_, d_ff_};
  }
  MutMap<T> w_out(Index e) { return {w_out_.data() + e * d_model_ * d_ff_, d_model_, d_ff_}; }
  /// [d_ff x d_model] gate (or, for a plain FFN, the only) input projection of expert e.
  MutMap<T> gate(Index e) { return {w_in_.data() + e * in_rows() * d_model_, d_ff_, d_model_}; }
  ConstMap<T> gate(Index e) const {
    return {w_in_.data() + e * in_rows() * d_model_, d_ff_, d_model_};
  }
  /// [d_ff x d_model] up projection of expert e (gated only).
  MutMap<T> up(Index e) {
    MOE_ASSERT(gated_);
    return {w_in_.data() + (e * in_rows() + d_ff_) * d_model_, d_ff_, d_model_};
  }
  ConstMap<T> up(Index e) const {
    MOE_ASSERT(gated_);
    return {w_in_.data() + (e * in_rows() + d_ff_) * d_model_, d_ff_, d_model_};
  }

  /// Copies a gated expert's weights in checkpoint orientation (gate, up [d_ff x d_model],
  /// down [d_model x d_ff]). Throws shape_error naming the tensor and both shapes.
  void set_gated(Index e, const MatrixRef<T>& gate_w, const MatrixRef<T>& up_w,
                 const MatrixRef<T>& down_w) {
    check_expert(e);
    if (!gated_) throw config_error("moe: set_gated called on a plain (non-gated) expert stack");
    detail::check_shape(name("gate", e).c_str(), gate_w.rows(), gate_w.cols(), d_ff_, d_model_);
    detail::check_shape(name("up", e).c_str(), up_w.rows(), up_w.cols(), d_ff_, d_model_);
    detail::check_shape(name("down", e).c_str(), down_w.rows(), down_w.cols(), d_model_, d_ff_);
    gate(e) = gate_w;
    up(e) = up_w;
    w_out(e) = down_w;
  }
  /// Copies a plain expert's weights (wi [d_ff x d_model], wo [d_model x d_ff]).
  void set_plain(Index e, const MatrixRef<T>& wi, const MatrixRef<T>& wo) {
    check_expert(e);
    if (gated_) throw config_error("moe: set_plain called on a gated expert stack");
    detail::check_shape(name("wi", e).c_str(), wi.rows(), wi.cols(), d_ff_, d_model_);
    detail::check_shape(name("wo", e).c_str(), wo.rows(), wo.cols(), d_model_, d_ff_);
    gate(e) = wi;
    w_out(e) = wo;
  }

  /// The whole stacked input projection [E * in_rows x d_model] and output projection
  /// [E * d_model x d_ff] (for loaders and optimisers that treat the layer as one tensor).
  RowMatrix<T>& stacked_in() { return w_in_; }
  RowMatrix<T>& stacked_out() { return w_out_; }
  const RowMatrix<T>& stacked_in() const { return w_in_; }
  const RowMatrix<T>& stacked_out() const { return w_out_; }

  /// Adds zero biases to both projections (gpt-oss, JetMoE experts): in_bias(e) [in_rows] is
  /// added to the input projection's output (gate entries first, as the rows of w_in), out_bias(e)
  /// [d_model] to the expert's output. Fill them through in_biases() / out_biases().
  void add_biases() {
    in_bias_ = RowMatrix<T>::Zero(num_experts_, in_rows());
    out_bias_ = RowMatrix<T>::Zero(num_experts_, d_model_);
  }
  bool has_biases() const { return in_bias_.size() != 0 || out_bias_.size() != 0; }
  /// [E x in_rows] and [E x d_model] biases (empty without add_biases()).
  RowMatrix<T>& in_biases() { return in_bias_; }
  RowMatrix<T>& out_biases() { return out_bias_; }
  const RowMatrix<T>& in_biases() const { return in_bias_; }
  const RowMatrix<T>& out_biases() const { return out_bias_; }
  /// Expert e's input bias [in_rows] / output bias [d_model], or nullptr without biases.
  const T* in_bias(Index e) const {
    return in_bias_.size() ? in_bias_.data() + e * in_rows() : nullptr;
  }
  const T* out_bias(Index e) const {
    return out_bias_.size() ? out_bias_.data() + e * d_model_ : nullptr;
  }

  std::size_t bytes() const {
    return static_cast<std::size_t>(w_in_.size() + w_out_.size() + in_bias_.size() +
                                    out_bias_.size()) *
           sizeof(T);
  }

 private:
  void check_expert(Index e) const {
    if (e < 0 || e >= num_experts_) {
      throw config_error(
          detail::concat("moe: expert index ", e, " out of range [0, ", num_experts_, ")"));
    }
  }
  static std::string name(const char* what, Index e) {
    return detail::concat("expert ", e, ' ', what, " weight");
  }

  Index num_experts_ = 0, d_model_ = 0, d_ff_ = 0;
  bool gated_ = true;
  RowMatrix<T> w_in_, w_out_;
  RowMatrix<T> in_bias_, out_bias_;  // empty unless add_biases()
};

}  // namespace moe
