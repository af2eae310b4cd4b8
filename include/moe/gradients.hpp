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
/// (DeepSeek-V3 e_score_correction_bias) has no gradient: it is trained by aux_free_bias_update().
template <class T>
struct MoeGradients {
  RowMatrix<T> router;        ///< [E x d_model]
  RowMatrix<T> router_noise;  ///< [E x d_model] (noisy top-k), or empty
  ExpertStack<T> experts;     ///< like MoeWeights::experts
  ExpertStack<T> shared;      ///< like MoeWeights::shared, or empty
  RowMatrix<T> shared_gate;   ///< [1 x d_model], or empty

  /// Zero gradients shaped like `w`.
  static MoeGradients zeros_like(const MoeWeights<T>& w) {
    MoeGradients g;
    g.router = RowMatrix<T>::Zero(w.router.rows(), w.router.cols());
    g.router_noise = RowMatrix<T>::Zero(w.router_noise.rows(), w.router_noise.cols());
    g.experts = ExpertStack<T>(w.experts.num_experts(), w.experts.d_model(), w.experts.d_ff(),
                               w.experts.gated());
    g.shared = ExpertStack<T>(w.shared.num_experts(), w.shared.d_model(), w.shared.d_ff(),
                              w.shared.gated());
    g.shared_gate = RowMatrix<T>::Zero(w.shared_gate.rows(), w.shared_gate.cols());
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
  }

  /// Largest absolute entry over all tensors (for clipping and tests).
  T max_abs() const {
    T m = 0;
    auto upd = [&m](const RowMatrix<T>& a) {
      if (a.size()) m = std::max(m, a.cwiseAbs().maxCoeff());
    };
    upd(router);
    upd(router_noise);
    upd(experts.stacked_in());
    upd(experts.stacked_out());
    upd(shared.stacked_in());
    upd(shared.stacked_out());
    upd(shared_gate);
    return m;
  }
};

}  // namespace moe
