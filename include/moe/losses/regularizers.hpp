// moe: regularisers of the router besides load balancing: the router z-loss (ST-MoE), Shazeer et
// al. 2017's importance and smooth load losses, and DeepSeek-V3's auxiliary-loss-free bias update.
// Conventions (shapes, returned values, gradients that add into dlogits): moe/losses/common.hpp.
// Sources: Zoph et al. 2022 (ST-MoE, eq. 5); Shazeer et al. 2017 (eqs. 6-10); DeepSeek-AI 2024
// (DeepSeek-V3 technical report, section 2.1.2).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/losses/common.hpp"
#include "moe/tensor.hpp"

namespace moe {
namespace losses {

/// Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5; HF `router_z_loss_func`):
///
///   L_z = (1/T) sum_t (logsumexp_e z_te)^2,      dL_z/dz_te = 2 lse_t softmax(z_t)_e / T.
///
/// Penalises large logits, which keeps the router's float32 softmax well conditioned.
/// dlogits null or [T x E] (+=).
template <class S>
double router_z_loss(const MatrixRef<S>& logits, S* dlogits = nullptr, double coef = 1.0) {
  const Index T = logits.rows(), E = logits.cols();
  detail::check_logit_grad(T, E, "router_z_loss logits");
  if (T == 0) return 0.0;
  std::vector<double> p(static_cast<std::size_t>(E));
  double sum = 0;
  for (Index t = 0; t < T; ++t) {
    double m = -std::numeric_limits<double>::infinity();
    for (Index e = 0; e < E; ++e) m = std::max(m, static_cast<double>(logits(t, e)));
    double se = 0;
    for (Index e = 0; e < E; ++e) se += std::exp(static_cast<double>(logits(t, e)) - m);
    const double lse = m + std::log(se);
    sum += lse * lse;
    if (dlogits && coef != 0) {
      const double scale = coef * 2.0 * lse / static_cast<double>(T);
      for (Index e = 0; e < E; ++e) {
        dlogits[t * E + e] +=
            static_cast<S>(scale * std::exp(static_cast<double>(logits(t, e)) - lse));
      }
    }
  }
  return sum / static_cast<double>(T);
}

/// Shazeer et al. 2017 importance loss (eqs. 6-7), without w_importance:
///
///   Importance_e = sum_t G_te,   L = CV(Importance)^2 = var / mean^2 (population variance).
///
/// gates [T x E]: the gate values G (the noisy top-k softmax, zero off the selection; a
/// Routing's weights scattered to [T x E]). dgates null or [T x E] (+=): dL/dG_te =
/// 2 / (E mean^2) (Importance_e - mean - var / mean); the gating's backward carries it to the
/// logits. Returns 0 (and no gradient) when every importance is 0.
template <class S>
double shazeer_importance_loss(const MatrixRef<S>& gates, S* dgates = nullptr, double coef = 1.0) {
  const Index T = gates.rows(), E = gates.cols();
  detail::check_logit_grad(T, E, "shazeer_importance_loss gates");
  std::vector<double> imp(static_cast<std::size_t>(E), 0.0), g;
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e)
      imp[static_cast<std::size_t>(e)] += static_cast<double>(gates(t, e));
  }
  double total = 0;
  for (double v : imp) total += v;
  if (!(total != 0)) return 0.0;
  const double L = detail::cv_squared(imp, dgates ? &g : nullptr);
  if (dgates && coef != 0) {
    for (Index t = 0; t < T; ++t) {
      for (Index e = 0; e < E; ++e)
        dgates[t * E + e] += static_cast<S>(coef * g[static_cast<std::size_t>(e)]);
    }
  }
  return L;
}

/// Gradients of shazeer_load_loss with respect to its three inputs (each null or [T x E], +=).
template <class S>
struct ShazeerLoadGrads {
  S* dclean = nullptr;      ///< dL/d clean logits (x W_g^T)
  S* dnoisy = nullptr;      ///< dL/d noisy logits H (through the k-th-largest threshold)
  S* dnoise_std = nullptr;  ///< dL/d noise standard deviation softplus(x W_noise^T)
};

