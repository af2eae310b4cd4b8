// moe: what every auxiliary loss shares (losses/balance.hpp, losses/regularizers.hpp): index
// views and the row helpers, and these conventions:
//   * logits z are [T x E] row-major (T tokens in batch-major order, E routed experts), the
//     router's pre-softmax/sigmoid output (Routing::logits()).
//   * Every function returns the raw loss value, before any coefficient, computed in double.
//   * Gradients are optional: pass `dlogits` (null, or [T x E] row-major contiguous storage of
//     the logits' scalar) and the function ADDS coef * dL/dz into it, so several losses and the
//     routing-weight gradient can share one buffer. The selection (top-k, argmax) is piecewise
//     constant, so counts carry no gradient: it flows through the probabilities only, as in the
//     autograd of every reference implementation.
//   * Throws shape_error / config_error on inconsistent arguments, before any work.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Read-only view of a row-major index matrix (Routing::experts() binds without a copy).
using IndexRef = Eigen::Ref<const RowMatrix<std::int32_t>>;

namespace losses {
namespace detail {

inline void check_logit_grad(Index rows, Index cols, const char* what) {
  if (rows < 0 || cols <= 0) {
    throw shape_error(::moe::detail::concat("moe: ", what, " has shape ",
                                            ::moe::detail::shape_str(rows, cols),
                                            ", expected [T x E] with E > 0"));
  }
}

/// p = softmax(z) of one row, in double.
template <class S>
inline void softmax_row(const S* z, Index E, double* p) {
  double m = -std::numeric_limits<double>::infinity();
  for (Index e = 0; e < E; ++e) m = std::max(m, static_cast<double>(z[e]));
  double sum = 0;
  for (Index e = 0; e < E; ++e) {
    p[e] = std::exp(static_cast<double>(z[e]) - m);
    sum += p[e];
  }
  for (Index e = 0; e < E; ++e) p[e] /= sum;
}

/// dz += p * (g - <p, g>): the softmax vector-Jacobian product of one row.
template <class S>
inline void softmax_vjp_add(const double* p, const double* g, Index E, S* dz) {
  double dot = 0;
  for (Index e = 0; e < E; ++e) dot += p[e] * g[e];
  for (Index e = 0; e < E; ++e) dz[e] += static_cast<S>(p[e] * (g[e] - dot));
}

/// Sufficient statistics of the load-balancing loss over a set of rows.
struct BalanceStats {
  std::vector<double> count, prob;  ///< [E] mask-weighted top-k counts and probability sums
  double n = 0;                     ///< sum of the mask

  template <class S>
  void add(const MatrixRef<S>& logits, Index top_k, const double* mask) {
    const Index T = logits.rows(), E = logits.cols();
    count.resize(static_cast<std::size_t>(E), 0.0);
    prob.resize(static_cast<std::size_t>(E), 0.0);
    std::vector<double> p(static_cast<std::size_t>(E));
    std::vector<std::int32_t> idx(static_cast<std::size_t>(top_k));
    for (Index t = 0; t < T; ++t) {
      const double m = mask ? mask[t] : 1.0;
      softmax_row(logits.data() + t * logits.outerStride(), E, p.data());
      kernels::top_k(p.data(), E, top_k, idx.data());
      for (Index j = 0; j < top_k; ++j) count[static_cast<std::size_t>(idx[j])] += m;
      for (Index e = 0; e < E; ++e) prob[static_cast<std::size_t>(e)] += m * p[e];
      n += m;
    }
  }
  double value(Index E, double norm) const {
    if (!(n > 0)) return 0.0;
    double s = 0;
    for (Index e = 0; e < E; ++e) {
      s += count[static_cast<std::size_t>(e)] * prob[static_cast<std::size_t>(e)];
    }
    return static_cast<double>(E) * s / (n * n * norm);
  }
  /// dz += coef * dL/dz for rows whose statistics are these: dL/dp_te = E count_e m_t / (N^2 norm).
  template <class S>
  void backward(const MatrixRef<S>& logits, const double* mask, double norm, double coef,
                S* dz) const {
    if (!(n > 0) || coef == 0) return;
    const Index T = logits.rows(), E = logits.cols();
    std::vector<double> p(static_cast<std::size_t>(E)), g(static_cast<std::size_t>(E));
    const double scale = coef * static_cast<double>(E) / (n * n * norm);
    for (Index t = 0; t < T; ++t) {
      const double m = mask ? mask[t] : 1.0;
      if (m == 0) continue;
      softmax_row(logits.data() + t * logits.outerStride(), E, p.data());
      for (Index e = 0; e < E; ++e) g[e] = scale * m * count[static_cast<std::size_t>(e)];
      softmax_vjp_add(p.data(), g.data(), E, dz + t * E);
    }
  }
};

/// CV^2 = var / mean^2 (population variance, no epsilon) and, when grad is not null,
/// dCV^2/dv_e = 2 / (n mean^2) * (v_e - mean - var / mean).
inline double cv_squared(const std::vector<double>& v, std::vector<double>* grad) {
  const double n = static_cast<double>(v.size());
  double mean = 0;
  for (double a : v) mean += a;
  mean /= n;
  double var = 0;
  for (double a : v) var += (a - mean) * (a - mean);
  var /= n;
  if (grad) {
    grad->resize(v.size());
    for (std::size_t e = 0; e < v.size(); ++e) {
      (*grad)[e] = 2.0 / (n * mean * mean) * (v[e] - mean - var / mean);
    }
  }
  return var / (mean * mean);
}

inline Index check_sequences(Index T, Index seq_len) {
  const Index S = seq_len > 0 ? seq_len : T;
  if (S > 0 && T % S != 0) {
    throw config_error(::moe::detail::concat("moe: ", T,
                                             " tokens are not a whole number of "
                                             "sequences of seq_len = ",
                                             S));
  }
  return S;
}

}  // namespace detail
}  // namespace losses
}  // namespace moe
