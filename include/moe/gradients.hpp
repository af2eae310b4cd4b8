// moe: the gradient of a loss with respect to every parameter of a sparse MoE block, laid out
// like MoeWeights.
#pragma once

#include <algorithm>

#include "moe/error.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/tensor.hpp"
#include "moe/weights.hpp"

namespace moe {

/// dL/dW for every parameter of one SparseMoeBlock, in the same orientation and storage as
/// MoeWeights (checkpoint [out x in]; experts stacked, gate rows before up rows), so an optimiser
/// walks both side by side (`stacked_in()` / `stacked_out()` are whole tensors).
///
/// Caller-owned; block_backward() ADDS into it (gradient accumulation over micro-batches works by
/// calling it repeatedly). Call set_zero() between optimiser steps. The selection-only router bias
/// (DeepSeek-V3 e_score_correction_bias, MoeWeights::router_bias) has no gradient and no member
/// here: it only chooses experts, and is trained by aux_free_bias_update().
template <class T>
struct MoeGradients {
  RowMatrix<T> router;        ///< [E x d_model]
  RowMatrix<T> router_noise;  ///< [E x d_model] (noisy top-k), or empty
  /// like MoeWeights::experts, with in_biases() / out_biases() when the weights have biases
  /// (gpt-oss, JetMoE)
  ExpertStack<T> experts;
  ExpertStack<T> shared;        ///< like MoeWeights::shared (biases too), or empty
  RowMatrix<T> shared_gate;     ///< [1 x d_model], or empty
  Vector<T> router_logit_bias;  ///< [E] (gpt-oss router.bias), or empty like the weight
  Vector<T> output_bias;        ///< [d_model] (JetMoE), or empty like the weight

  /// Zero gradients shaped like `w`.
  static MoeGradients zeros_like(const MoeWeights<T>& w) {
    MoeGradients g;
    g.router = RowMatrix<T>::Zero(w.router.rows(), w.router.cols());
    g.router_noise = RowMatrix<T>::Zero(w.router_noise.rows(), w.router_noise.cols());
    g.experts = like(w.experts);
    g.shared = like(w.shared);
    g.shared_gate = RowMatrix<T>::Zero(w.shared_gate.rows(), w.shared_gate.cols());
    g.router_logit_bias = Vector<T>::Zero(w.router_logit_bias.size());
    g.output_bias = Vector<T>::Zero(w.output_bias.size());
    return g;
  }

  void set_zero() {
    router.setZero();
    router_noise.setZero();
    experts.stacked_in().setZero();
    experts.stacked_out().setZero();
    shared.stacked_in().setZero();
    shared.stacked_out().setZero();
    shared_gate.setZero();
    experts.in_biases().setZero();
    experts.out_biases().setZero();
    shared.in_biases().setZero();
    shared.out_biases().setZero();
    router_logit_bias.setZero();
    output_bias.setZero();
  }

  /// Throws shape_error unless every tensor has the shape of the matching weight.
  void check_like(const MoeWeights<T>& w) const {
    auto same = [](const char* what, const auto& g, const auto& p) {
      detail::check_shape(what, g.rows(), g.cols(), p.rows(), p.cols());
    };
    same("gradient of the router weight", router, w.router);
    same("gradient of the router noise weight", router_noise, w.router_noise);
    same("gradient of the routed experts' input projections", experts.stacked_in(),
         w.experts.stacked_in());
    same("gradient of the routed experts' output projections", experts.stacked_out(),
         w.experts.stacked_out());
    same("gradient of the shared expert's input projection", shared.stacked_in(),
         w.shared.stacked_in());
    same("gradient of the shared expert's output projection", shared.stacked_out(),
         w.shared.stacked_out());
    same("gradient of the shared expert gate", shared_gate, w.shared_gate);
    same("gradient of the routed experts' input biases", experts.in_biases(),
         w.experts.in_biases());
    same("gradient of the routed experts' output biases", experts.out_biases(),
         w.experts.out_biases());
    same("gradient of the shared expert's input bias", shared.in_biases(), w.shared.in_biases());
    same("gradient of the shared expert's output bias", shared.out_biases(), w.shared.out_biases());
    same("gradient of the router logit bias", router_logit_bias, w.router_logit_bias);
    same("gradient of the output bias", output_bias, w.output_bias);
  }

  /// Largest absolute entry over all tensors (for clipping and tests).
  T max_abs() const {
    T m = 0;
    auto upd = [&m](const auto& a) {
      if (a.size()) m = std::max(m, a.cwiseAbs().maxCoeff());
    };
    upd(router);
    upd(router_noise);
    upd(experts.stacked_in());
    upd(experts.stacked_out());
    upd(shared.stacked_in());
    upd(shared.stacked_out());
    upd(shared_gate);
    upd(experts.in_biases());
    upd(experts.out_biases());
    upd(shared.in_biases());
    upd(shared.out_biases());
    upd(router_logit_bias);
    upd(output_bias);
    return m;
  }

 private:
  // A zero stack shaped like s, with biases when s has them.
  static ExpertStack<T> like(const ExpertStack<T>& s) {
    ExpertStack<T> g(s.num_experts(), s.d_model(), s.d_ff(), s.gated());
    if (s.has_biases()) g.add_biases();
    return g;
  }
};

}  // namespace moe
