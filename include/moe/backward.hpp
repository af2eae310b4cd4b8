// moe: the backward pass of the sparse MoE block: dL/dx and dL/dW for the router, every routed
// expert, the shared expert and its gate, through the routing weights (softmax, top-k,
// renormalisation, sigmoid, sqrt(softplus), scaling), the family extras (logit bias and cap,
// clamped GLUs, biases, weighted expert inputs) and the auxiliary losses (load balancing, z-loss).
//
// What the forward saves for the backward (Workspace in training mode, ws.set_training(true)),
// with N = executed assignments (T * top_k without drops), I = in_rows (2 d_ff gated, d_ff
// plain), F = d_ff, D = d_model, Is / Fs the shared expert's, elements of T unless noted:
//   routing: logits, scores [T x E], experts, weights, kept [T x k]   (RouteScalar: float or T)
//   gathered inputs x_rows [N x D]        -> dW_in = dH^T X
//   pre-activations hidden [N x I]        -> the activation's derivative
//   activations act [N x F] (training)    -> dW_out = dY^T A
//   expert outputs y_rows [N x D]         -> dL/dw = dy . y_rows (the routing-weight gradient)
//   shared expert: hidden [T x Is], act [T x Fs] (training), output [T x D], gate [T]
// i.e. N (2D + I + F) + T (Is + Fs + D + 1) + 2 T E (+ T k): the activations add N F + T Fs
// to what inference keeps (Workspace's comment has the whole formula).
//
// The backward's own scratch (BackwardWorkspace, grow-only like Workspace):
//   dY rows then dX rows [N x D], dH [N x I] (dA lives in its up columns), dweights [T x k],
//   dlogits [T x E] (+ dnoise [T x E] for noisy top-k), shared: [T x D] + [T x Is] + [T].
// So a training step holds about N (3D + 2I + F) + T (2 Is + Fs + 2D) elements for the block.
//
// Cost: about twice the forward's matrix products (dA = dY W_out, dW_out = dY^T A,
// dW_in = dH^T X, dX = dH W_in, against H = X W_in^T, Y = A W_out^T), plus O(T E k) routing work.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "moe/block.hpp"
#include "moe/detail/backward_steps.hpp"
#include "moe/detail/buffer.hpp"
#include "moe/error.hpp"
#include "moe/experts/ffn_backward.hpp"
#include "moe/gating.hpp"
#include "moe/gradients.hpp"
#include "moe/kernels/row_products.hpp"
#include "moe/losses.hpp"
#include "moe/losses/coefficients.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// Scratch of block_backward, grow-only: after the first call with the largest batch a backward
/// allocates nothing of ours (Eigen's GEMM packing may). One per calling thread.
template <class T>
class BackwardWorkspace {
 public:
  using RouteS = RouteScalar<T>;
  std::size_t bytes() const {
    return d_rows_.bytes() + dh_.bytes() + dweights_.bytes() + dlogits_.bytes() + dnoise_.bytes() +
           aux_.bytes() + ds_y_.bytes() + ds_h_.bytes() + dgate_.bytes();
  }

  detail::GrowBuffer<T> d_rows_;         ///< [N x D] dY rows, then dX rows
  detail::GrowBuffer<T> dh_;             ///< [N x I] dL/d pre-activation
  detail::GrowBuffer<RouteS> dweights_;  ///< [T x slots] dL/d routing weight
  detail::GrowBuffer<RouteS> dlogits_;   ///< [T x E] dL/d router logits
  detail::GrowBuffer<RouteS> dnoise_;    ///< [T x E] dL/d noise logits (noisy top-k)
  detail::GrowBuffer<RouteS> aux_;       ///< [T x E] policy scratch (gates, noise std)
  detail::GrowBuffer<T> ds_y_;           ///< [T x D] shared expert dY, then dX
  detail::GrowBuffer<T> ds_h_;           ///< [T x Is]
  detail::GrowBuffer<T> dgate_;          ///< [T] dL/d shared gate pre-activation
};

