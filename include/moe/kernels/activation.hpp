// moe: the FFN's activation on a block of columns of the hidden rows: h [n x in] -> a [n x d_ff].
// Gated (GLU): a = act(gate) * up, the gate in h's columns [0, d_ff), up in [d_ff, 2 d_ff).
// Plain: a = act(h). The activation is a type with a static value(x) (moe/activations.hpp).
#pragma once

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include "moe/tensor.hpp"

namespace moe::kernels {

/// act[:, a:b] = Activation::value(h[:, a:b]) (* h[:, d_ff + a : d_ff + b] when Gated), element
/// by element. h row stride ld_h, act row stride ld_act; act may alias h's gate columns (each
/// element is read before it is written).
template <class Activation, bool Gated, class T>
inline void activation_cols(const T* h, Index ld_h, Index n, Index d_ff, Index a, Index b, T* act,
                            Index ld_act) {
  for (Index r = 0; r < n; ++r) {
    const T* hr = h + r * ld_h;
    T* ar = act + r * ld_act;
    if constexpr (Gated) {
      for (Index i = a; i < b; ++i) ar[i] = Activation::value(hr[i]) * hr[d_ff + i];
    } else {
      for (Index i = a; i < b; ++i) ar[i] = Activation::value(hr[i]);
    }
  }
}

/// The clamped GLU (moe::GluOptions) on columns [a, b), same layout and aliasing as
/// activation_cols: u' = clamp(u, -limit, limit) + up_offset, then act(min(g, limit)) * u', or
/// min(act(g), limit) * u' when clamp_after; with alpha != 1 the activation is
/// g * sigmoid(alpha g) (gpt-oss; Silu experts only, the caller checks). Scalar: only the families
/// that clamp pay for it.
template <class Activation, class T>
inline void clamped_glu_cols(const T* h, Index ld_h, Index n, Index d_ff, Index a, Index b, T* act,
                             Index ld_act, T limit, bool clamp_after, T up_offset, T alpha) {
  for (Index r = 0; r < n; ++r) {
    const T* hr = h + r * ld_h;
    T* ar = act + r * ld_act;
    for (Index i = a; i < b; ++i) {
      const T u = std::min(std::max(hr[d_ff + i], -limit), limit) + up_offset;
      T g = hr[i];
      T ag;
      if (clamp_after) {
        ag = std::min(Activation::value(g), limit);
      } else {
        g = std::min(g, limit);
        ag = alpha == T(1) ? Activation::value(g) : g / (T(1) + std::exp(-alpha * g));
      }
      ar[i] = ag * u;
    }
  }
}

/// SwiGLU on columns [a, b): act = silu(gate) * up, with the same layout and aliasing rules as
/// activation_cols. Vectorised with Eigen's packet exp (within an ulp or two of std::exp, and
/// about ten times faster: at 512 tokens the scalar std::exp took ~10% of a Mixtral-quarter
/// forward). Every element goes through the same packet code, the tail through a padded packet:
/// the result of an element depends neither on its address nor on the block split.
template <class T>
inline void swiglu_cols(const T* h, Index ld_h, Index n, Index d_ff, Index a, Index b, T* act,
                        Index ld_act) {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr Index kLanes = Eigen::internal::packet_traits<T>::size;
  const Packet one = Eigen::internal::pset1<Packet>(T(1));
  auto swiglu = [&](const Packet& g, const Packet& u) {
    using namespace Eigen::internal;
    return pmul(pdiv(g, padd(one, pexp(pnegate(g)))), u);
  };
  for (Index r = 0; r < n; ++r) {
    const T* gr = h + r * ld_h;
    const T* ur = gr + d_ff;
    T* ar = act + r * ld_act;
    Index i = a;
    for (; i + kLanes <= b; i += kLanes) {
      Eigen::internal::pstoreu(ar + i, swiglu(Eigen::internal::ploadu<Packet>(gr + i),
                                              Eigen::internal::ploadu<Packet>(ur + i)));
    }
    if (i < b) {
      T g[kLanes] = {}, u[kLanes] = {}, out[kLanes];
      std::copy(gr + i, gr + b, g);
      std::copy(ur + i, ur + b, u);
      Eigen::internal::pstoreu(
          out, swiglu(Eigen::internal::ploadu<Packet>(g), Eigen::internal::ploadu<Packet>(u)));
      std::copy(out, out + (b - i), ar + i);
    }
  }
}

}  // namespace moe::kernels
