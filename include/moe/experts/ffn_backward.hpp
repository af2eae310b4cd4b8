// moe: the backward of one FFN expert on a block of rows, shared by the routed experts and the
// shared expert of block_backward (moe/backward.hpp): the matrix products, the activation's
// derivative (the plain GLU and every GluOptions form: gpt-oss, DeepSeek-V4, Step-3.x clamps) and
// the gradients of the projections' biases.
#pragma once

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include "moe/activations.hpp"
#include "moe/config.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/kernels/row_products.hpp"
#include "moe/tensor.hpp"

namespace moe::detail {

/// d act / d gate and d act / d up of one element of the clamped GLU of GluOptions o, from the
/// pre-activations g (gate) and u (up) the forward kept, with HF's formula
///   u' = clamp(u, -L, L) + up_offset;  a = act_alpha(min(g, L)) * u'  or  min(act(g), L) * u'.
/// A clamp passes the gradient where its input is inside [lo, hi], bounds included, as
/// torch.clamp's autograd does (the kink itself has measure zero); act_alpha(x) = x sigmoid(alpha
/// x), whose derivative is s + alpha x s (1 - s) with s = sigmoid(alpha x) (Silu experts only:
/// the block refuses alpha != 1 otherwise).
template <class Activation, class T>
inline void clamped_glu_derivatives(T g, T u, const GluOptions& o, T& dgate, T& dup) {
  const T limit = static_cast<T>(o.limit);
  const bool up_passes = u >= -limit && u <= limit;
  const T uc = (u < -limit ? -limit : (u > limit ? limit : u)) + static_cast<T>(o.up_offset);
  T a = 0, da = 0;
  if (o.clamp_after_activation) {
    a = Activation::value(g);
    da = a <= limit ? Activation::derivative(g) : T(0);
    if (a > limit) a = limit;
  } else {
    const bool gate_passes = g <= limit;
    const T gc = gate_passes ? g : limit;
    if (o.alpha == 1.0) {
      a = Activation::value(gc);
      da = Activation::derivative(gc);
    } else {
      const T alpha = static_cast<T>(o.alpha);
      const T s = T(1) / (T(1) + std::exp(-alpha * gc));
      a = gc * s;
      da = s + alpha * gc * s * (T(1) - s);
    }
    if (!gate_passes) da = T(0);
  }
  dgate = da * uc;
  dup = up_passes ? a : T(0);
}

/// The bias gradients one FFN adds into (each [in] / [d_model], or nullptr without biases).
template <class T>
struct FfnBiasGrads {
  T* in = nullptr;
  T* out = nullptr;
};

/// Backward of one FFN on n rows, given dY [n x D] in d_rows:
///   dA = dY W_out; dW_out += dY^T A; gated: dG = dA * u' * a'(g), dU = dA * a(g) (the clamped
///   forms through clamped_glu_derivatives), plain: dH = dA * act'(H); dW_in += dH^T X;
///   d_in_bias += sum of dH rows, d_out_bias += sum of dY rows; dX = dH W_in (over dY).
/// x rows have stride ld_x; h [n x in] the kept pre-activations (input bias included); act rows
/// stride ld_act (the activations the output projection read); dh [n x in] scratch, contiguous;
/// d_rows [n x D]. Cost: 3 products of n x in x D (2 of them with W_out's n x D x F).
/// row_invariant: dA and dX row by row (kernels::rows_times_matrix), so a row's input gradient
/// does not depend on the other rows (Eigen's GEMM rounds by position; used for the shared
/// expert on small batches so that a slice of the batch gives the same bits, moe/distributed).
template <class Ffn, class T>
inline void ffn_backward_rows(ConstMap<T> w_in, ConstMap<T> w_out, MutMap<T> gw_in,
                              MutMap<T> gw_out, const T* x, Index ld_x, const T* h, const T* act,
                              Index ld_act, Index n, T* dh, T* d_rows, const GluOptions& glu = {},
                              FfnBiasGrads<T> bias_grads = {}, bool row_invariant = false) {
  if (n == 0) return;
  using A = typename Ffn::activation;
  const Index d = w_in.cols(), f = w_out.cols(), in = w_in.rows();
  using Strided = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
  using StridedMut = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
  MutMap<T> dy(d_rows, n, d);
  Strided am(act, n, f, Eigen::OuterStride<>(ld_act));
  Strided xm(x, n, d, Eigen::OuterStride<>(ld_x));
  // dA goes where it is consumed: the up columns (gated) or dH itself (plain).
  StridedMut da(dh + (Ffn::gated ? f : 0), n, f, Eigen::OuterStride<>(in));
  // Eigen computes tiny products (rows + cols + depth below EIGEN_GEMM_TO_COEFFBASED_THRESHOLD)
  // coefficient-wise straight into the destination, vectorised from its first aligned element:
  // results then round by where the destination sits in memory (seen: d_model 7, d_ff 5, one row;
  // an expert-parallel rank stacks its rows and gradients elsewhere). Through a fresh temporary
  // only the values count.
  const bool tiny = n + d + std::max(f, in) < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD;
  if (row_invariant) {
    kernels::rows_times_matrix(d_rows, n, d, d, w_out.data(), f, f, da.data(), in);
  } else if (tiny) {
    da = (dy * w_out).eval();
  } else {
    da.noalias() = dy * w_out;
  }
  if (tiny) {
    gw_out += (dy.transpose() * am).eval();
  } else {
    gw_out.noalias() += dy.transpose() * am;
  }
  if (bias_grads.out != nullptr) {
    Eigen::Map<RowMatrix<T>>(bias_grads.out, 1, d) += dy.colwise().sum();
  }
  const bool plain_glu = glu.plain();
  for (Index r = 0; r < n; ++r) {
    T* dr = dh + r * in;
    const T* hr = h + r * in;
    if constexpr (Ffn::gated) {
      if (plain_glu) {
        for (Index i = 0; i < f; ++i) {
          const T dai = dr[f + i], gi = hr[i];
          dr[i] = dai * hr[f + i] * A::derivative(gi);
          dr[f + i] = dai * A::value(gi);
        }
      } else {
        for (Index i = 0; i < f; ++i) {
          T dgate, dup;
          clamped_glu_derivatives<A>(hr[i], hr[f + i], glu, dgate, dup);
          const T dai = dr[f + i];
          dr[i] = dai * dgate;
          dr[f + i] = dai * dup;
        }
      }
    } else {
      for (Index i = 0; i < f; ++i) dr[i] *= A::derivative(hr[i]);
    }
  }
  ConstMap<T> dhm(dh, n, in);
  if (bias_grads.in != nullptr) {
    Eigen::Map<RowMatrix<T>>(bias_grads.in, 1, in) += dhm.colwise().sum();
  }
  if (tiny) {
    gw_in += (dhm.transpose() * xm).eval();
  } else {
    gw_in.noalias() += dhm.transpose() * xm;
  }
  if (row_invariant) {
    kernels::rows_times_matrix(dh, n, in, in, w_in.data(), d, d, d_rows, d);
  } else if (tiny) {
    dy = (dhm * w_in).eval();
  } else {
    dy.noalias() = dhm * w_in;
  }
}

/// Where the FFN backward of expert e of a gradient stack adds its bias gradients (none without
/// biases).
template <class T>
FfnBiasGrads<T> bias_grads(ExpertStack<T>& g, Index e) {
  if (!g.has_biases()) return {};
  return {g.in_biases().data() + e * g.in_rows(), g.out_biases().data() + e * g.d_model()};
}

}  // namespace moe::detail