/// Shazeer et al. 2017 smooth load loss (appendix A, eqs. 8-10), without w_load:
///
///   P_ti = Phi((clean_ti - kth_excluding(H_t, k, i)) / std_ti),  Load_i = sum_t P_ti,
///   L = CV(Load)^2,
///
/// where H are the noisy logits clean + N(0,1) std, kth_excluding(H_t, k, i) is the k-th largest
/// entry of H_t with entry i left out (ties to the lower index), and Phi the standard normal CDF.
/// With u = (clean - h) / std and phi the normal density: dP/dclean = phi / std,
/// dP/dh = -phi / std (h is one entry of H, which receives it), dP/dstd = -u phi / std.
/// All inputs [T x E] with 1 <= k < E. Cost O(T E^2).
template <class S>
double shazeer_load_loss(const MatrixRef<S>& clean, const MatrixRef<S>& noisy,
                         const MatrixRef<S>& noise_std, Index top_k,
                         const ShazeerLoadGrads<S>& grads = {}, double coef = 1.0) {
  const Index T = clean.rows(), E = clean.cols();
  detail::check_logit_grad(T, E, "shazeer_load_loss clean logits");
  ::moe::detail::check_shape("shazeer_load_loss noisy logits", noisy.rows(), noisy.cols(), T, E);
  ::moe::detail::check_shape("shazeer_load_loss noise std", noise_std.rows(), noise_std.cols(), T,
                             E);
  if (top_k < 1 || top_k >= E) {
    throw config_error(
        ::moe::detail::concat("moe: shazeer_load_loss needs 1 <= top_k < E, got "
                              "top_k = ",
                              top_k, ", E = ", E));
  }
  // Per token: the top k+1 of H; excluding i, the k-th largest is entry k of that list when i is
  // among the first k, else entry k-1.
  std::vector<std::int32_t> top(static_cast<std::size_t>(T * (top_k + 1)));
  std::vector<double> load(static_cast<std::size_t>(E), 0.0), g;
  auto threshold_index = [&](Index t, Index i) {
    const std::int32_t* tt = top.data() + t * (top_k + 1);
    for (Index j = 0; j < top_k; ++j) {
      if (tt[j] == i) return tt[top_k];
    }
    return tt[top_k - 1];
  };
  const double inv_sqrt2 = 0.70710678118654752440, inv_sqrt2pi = 0.39894228040143267794;
  for (Index t = 0; t < T; ++t) {
    kernels::top_k(noisy.data() + t * noisy.outerStride(), E, top_k + 1,
                   top.data() + t * (top_k + 1));
    for (Index i = 0; i < E; ++i) {
      const double h = static_cast<double>(noisy(t, threshold_index(t, i)));
      const double u =
          (static_cast<double>(clean(t, i)) - h) / static_cast<double>(noise_std(t, i));
      load[static_cast<std::size_t>(i)] += 0.5 * std::erfc(-u * inv_sqrt2);
    }
  }
  double total = 0;
  for (double v : load) total += v;
  if (!(total != 0)) return 0.0;
  const bool want = grads.dclean || grads.dnoisy || grads.dnoise_std;
  const double L = detail::cv_squared(load, want ? &g : nullptr);
  if (want && coef != 0) {
    for (Index t = 0; t < T; ++t) {
      for (Index i = 0; i < E; ++i) {
        const Index m = threshold_index(t, i);
        const double sd = static_cast<double>(noise_std(t, i));
        const double u = (static_cast<double>(clean(t, i)) - static_cast<double>(noisy(t, m))) / sd;
        const double dp =
            coef * g[static_cast<std::size_t>(i)] * inv_sqrt2pi * std::exp(-0.5 * u * u) / sd;
        if (grads.dclean) grads.dclean[t * E + i] += static_cast<S>(dp);
        if (grads.dnoisy) grads.dnoisy[t * E + m] -= static_cast<S>(dp);
        if (grads.dnoise_std) grads.dnoise_std[t * E + i] -= static_cast<S>(dp * u);
      }
    }
  }
  return L;
}

}  // namespace losses

/// Auxiliary-loss-free load balancing (DeepSeek-V3 report, section 2.1.2; Wang et al. 2024):
/// after each training step,
///
///   b_i += gamma * sign(mean_j load_j - load_i)       (sign(0) = 0)
///
/// so an overloaded expert's selection bias goes down and an underloaded one's goes up. The bias
/// only changes which experts are selected, never their weights (MoeWeights::router_bias of a
/// gating with uses_bias). counts: the load of each expert in the step (for instance
/// Workspace::stats().tokens_per_expert); gamma: the bias update speed (1e-3 in DeepSeek-V3).
/// Throws shape_error when the sizes differ.
template <class S, class Count>
void aux_free_bias_update(Eigen::Ref<Vector<S>> bias, const std::vector<Count>& counts,
                          double gamma) {
  if (static_cast<Index>(counts.size()) != bias.size()) {
    throw shape_error(::moe::detail::concat("moe: aux_free_bias_update: ", counts.size(),
                                            " counts for a bias of ", bias.size(), " experts"));
  }
  if (counts.empty()) return;
  double mean = 0;
  for (const Count& c : counts) mean += static_cast<double>(c);
  mean /= static_cast<double>(counts.size());
  for (Index i = 0; i < bias.size(); ++i) {
    const double diff = mean - static_cast<double>(counts[static_cast<std::size_t>(i)]);
    const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
    bias[i] += static_cast<S>(gamma * sign);
  }
}

/// aux_free_bias_update on an owned bias vector (deduces S; MoeWeights::router_bias).
template <class S, class Count>
void aux_free_bias_update(Vector<S>& bias, const std::vector<Count>& counts, double gamma) {
  aux_free_bias_update<S, Count>(Eigen::Ref<Vector<S>>(bias), counts, gamma);
}

}  // namespace moe
