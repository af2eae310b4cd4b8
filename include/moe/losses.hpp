// moe: auxiliary losses of MoE routing (load balancing, router z-loss, DeepSeek-V3 sequence-wise
// balance, Shazeer 2017 importance and load), their gradients with respect to the router logits,
// and the auxiliary-loss-free bias update.
//
// Conventions shared by every loss here:
//   * logits z are [T x E] row-major (T tokens in batch-major order, E routed experts), the
//     router's pre-softmax/sigmoid output (Routing::logits()).
//   * Every function returns the raw loss value, before any coefficient, computed in double.
//   * Gradients are optional: pass `dlogits` (null, or [T x E] row-major contiguous storage of
//     the logits' scalar) and the function ADDS coef * dL/dz into it, so several losses and the
//     routing-weight gradient can share one buffer. The selection (top-k, argmax) is piecewise
//     constant, so counts carry no gradient: it flows through the probabilities only, as in the
//     autograd of every reference implementation.
//   * Throws shape_error / config_error on inconsistent arguments, before any work.
//
// Sources: Hugging Face transformers `load_balancing_loss_func` (Mixtral, Qwen2-MoE, Qwen3-MoE,
// OLMoE) and `router_z_loss_func` / Switch `load_balancing_loss_func`, as restated in
// ../shared/reference/FORMAT.md section 6; Fedus et al. 2021 (Switch Transformers, eqs. 4-6);
// Zoph et al. 2022 (ST-MoE, eq. 5, router z-loss); Gale et al. 2022 (MegaBlocks,
// `batched_load_balancing_loss`); DeepSeek-AI 2024 (DeepSeek-V3 technical report, eqs. 16-20 and
// section 2.1.2); Shazeer et al. 2017 (Outrageously Large Neural Networks, eqs. 6-10).
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

/// Normalisation of the load-balancing loss.
enum class BalanceNormalization {
  /// Hugging Face `load_balancing_loss_func`: f_e = count_e / N over all k slots, so uniform
  /// routing gives k (Mixtral top-2: 2).
  hf,
  /// MegaBlocks: f_e = count_e / (N k), so uniform routing gives 1. Equals hf / k.
  megablocks,
};

/// How the load-balancing loss combines several layers.
enum class LayerReduction {
  /// Hugging Face: all layers' rows concatenated before counting (one f and one P for the model).
  concatenate,
  /// Each layer's loss on its own rows, then the mean over layers.
  average,
};

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

/// Load-balancing loss of one layer, as Hugging Face computes it (Mixtral, Qwen2-MoE, Qwen3-MoE,
/// OLMoE `load_balancing_loss_func`; Switch Transformers eqs. 4-6 generalised to top-k):
///
///   p_t = softmax(z_t),  m_t = token_mask[t] (1 without a mask),  N = sum_t m_t,
///   count_e = sum_t m_t #{j : topk(p_t, k)_j = e},  P_e = sum_t m_t p_te,
///   L = E * sum_e (count_e / N) (P_e / N)            (hf; uniform routing gives k)
///   L = E * sum_e (count_e / (N k)) (P_e / N)        (megablocks; uniform routing gives 1)
///
/// dL/dz_te = softmax-VJP of dL/dp_te = E count_e m_t / (N^2 [k]). The top-k is recomputed
/// from the softmax of the logits (ties to the lower index), exactly as HF does it: it equals the
/// routing's selection for softmax top-k gatings. logits [T x E]; token_mask null or [T] (1 real
/// token, 0 padding; HF's attention_mask flattened batch-major); dlogits null or [T x E] (+=).
/// Cost O(T E k). Returns 0 when the mask sums to 0.
template <class S>
double load_balancing_loss(const MatrixRef<S>& logits, Index top_k,
                           BalanceNormalization norm = BalanceNormalization::hf,
                           const double* token_mask = nullptr, S* dlogits = nullptr,
                           double coef = 1.0) {
  detail::check_logit_grad(logits.rows(), logits.cols(), "load_balancing_loss logits");
  if (top_k < 1 || top_k > logits.cols()) {
    throw config_error(::moe::detail::concat("moe: load_balancing_loss top_k = ", top_k,
                                             " must be in [1, ", logits.cols(), "]"));
  }
  const double nk = norm == BalanceNormalization::megablocks ? static_cast<double>(top_k) : 1.0;
  detail::BalanceStats st;
  st.add(logits, top_k, token_mask);
  if (dlogits) st.backward(logits, token_mask, nk, coef, dlogits);
  return st.value(logits.cols(), nk);
}