namespace detail {

/// The first feature of the block that block_backward has no gradient for, or null
/// (docs/families.md, "Backward"): the Gemma 4 router norm and per-expert scale and norms around
/// the experts, the float32 combine (hy_v3) and the latent projection (Nemotron-H).
template <class T>
const char* undifferentiated_feature(const MoeConfig& config, const MoeWeights<T>& w) {
  if (w.router_input_scale.size() != 0) return "the router input norm";
  if (w.expert_weight_scale.size() != 0) return "a per-expert weight scale";
  if (config.combine_in_float32) return "the float32 shared-expert combine";
  if (config.latent_dim > 0) return "a latent projection";
  if (w.expert_input_norm.size() != 0 || w.expert_output_norm.size() != 0)
    return "norms around the experts";
  return nullptr;
}

/// What a gating's backward reads and writes. dweights [T x slots] is dL/d Routing::weights()
/// (zero on slots that were not executed); dlogits [T x E] receives += dL/dz.
template <class S>
struct GatingBackward {
  const MoeConfig& config;
  const Routing<S>& routing;
  const S* dweights;
  S* dlogits;
  S* dnoise_logits;  ///< [T x E] += dL/d (x W_noise^T), noisy top-k only
  const S* noise;    ///< the forward's Workspace::noise_ (noisy top-k), or null
};

/// Shazeer et al. 2017 importance and load losses of a noisy top-k routing (values into v, and
/// with their coefficients: the importance gradient into dweights (it flows through the gating
/// like the output's), the load gradient into dlogits and dnoise_logits). scratch: 6 T E.
template <class S>
inline void noisy_losses(const gating::NoisyTopK& g, const GatingBackward<S>& a, S* dweights,
                         const LossCoefficients& c, LossValues& v, S* scratch) {
  const Index T = a.routing.num_tokens(), E = a.routing.num_experts(), k = a.routing.slots();
  const auto experts = a.routing.experts();
  const auto weights = a.routing.weights();
  const auto logits = a.routing.logits();
  const Index n = T * E;
  S* gates = scratch;
  S* dgates = scratch + n;
  S* noisy = scratch + 2 * n;
  S* stddev = scratch + 3 * n;
  S* dnoisy = scratch + 4 * n;
  S* dstd = scratch + 5 * n;
  std::fill(scratch, scratch + 6 * n, S(0));
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) gates[t * E + experts(t, j)] = weights(t, j);
  }
  v.importance = losses::shazeer_importance_loss<S>(
      ConstMap<S>(gates, T, E), c.importance != 0 ? dgates : nullptr, c.importance);
  if (c.importance != 0) {
    for (Index t = 0; t < T; ++t) {
      for (Index j = 0; j < k; ++j) dweights[t * k + j] += dgates[t * E + experts(t, j)];
    }
  }
  if (k >= E) return;  // the load estimator needs a k-th largest among the other experts
  const S* nl = a.noise;
  const S* eps = a.noise + n;
  for (Index i = 0; i < n; ++i) {
    stddev[i] = g.noise_stddev(nl[i]);
    noisy[i] = logits.data()[i] + eps[i] * stddev[i];
  }
  losses::ShazeerLoadGrads<S> lg;
  if (c.load != 0) lg = {a.dlogits, dnoisy, dstd};
  v.load = losses::shazeer_load_loss<S>(logits, ConstMap<S>(noisy, T, E), ConstMap<S>(stddev, T, E),
                                        k, lg, c.load);
  if (c.load != 0) {
    for (Index i = 0; i < n; ++i) {
      a.dlogits[i] += dnoisy[i];
      const double sig = kernels::sigmoid(static_cast<double>(nl[i]));
      a.dnoise_logits[i] +=
          static_cast<S>((static_cast<double>(dnoisy[i]) * static_cast<double>(eps[i]) +
                          static_cast<double>(dstd[i])) *
                         sig);
    }
  }
}

