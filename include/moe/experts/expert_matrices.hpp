// moe: the per-expert matrices of a compact stack (gate, up and down of every expert) with their
// sizes, accessors and optional fp32 biases: what CompactExpertStack and QuantExpertStack share.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::detail {

/// gate(e) [d_ff x d_model], when gated up(e) [d_ff x d_model], and w_out(e) [d_model x d_ff] of
/// num_experts experts, each a Matrix (CompactMatrix<Format> or QuantMatrix<Format>); the stacks
/// derive from it and add how matrices are set (checks, views, repacking).
template <class Matrix>
class ExpertMatrices {
 public:
  Index num_experts() const { return num_experts_; }
  Index d_model() const { return d_model_; }
  Index d_ff() const { return d_ff_; }
  bool gated() const { return gated_; }
  /// Rows of the input projections together: 2 d_ff gated, d_ff plain.
  Index in_rows() const { return gated_ ? 2 * d_ff_ : d_ff_; }

  /// [d_ff x d_model] gate (or, for a plain FFN, the only) input projection of expert e.
  const Matrix& gate(Index e) const { return gate_[std::size_t(e)]; }
  /// [d_ff x d_model] up projection of expert e (gated only).
  const Matrix& up(Index e) const {
    MOE_ASSERT(gated_);
    return up_[std::size_t(e)];
  }
  /// [d_model x d_ff] output projection of expert e.
  const Matrix& w_out(Index e) const { return down_[std::size_t(e)]; }

  /// Bytes of codes and scales of all experts (owned or viewed), plus the fp32 biases.
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const auto& m : gate_) b += m.bytes();
    for (const auto& m : up_) b += m.bytes();
    for (const auto& m : down_) b += m.bytes();
    return b + std::size_t(in_bias_.size() + out_bias_.size()) * sizeof(float);
  }

  /// Expert biases in fp32 (gpt-oss, JetMoE), with ExpertStack's meaning and layout: in_bias(e)
  /// [in_rows] is added to the input projection's output (gate entries first, then up),
  /// out_bias(e) [d_model] to the expert's output. Zero-initialised here; fill them through
  /// in_biases() / out_biases(), or set both with set_biases.
  void add_biases() {
    in_bias_ = RowMatrix<float>::Zero(num_experts_, in_rows());
    out_bias_ = RowMatrix<float>::Zero(num_experts_, d_model_);
  }
  /// Sets the biases from in [num_experts x in_rows] and out [num_experts x d_model]. Throws
  /// shape_error naming the tensor and both shapes.
  void set_biases(RowMatrix<float> in, RowMatrix<float> out) {
    check_shape("expert input biases", in.rows(), in.cols(), num_experts_, in_rows());
    check_shape("expert output biases", out.rows(), out.cols(), num_experts_, d_model_);
    in_bias_ = std::move(in);
    out_bias_ = std::move(out);
  }
  bool has_biases() const { return in_bias_.size() != 0 || out_bias_.size() != 0; }
  /// [E x in_rows] and [E x d_model] biases (empty without add_biases() / set_biases()).
  RowMatrix<float>& in_biases() { return in_bias_; }
  RowMatrix<float>& out_biases() { return out_bias_; }
  const RowMatrix<float>& in_biases() const { return in_bias_; }
  const RowMatrix<float>& out_biases() const { return out_bias_; }
  /// Expert e's input bias [in_rows] / output bias [d_model], or nullptr without biases.
  const float* in_bias(Index e) const {
    return in_bias_.size() ? in_bias_.data() + e * in_rows() : nullptr;
  }
  const float* out_bias(Index e) const {
    return out_bias_.size() ? out_bias_.data() + e * d_model_ : nullptr;
  }

 protected:
  ExpertMatrices() = default;
  /// Empty matrices for num_experts experts. Throws config_error on negative sizes, naming
  /// `stack` (the derived class).
  ExpertMatrices(const char* stack, Index num_experts, Index d_model, Index d_ff, bool gated)
      : num_experts_(num_experts), d_model_(d_model), d_ff_(d_ff), gated_(gated) {
    if (num_experts < 0 || d_model < 0 || d_ff < 0) {
      throw config_error(concat("moe: ", stack, " sizes must be >= 0, got num_experts = ",
                                num_experts, ", d_model = ", d_model, ", d_ff = ", d_ff));
    }
    gate_.resize(std::size_t(num_experts));
    up_.resize(gated ? std::size_t(num_experts) : 0);
    down_.resize(std::size_t(num_experts));
  }

  /// The biases of an fp32 stack (ExpertStack<float>), if it has them: what from() keeps.
  template <class FloatStack>
  void copy_biases(const FloatStack& w) {
    if (w.has_biases()) set_biases(w.in_biases(), w.out_biases());
  }

  /// Before setting expert e's matrices through set_gated (gated_call) or set_plain: throws
  /// config_error when e is out of range or the call does not match the stack's kind.
  void check_set(Index e, bool gated_call) const {
    if (e < 0 || e >= num_experts_) {
      throw config_error(concat("moe: expert index ", e, " out of range [0, ", num_experts_, ")"));
    }
    if (gated_call && !gated_) {
      throw config_error("moe: set_gated called on a plain (non-gated) expert stack");
    }
    if (!gated_call && gated_) throw config_error("moe: set_plain called on a gated expert stack");
  }

  Index num_experts_ = 0, d_model_ = 0, d_ff_ = 0;
  bool gated_ = true;
  std::vector<Matrix> gate_, up_, down_;
  RowMatrix<float> in_bias_, out_bias_;  // empty unless add_biases() / set_biases()
};

}  // namespace moe::detail