/// Load-balancing loss over several layers (each [T_l x E], the same E). `concatenate` is what
/// HF's model-level aux loss does (the rows of all layers form one batch; the mask, if any, is
/// the same [T] for every layer, all layers then having T rows); `average` is the per-layer loss
/// averaged over layers (what users argue HF should do). dlogits: empty, or one [T_l x E]
/// pointer per layer (+=).
template <class S>
double load_balancing_loss_layers(const std::vector<ConstMap<S>>& layers, Index top_k,
                                  BalanceNormalization norm = BalanceNormalization::hf,
                                  LayerReduction reduction = LayerReduction::concatenate,
                                  const double* token_mask = nullptr,
                                  const std::vector<S*>& dlogits = {}, double coef = 1.0) {
  if (layers.empty()) throw config_error("moe: load_balancing_loss_layers needs >= 1 layer");
  if (!dlogits.empty() && dlogits.size() != layers.size()) {
    throw config_error(::moe::detail::concat("moe: load_balancing_loss_layers got ", dlogits.size(),
                                             " gradient buffers for ", layers.size(), " layers"));
  }
  const Index E = layers[0].cols();
  for (const auto& l : layers) {
    ::moe::detail::check_shape("layer logits", l.rows(), l.cols(), l.rows(), E);
    if (token_mask)
      ::moe::detail::check_shape("layer logits", l.rows(), l.cols(), layers[0].rows(), E);
  }
  if (reduction == LayerReduction::average) {
    double sum = 0;
    const double L = static_cast<double>(layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      sum += load_balancing_loss<S>(layers[l], top_k, norm, token_mask,
                                    dlogits.empty() ? nullptr : dlogits[l], coef / L);
    }
    return sum / L;
  }
  if (top_k < 1 || top_k > E) {
    throw config_error(::moe::detail::concat("moe: load_balancing_loss top_k = ", top_k,
                                             " must be in [1, ", E, "]"));
  }
  const double nk = norm == BalanceNormalization::megablocks ? static_cast<double>(top_k) : 1.0;
  detail::BalanceStats st;
  for (const auto& l : layers) st.add<S>(l, top_k, token_mask);
  if (!dlogits.empty()) {
    for (std::size_t l = 0; l < layers.size(); ++l) {
      st.backward<S>(layers[l], token_mask, nk, coef, dlogits[l]);
    }
  }
  return st.value(E, nk);
}

/// Switch Transformers top-1 load-balancing loss exactly as HF's Switch
/// `load_balancing_loss_func(router_probs [B,S,E], expert_index [B,S])` computes it (FORMAT.md
/// section 6.2): the groups are the B sequences (batch rows), not the flattened batch:
///
///   aux = E^2 * mean_{b,e}( mean_s onehot[b,s,e] * mean_s p[b,s,e] )
///       = (E / B) sum_b sum_e count_be P_be / S^2,      p = softmax(z), uniform routing gives 1.
///
/// expert_index: column 0 of `experts` ([T x >= 1], Routing::experts() of a top-1 gating): the
/// expert each token chose (e*: HF `aux_loss`; pass 0 for dropped tokens to get
/// `aux_loss_postcap`). seq_len S divides T (0: one sequence of T tokens).
/// dL/dp_te = (E / B) count_{b(t),e} / S^2. dlogits null or [T x E] (+=).
template <class S>
double switch_load_balancing_loss(const MatrixRef<S>& logits, const IndexRef& experts,
                                  Index seq_len = 0, S* dlogits = nullptr, double coef = 1.0) {
  const Index T = logits.rows(), E = logits.cols();
  detail::check_logit_grad(T, E, "switch_load_balancing_loss logits");
  if (experts.rows() != T || experts.cols() < 1) {
    throw shape_error(::moe::detail::concat(
        "moe: switch_load_balancing_loss experts has shape ",
        ::moe::detail::shape_str(experts.rows(), experts.cols()), ", expected [", T, " x >= 1]"));
  }
  if (T == 0) return 0.0;
  const Index Sq = detail::check_sequences(T, seq_len), B = T / Sq;
  std::vector<double> count(static_cast<std::size_t>(E)), prob(static_cast<std::size_t>(E)),
      p(static_cast<std::size_t>(E)), g(static_cast<std::size_t>(E));
  double total = 0;
  const double s2 = static_cast<double>(Sq) * static_cast<double>(Sq);
  for (Index b = 0; b < B; ++b) {
    std::fill(count.begin(), count.end(), 0.0);
    std::fill(prob.begin(), prob.end(), 0.0);
    for (Index t = b * Sq; t < (b + 1) * Sq; ++t) {
      const Index chosen = experts(t, 0);
      if (chosen < 0 || chosen >= E) {
        throw value_error(::moe::detail::concat("moe: switch_load_balancing_loss: token ", t,
                                                " has expert ", chosen, ", expected [0, ", E, ")"));
      }
      count[static_cast<std::size_t>(chosen)] += 1;
      detail::softmax_row(logits.data() + t * logits.outerStride(), E, p.data());
      for (Index e = 0; e < E; ++e) prob[static_cast<std::size_t>(e)] += p[e];
    }
    for (Index e = 0; e < E; ++e) {
      total += count[static_cast<std::size_t>(e)] * prob[static_cast<std::size_t>(e)] / s2;
    }
    if (dlogits && coef != 0) {
      const double scale = coef * static_cast<double>(E) / (static_cast<double>(B) * s2);
      for (Index e = 0; e < E; ++e) g[e] = scale * count[static_cast<std::size_t>(e)];
      for (Index t = b * Sq; t < (b + 1) * Sq; ++t) {
        detail::softmax_row(logits.data() + t * logits.outerStride(), E, p.data());
        detail::softmax_vjp_add(p.data(), g.data(), E, dlogits + t * E);
      }
    }
  }
  return static_cast<double>(E) * total / static_cast<double>(B);
}

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

