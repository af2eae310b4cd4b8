// moe: what gemm_packed_nt does with a finished accumulator block: store it, scale its rows (the
// routing weight of the down product), or turn gate/up pairs into activations (SwiGLU fused into
// the gate/up product, so the [n x 2 d_ff] hidden matrix is never written to memory).
//
// Every epilogue is called as epilogue(acc, ld_acc, r0, rows, j0, cols) with acc holding rows
// [r0, r0 + rows) and packed columns [j0, j0 + cols) of the product (j0 a multiple of
// GemmPackedShape<T>::granule; of gated_granule for the gated epilogues), and writes only the output elements of those rows and columns:
// tasks on disjoint column ranges write disjoint outputs.
#pragma once

#include <algorithm>

#include <Eigen/Core>

#include "moe/kernels/gemm_packed.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// out[r, j] = acc[r, j]: the plain product. out row-major, row stride ldo >= the product's
/// columns.
template <class T>
struct StoreEpilogue {
  T* out = nullptr;
  Index ldo = 0;
  void operator()(const T* acc, Index ld_acc, Index r0, Index rows, Index j0, Index cols) const {
    for (Index r = 0; r < rows; ++r) {
      std::copy(acc + r * ld_acc, acc + r * ld_acc + cols, out + (r0 + r) * ldo + j0);
    }
  }
};

/// out[r, j] = row_scale[r] * acc[r, j]: the down product with each row's routing weight folded
/// in (one rounding, as in a separate scaling pass: the combine then only adds).
template <class T>
struct ScaleRowsEpilogue {
  T* out = nullptr;
  Index ldo = 0;
  const T* row_scale = nullptr;
  void operator()(const T* acc, Index ld_acc, Index r0, Index rows, Index j0, Index cols) const {
    for (Index r = 0; r < rows; ++r) {
      const T s = row_scale[r0 + r];
      const T* a = acc + r * ld_acc;
      T* o = out + (r0 + r) * ldo + j0;
      for (Index j = 0; j < cols; ++j) o[j] = s * a[j];
    }
  }
};

/// out[r, a] = Activation::value(acc[r, a]): a plain (non-gated) FFN's input product.
template <class T, class Activation>
struct ActivationEpilogue {
  T* out = nullptr;
  Index ldo = 0;
  void operator()(const T* acc, Index ld_acc, Index r0, Index rows, Index j0, Index cols) const {
    for (Index r = 0; r < rows; ++r) {
      const T* a = acc + r * ld_acc;
      T* o = out + (r0 + r) * ldo + j0;
      for (Index j = 0; j < cols; ++j) o[j] = Activation::value(a[j]);
    }
  }
};

namespace detail {

// Calls f(act_col, gate_ptr, up_ptr, count) for each gate/up group of a block of packed columns
// [j0, j0 + cols) (j0 a multiple of 2 G): count activation columns from act_col, clipped to d_ff.
template <class T, class F>
void for_each_pair_group(const T* acc_row, Index j0, Index cols, Index d_ff, const F& f) {
  constexpr Index g = GemmPackedShape<T>::pair_group;
  for (Index j = 0; j < cols; j += 2 * g) {
    const Index act = (j0 + j) / 2;
    if (act >= d_ff) break;
    f(act, acc_row + j, acc_row + j + g, std::min(g, d_ff - act));
  }
}

}  // namespace detail

/// out[r, a] = Activation::value(gate[r, a]) * up[r, a] from a gated pair packed by
/// pack_gated_nt: the packed block [j0, j0 + cols) gives activation columns [j0 / 2, (j0 + cols)
/// / 2) (clipped to d_ff). out row-major [n x d_ff], row stride ldo. Element by element with
/// Activation::value (GeGLU and the other gated variants); SwiGLU has its vector form below.
template <class T, class Activation>
struct GatedEpilogue {
  T* out = nullptr;
  Index ldo = 0;
  Index d_ff = 0;
  void operator()(const T* acc, Index ld_acc, Index r0, Index rows, Index j0, Index cols) const {
    for (Index r = 0; r < rows; ++r) {
      T* o = out + (r0 + r) * ldo;
      detail::for_each_pair_group(acc + r * ld_acc, j0, cols, d_ff,
                                  [&](Index a, const T* gate, const T* up, Index count) {
                                    for (Index i = 0; i < count; ++i) {
                                      o[a + i] = Activation::value(gate[i]) * up[i];
                                    }
                                  });
    }
  }
};

/// GatedEpilogue for SiLU, vectorised: g / (1 + exp(-g)) * u with Eigen's packet exp, the same
/// packet formula as the unfused activation pass (moe::detail::apply_activation_cols), so a fused
/// and an unfused forward give the same activations from the same products. Every element goes
/// through full packets (a group is a whole number of packets; padding columns are zero), so an
/// element's result does not depend on its position.
template <class T>
struct SwiGluEpilogue {
  T* out = nullptr;
  Index ldo = 0;
  Index d_ff = 0;
  void operator()(const T* acc, Index ld_acc, Index r0, Index rows, Index j0, Index cols) const {
    using Packet = typename Eigen::internal::packet_traits<T>::type;
    constexpr Index lanes = Eigen::internal::packet_traits<T>::size;
    constexpr Index g = GemmPackedShape<T>::pair_group;
    static_assert(g % lanes == 0, "a gate/up group must be a whole number of packets");
    using namespace Eigen::internal;
    const Packet one = pset1<Packet>(T(1));
    for (Index r = 0; r < rows; ++r) {
      T* o = out + (r0 + r) * ldo;
      detail::for_each_pair_group(
          acc + r * ld_acc, j0, cols, d_ff, [&](Index a, const T* gate, const T* up, Index count) {
            for (Index i = 0; i < g; i += lanes) {
              const Packet gv = ploadu<Packet>(gate + i);
              const Packet v = pmul(pdiv(gv, padd(one, pexp(pnegate(gv)))), ploadu<Packet>(up + i));
              if (i + lanes <= count) {
                pstoreu(o + a + i, v);
              } else if (i < count) {
                T tail[lanes];
                pstoreu(tail, v);
                std::copy(tail, tail + (count - i), o + a + i);
              }
            }
          });
    }
  }
};

}  // namespace moe::kernels
