// moe: the steps of the MoE backward that act per token on the token's own rows (routing-weight
// gradients, the router's input gradient, the input-gradient combine): shared by block_backward
// (moe/backward.hpp) and the expert-parallel backward (moe/distributed/backward.hpp), which run
// them on a slice of the batch and must give the same bits for the slice's rows.
#pragma once

#include <type_traits>

#include "moe/gradients.hpp"
#include "moe/kernels/row_products.hpp"
#include "moe/tensor.hpp"
#include "moe/weights.hpp"

namespace moe::detail {

/// For every slot (t, j) executed as row r = slot_row[t * slots + j] (-1: not executed):
/// dweights[t, j] = dy[t] . y_rows[r] (dL/d routing weight; 0 when not executed) and
/// d_rows[r] = weight(t, j) * dy[t] (the expert's output gradient). weights [T x slots].
template <class T, class S, class Weights>
void routing_weight_gradients(const Index* slot_row, const Weights& weights, const MatrixRef<T>& dy,
                              const T* y_rows, S* dweights, T* d_rows) {
  const Index slots = weights.cols(), d = dy.cols();
  for (Index t = 0; t < dy.rows(); ++t) {
    for (Index j = 0; j < slots; ++j) {
      const Index r = slot_row[t * slots + j];
      if (r < 0) {
        dweights[t * slots + j] = S(0);
        continue;
      }
      dweights[t * slots + j] =
          static_cast<S>(dy.row(t).dot(ConstMap<T>(y_rows + r * d, 1, d).row(0)));
      MutMap<T>(d_rows + r * d, 1, d) = static_cast<T>(weights(t, j)) * dy.row(t);
    }
  }
}

/// Through the router logits: grads.router += dz^T x, dx = dz W_router (row by row, so a token's
/// row does not depend on the batch), and the shared gate's gradient += dgate^T x (dgate [T], null
/// without a gate). dz [T x E].
template <class T, class S>
void router_input_backward(const MoeWeights<T>& W, MoeGradients<T>& grads, const MatrixRef<T>& x,
                           const S* dz, const T* dgate, MatrixMut<T> dx) {
  const Index num_tokens = x.rows(), E = W.router.rows(), d = W.router.cols();
  ConstMap<S> dzm(dz, num_tokens, E);
  if constexpr (std::is_same_v<S, T>) {
    grads.router.noalias() += dzm.transpose() * x;
  } else {
    grads.router.noalias() += dzm.template cast<T>().transpose() * x;
  }
  kernels::rows_times_matrix(dz, num_tokens, E, E, W.router.data(), d, d, dx.data(),
                             dx.outerStride());
  if (dgate != nullptr) {
    const Eigen::Map<const RowMatrix<T>> dg(dgate, 1, num_tokens);
    grads.shared_gate.noalias() += dg * x;
  }
}

/// dx[t] += the expert input-gradient rows of t's slots in slot order (slot_row [T x slots],
/// rows of d_rows [.. x D]; -1: not executed), then the shared expert's ds_y[t] (null: none) and
/// dgate[t] * shared_gate (dgate null: no gate).
template <class T>
void add_expert_input_gradients(const Index* slot_row, Index slots, const T* d_rows, const T* ds_y,
                                const T* dgate, const RowMatrix<T>& shared_gate, MatrixMut<T> dx) {
  const Index d = dx.cols();
  for (Index t = 0; t < dx.rows(); ++t) {
    auto dxr = dx.row(t);
    for (Index j = 0; j < slots; ++j) {
      const Index r = slot_row[t * slots + j];
      if (r >= 0) dxr += ConstMap<T>(d_rows + r * d, 1, d);
    }
    if (ds_y != nullptr) {
      dxr += ConstMap<T>(ds_y + t * d, 1, d);
      if (dgate != nullptr) dxr += dgate[t] * shared_gate.row(0);
    }
  }
}

}  // namespace moe::detail