/// The shared expert's backward on T tokens (saved forward values s_y [T x D] output, s_gate [T]
/// scale, s_hidden [T x Is], s_act [T x Fs]): adds its weight gradients into grads.shared; writes
/// its input-gradient rows into ds_y [T x D] and dL/d gate pre-activation into dgate [T] (0
/// without Qwen2-MoE's gate). ds_h [T x Is] scratch. row_invariant as ffn_backward_rows.
template <class Ffn, class T>
void shared_expert_backward(const MoeConfig& config, const MoeWeights<T>& W,
                            MoeGradients<T>& grads, const MatrixRef<T>& x, const MatrixRef<T>& dy,
                            const T* s_y, const T* s_gate, const T* s_hidden, const T* s_act,
                            bool row_invariant, T* ds_y, T* ds_h, T* dgate) {
  const Index num_tokens = x.rows(), d = config.d_model;
  const T combine = combine_factor<T>(config);
  for (Index t = 0; t < num_tokens; ++t) {
    const T dg = combine * dy.row(t).dot(ConstMap<T>(s_y + t * d, 1, d).row(0));
    const T g = s_gate[t];
    dgate[t] = config.shared_expert_gate ? dg * g * (T(1) - g) : T(0);
    MutMap<T>(ds_y + t * d, 1, d) = (combine * g) * dy.row(t);
  }
  ffn_backward_rows<Ffn, T>(W.shared.w_in(0), W.shared.w_out(0), grads.shared.w_in(0),
                            grads.shared.w_out(0), x.data(), x.outerStride(), s_hidden, s_act,
                            config.shared_d_ff, num_tokens, ds_h, ds_y, config.shared_glu,
                            bias_grads(grads.shared, 0), row_invariant);
}

}  // namespace detail

