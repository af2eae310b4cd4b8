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

/// The factor of the whole output: 1/2 for the averaged shared expert (Cohere2), else 1.
template <class T>
T combine_factor(const MoeConfig& config) {
  return config.shared_combine == SharedCombine::average ? T(0.5) : T(1);
}

/// For every slot (t, j) executed as row r = slot_row[t * slots + j] (-1: not executed):
/// dweights[t, j] = scale dy[t] . y_rows[r] (dL/d routing weight; 0 when not executed) and
/// d_rows[r] = scale weight(t, j) * dy[t] (the expert's output gradient). weights [T x slots];
/// scale: the routed output's factor (routed_output_scale, combine_factor). weighted_input
/// (Llama 4, the weight scaled the expert input): d_rows[r] = scale dy[t] and dweights 0 until
/// weighted_input_gradients.
template <class T, class S, class Weights>
void routing_weight_gradients(const Index* slot_row, const Weights& weights, const MatrixRef<T>& dy,
                              const T* y_rows, S* dweights, T* d_rows, T scale = T(1),
                              bool weighted_input = false) {
  const Index slots = weights.cols(), d = dy.cols();
  for (Index t = 0; t < dy.rows(); ++t) {
    for (Index j = 0; j < slots; ++j) {
      const Index r = slot_row[t * slots + j];
      dweights[t * slots + j] = S(0);
      if (r < 0) continue;
      if (weighted_input) {
        MutMap<T>(d_rows + r * d, 1, d) = scale * dy.row(t);
        continue;
      }
      dweights[t * slots + j] =
          static_cast<S>(scale * dy.row(t).dot(ConstMap<T>(y_rows + r * d, 1, d).row(0)));
      MutMap<T>(d_rows + r * d, 1, d) = (scale * static_cast<T>(weights(t, j))) * dy.row(t);
    }
  }
}

/// Llama 4 (the expert saw w x): dweights[t, j] = x[t] . d_rows[r], d_rows holding the experts'
/// input gradients (after their backward).
template <class T, class S>
void weighted_input_gradients(const Index* slot_row, Index slots, const MatrixRef<T>& x,
                              const T* d_rows, S* dweights) {
  const Index d = x.cols();
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index j = 0; j < slots; ++j) {
      const Index r = slot_row[t * slots + j];
      if (r >= 0) {
        dweights[t * slots + j] =
            static_cast<S>(x.row(t).dot(ConstMap<T>(d_rows + r * d, 1, d).row(0)));
      }
    }
  }
}

/// The router extras between x W^T and the gating: soft-capping (the kept logits are capped,
/// c tanh(z / c), so d/dz = 1 - (capped / c)^2, applied to dlogits) and the logit bias
/// (grads.router_logit_bias += column sums of dlogits). logits, dlogits [T x E].
template <class T, class S, class Logits>
void router_logit_extras_backward(const MoeConfig& config, const Logits& logits, S* dlogits,
                                  MoeGradients<T>& grads) {
  const Index n = logits.rows() * logits.cols(), E = logits.cols();
  if (config.router_logit_softcap > 0) {
    const S c = static_cast<S>(config.router_logit_softcap);
    for (Index i = 0; i < n; ++i) {
      const S u = logits.data()[i] / c;
      dlogits[i] *= S(1) - u * u;
    }
  }
  if (grads.router_logit_bias.size() != 0) {
    for (Index i = 0; i < n; ++i) grads.router_logit_bias[i % E] += static_cast<T>(dlogits[i]);
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
/// rows of d_rows [.. x D]; -1: not executed), each times its slot weight when input_weights
/// [T x slots] is given (Llama 4), then the shared expert's ds_y[t] (null: none) and
/// dgate[t] * shared_gate (dgate null: no gate).
template <class T, class S = T>
void add_expert_input_gradients(const Index* slot_row, Index slots, const T* d_rows,
                                const T* ds_y, const T* dgate, const RowMatrix<T>& shared_gate,
                                MatrixMut<T> dx, const S* input_weights = nullptr) {
  const Index d = dx.cols();
  for (Index t = 0; t < dx.rows(); ++t) {
    auto dxr = dx.row(t);
    for (Index j = 0; j < slots; ++j) {
      const Index r = slot_row[t * slots + j];
      if (r < 0) continue;
      if (input_weights != nullptr) {
        dxr += static_cast<T>(input_weights[t * slots + j]) * ConstMap<T>(d_rows + r * d, 1, d);
      } else {
        dxr += ConstMap<T>(d_rows + r * d, 1, d);
      }
    }
    if (ds_y != nullptr) {
      dxr += ConstMap<T>(ds_y + t * d, 1, d);
      if (dgate != nullptr) dxr += dgate[t] * shared_gate.row(0);
    }
  }
}

}  // namespace moe::detail