/// DeepSeek-V3 complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20), without
/// its alpha (1e-4 in DeepSeek-V3). Per sequence of S tokens, with s = sigmoid(z) the unbiased
/// affinities and the sequence's top-k selection (`experts` [T x k], -1 entries ignored):
///
///   f_i = E / (k S) * count_i,   s'_ti = s_ti / sum_j s_tj,   P_i = (1/S) sum_t s'_ti,
///   L_b = sum_i f_i P_i,         L = mean over the B = T / S sequences of L_b (uniform gives 1).
///
/// dL/dz_tj = s_tj (1 - s_tj) (g_j - sum_i g_i s'_ti) / sum_i s_ti with g_i = f_i / (B S).
/// seq_len 0 treats the batch as one sequence. dlogits null or [T x E] (+=).
template <class S>
double deepseek_sequence_balance_loss(const MatrixRef<S>& logits, const IndexRef& experts,
                                      Index seq_len = 0, S* dlogits = nullptr, double coef = 1.0) {
  const Index T = logits.rows(), E = logits.cols(), k = experts.cols();
  detail::check_logit_grad(T, E, "deepseek_sequence_balance_loss logits");
  if (experts.rows() != T || k < 1) {
    throw shape_error(::moe::detail::concat(
        "moe: deepseek_sequence_balance_loss experts has shape ",
        ::moe::detail::shape_str(experts.rows(), experts.cols()), ", expected [", T, " x k]"));
  }
  if (T == 0) return 0.0;
  const Index Sq = detail::check_sequences(T, seq_len), B = T / Sq;
  std::vector<double> f(static_cast<std::size_t>(E)), P(static_cast<std::size_t>(E)),
      s(static_cast<std::size_t>(E));
  double total = 0;
  for (Index b = 0; b < B; ++b) {
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (Index t = b * Sq; t < (b + 1) * Sq; ++t) {
      for (Index j = 0; j < k; ++j) {
        const Index e = experts(t, j);
        if (e >= E) {
          throw value_error(::moe::detail::concat("moe: deepseek_sequence_balance_loss: token ", t,
                                                  " has expert ", e, " >= ", E));
        }
        if (e >= 0) f[static_cast<std::size_t>(e)] += 1;
      }
      double sum = 0;
      for (Index e = 0; e < E; ++e)
        sum += s[e] = kernels::sigmoid(static_cast<double>(logits(t, e)));
      for (Index e = 0; e < E; ++e) P[static_cast<std::size_t>(e)] += s[e] / sum;
    }
    const double fs = static_cast<double>(E) / (static_cast<double>(k) * static_cast<double>(Sq));
    for (Index e = 0; e < E; ++e) {
      f[static_cast<std::size_t>(e)] *= fs;
      total +=
          f[static_cast<std::size_t>(e)] * P[static_cast<std::size_t>(e)] / static_cast<double>(Sq);
    }
    if (dlogits && coef != 0) {
      const double scale = coef / (static_cast<double>(B) * static_cast<double>(Sq));
      for (Index t = b * Sq; t < (b + 1) * Sq; ++t) {
        double sum = 0, dot = 0;
        for (Index e = 0; e < E; ++e)
          sum += s[e] = kernels::sigmoid(static_cast<double>(logits(t, e)));
        for (Index e = 0; e < E; ++e) dot += f[static_cast<std::size_t>(e)] * s[e] / sum;
        for (Index e = 0; e < E; ++e) {
          const double ds = scale * (f[static_cast<std::size_t>(e)] - dot) / sum;
          dlogits[t * E + e] += static_cast<S>(ds * s[e] * (1 - s[e]));
        }
      }
    }
  }
  return total / static_cast<double>(B);
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