/// Backward of SparseMoeBlock::forward for the loss
///   L = <y, dy> + coeffs.aux * L_aux + coeffs.z * L_z (+ Shazeer terms for noisy top-k):
/// ADDS dL/dW into grads (router, router_noise, the router logit bias, every routed expert and
/// its biases, the shared expert, its gate, the output bias) and WRITES dL/dx into dx
/// (overwritten, like forward's y).
///
/// Family features differentiated (issue 12): the router logit bias (gpt-oss) and soft-capping
/// (Laguna); every GluOptions form (gpt-oss, DeepSeek-V4 and Step clamps: zero gradient where a
/// clamp holds); expert and output biases; the weight on the expert input (Llama 4); routed
/// output scale; the averaged shared expert (Cohere2); hash routing (the table lookup has no
/// gradient, the weights do). The selection bias only chooses experts: no gradient. Refused with
/// a config_error naming the feature: see detail::undifferentiated_feature.
///
/// x [T x d_model] must be the input of the forward that filled ws, run with
/// ws.set_training(true) on this block (the workspace keeps pre-activations, activations,
/// gathered inputs and expert outputs; see this header's comment for the memory). dy, dx
/// [T x d_model]. The gradient flows through the routing weights into the logits with the
/// gating's own rule (the policy's backward member, in its gating/ header), and through the
/// logits into the router weight and x. Tokens dropped by capacity get no expert gradient.
///
/// Returns the raw loss values. Deterministic for any executor (fixed summation order).
/// Throws shape_error / config_error before any work when the workspace was not filled in
/// training mode, or shapes (x, dy, dx, grads, routing) disagree with the block.
template <class T, class Gating, class Ffn, class XDerived, class DyDerived>
LossValues block_backward(const SparseMoeBlock<T, Gating, Ffn>& block,
                          const Eigen::DenseBase<XDerived>& x_in,
                          const Eigen::DenseBase<DyDerived>& dy_in, const Workspace<T>& ws,
                          MoeGradients<T>& grads,
                          MatrixMut<typename SparseMoeBlock<T, Gating, Ffn>::Scalar> dx,
                          const LossCoefficients& coeffs, BackwardWorkspace<T>& bws,
                          const Executor& executor = serial_executor()) {
  static_assert(is_row_major_v<XDerived> && is_row_major_v<DyDerived>,
                "moe: x and dy must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
  static_assert(
      std::is_same_v<typename XDerived::Scalar, T> && std::is_same_v<typename DyDerived::Scalar, T>,
      "moe: x / dy have the wrong scalar");
  using S = RouteScalar<T>;
  const MatrixRef<T> x(x_in.derived());
  const MatrixRef<T> dy(dy_in.derived());
  const MoeConfig& config = block.config();
  const MoeWeights<T>& W = block.weights();
  const Index num_tokens = x.rows(), d = config.d_model, E = config.num_experts;

  // ---- validation, before any work -------------------------------------------------------
  if (!ws.training()) {
    throw config_error(
        "moe: block_backward needs a workspace filled by forward() in training mode "
        "(call ws.set_training(true) before forward)");
  }
  detail::check_shape("x", x.rows(), x.cols(), num_tokens, d);
  detail::check_shape("dy", dy.rows(), dy.cols(), num_tokens, d);
  detail::check_shape("dx", dx.rows(), dx.cols(), num_tokens, d);
  const Routing<S>& routing = ws.routing();
  const DispatchPlan& plan = ws.plan();
  const Index slots = block.gating().slots(config);
  if (routing.num_tokens() != num_tokens || routing.num_experts() != E ||
      routing.slots() != slots || plan.num_tokens != num_tokens) {
    throw shape_error(detail::concat(
        "moe: block_backward: the workspace holds the routing of ", routing.num_tokens(),
        " tokens x ", routing.num_experts(), " experts x ", routing.slots(), " slots, expected ",
        num_tokens, " x ", E, " x ", slots, " (run forward on the same x and block first)"));
  }
  grads.check_like(W);
  if (const char* what = detail::undifferentiated_feature(config, W)) {
    throw config_error(detail::concat("moe: block_backward does not differentiate ", what,
                                      " yet (the families that use it run inference only)"));
  }
  if (coeffs.token_mask && coeffs.aux_loss != AuxLoss::load_balancing) {
    throw config_error("moe: LossCoefficients::token_mask applies to AuxLoss::load_balancing only");
  }
  if ((coeffs.importance != 0 || coeffs.load != 0) && !Gating::uses_noise) {
    throw config_error(
        "moe: LossCoefficients::importance and load apply to noisy top-k gating only");
  }
  if (coeffs.load != 0 && config.top_k >= E) {
    throw config_error(
        detail::concat("moe: the Shazeer load loss needs top_k < num_experts, got "
                       "top_k = ",
                       config.top_k, ", num_experts = ", E));
  }
  if (coeffs.aux_loss == AuxLoss::switch_top1 || coeffs.aux_loss == AuxLoss::deepseek_sequence) {
    losses::detail::check_sequences(num_tokens, coeffs.seq_len);
  }
  LossValues values;
  if (num_tokens == 0) return values;

  const ExpertStack<T>& ex = W.experts;
  const Index N = plan.num_rows, in = ex.in_rows(), f = config.d_ff;
  const auto rw = routing.weights();
  // y = (routed_scale * sum_j w_j FFN_j + output_bias + g * shared) * combine, with
  // combine = 1/2 for the averaged shared expert (Cohere2): the upstream gradient of each part.
  const T combine = detail::combine_factor<T>(config);
  const T routed_dy = combine * static_cast<T>(gating::routed_output_scale(block.gating()));
  // Llama 4 weights the expert input instead: y = sum_j FFN_j(w_j x), so dL/dw_j = x . dX_j once
  // the experts' backward has run, and the dY rows carry no weight.
  const bool weighted_input = config.weight_expert_input;

  // ---- dL/d routing weight: dy_t . y_rows[r]; and dY rows = w * dy_t ----------------------
  S* dweights = bws.dweights_.ensure(num_tokens * slots);
  T* d_rows = bws.d_rows_.ensure(N * d);
  T* dh = bws.dh_.ensure(N * in);
  detail::routing_weight_gradients<T, S>(plan.slot_row.data(), rw, dy,
                                         detail::WorkspaceAccess::y_rows(ws).data(), dweights,
                                         d_rows, routed_dy, weighted_input);

  // ---- experts (one task each) and the shared expert (one task) --------------------------
  const bool has_shared = config.shared_d_ff > 0;
  const Index in_s = W.shared.in_rows();
  T* ds_y = has_shared ? bws.ds_y_.ensure(num_tokens * d) : nullptr;
  T* ds_h = has_shared ? bws.ds_h_.ensure(num_tokens * in_s) : nullptr;
  T* dgate = has_shared ? bws.dgate_.ensure(num_tokens) : nullptr;
  executor.run(E + (has_shared ? 1 : 0), [&](Index task, Index) {
    if (task < E) {
      const Index b = plan.offsets[static_cast<std::size_t>(task)];
      const Index n = plan.counts[static_cast<std::size_t>(task)];
      detail::ffn_backward_rows<Ffn, T>(
          ex.w_in(task), ex.w_out(task), grads.experts.w_in(task), grads.experts.w_out(task),
          detail::WorkspaceAccess::x_rows(ws).data() + b * d, d,
          detail::WorkspaceAccess::hidden(ws).data() + b * in,
          detail::WorkspaceAccess::act(ws).data() + b * f, f, n, dh + b * in, d_rows + b * d,
          config.expert_glu, detail::bias_grads(grads.experts, task));
      return;
    }
    detail::shared_expert_backward<Ffn, T>(
        config, W, grads, x, dy, detail::WorkspaceAccess::shared_y(ws).data(),
        detail::WorkspaceAccess::shared_gate(ws).data(),
        detail::WorkspaceAccess::shared_hidden(ws).data(),
        detail::WorkspaceAccess::shared_act(ws).data(), use_stream<T>(num_tokens, d), ds_y, ds_h,
        dgate);
  });
  if (weighted_input) {
    detail::weighted_input_gradients<T, S>(plan.slot_row.data(), slots, x, d_rows, dweights);
  }
  if (grads.output_bias.size() != 0) {
    grads.output_bias += combine * dy.colwise().sum().transpose();
  }

  // ---- routing: weights -> logits, plus the auxiliary losses -----------------------------
  S* dlogits = bws.dlogits_.ensure(num_tokens * E);
  std::fill(dlogits, dlogits + num_tokens * E, S(0));
  S* dnoise = nullptr;
  if constexpr (Gating::uses_noise) {
    dnoise = bws.dnoise_.ensure(num_tokens * E);
    std::fill(dnoise, dnoise + num_tokens * E, S(0));
  }
  const detail::GatingBackward<S> gb{
      config,  routing, dweights,
      dlogits, dnoise,  Gating::uses_noise ? detail::WorkspaceAccess::noise(ws).data() : nullptr};
  if constexpr (Gating::uses_noise) {
    detail::noisy_losses(block.gating(), gb, dweights, coeffs, values,
                         bws.aux_.ensure(6 * num_tokens * E));
  }
  // The gating's own backward lives next to the policy (gating/*.hpp): adding a family never
  // edits this file.
  if constexpr (Gating::uses_noise) {
    block.gating().backward(config, routing, dweights, dlogits, gb.noise, dnoise);
  } else {
    block.gating().backward(config, routing, dweights, dlogits);
  }
  detail::add_routing_losses<S>(config, coeffs, routing.logits(), routing.experts(), dlogits,
                                values);
  detail::router_logit_extras_backward<T, S>(config, routing.logits(), dlogits, grads);

  // ---- parameters and input of the router --------------------------------------------------
  const bool has_gate = has_shared && config.shared_expert_gate;
  detail::router_input_backward<T, S>(W, grads, x, dlogits, has_gate ? dgate : nullptr, dx);
  if constexpr (Gating::uses_noise) {
    const RowMatrix<T> dnt = ConstMap<S>(dnoise, num_tokens, E).template cast<T>();
    grads.router_noise.noalias() += dnt.transpose() * x;
    dx.noalias() += dnt * W.router_noise;
  }

  // ---- dx: expert rows in slot order, then the shared expert and its gate ----------------
  detail::add_expert_input_gradients<T, S>(plan.slot_row.data(), slots, d_rows, ds_y,
                                           has_gate ? dgate : nullptr, W.shared_gate, dx,
                                           weighted_input ? rw.data() : nullptr);
  return values;
}

/// block_backward with a temporary BackwardWorkspace (allocates on every call; keep one per
/// thread in training loops).
template <class T, class Gating, class Ffn, class XDerived, class DyDerived>
LossValues block_backward(const SparseMoeBlock<T, Gating, Ffn>& block,
                          const Eigen::DenseBase<XDerived>& x,
                          const Eigen::DenseBase<DyDerived>& dy, const Workspace<T>& ws,
                          MoeGradients<T>& grads,
                          MatrixMut<typename SparseMoeBlock<T, Gating, Ffn>::Scalar> dx,
                          const LossCoefficients& coeffs = {}) {
  BackwardWorkspace<T> bws;
  return block_backward(block, x, dy, ws, grads, dx, coeffs, bws);
}

}  // namespace moe
