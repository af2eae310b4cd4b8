// moe: load-balancing losses and their gradients with respect to the router logits: Hugging Face's
// top-k loss (one layer or several), Switch's top-1 loss, DeepSeek-V3's sequence-wise balance loss.
// Conventions (shapes, returned values, gradients that add into dlogits): moe/losses/common.hpp.
//
// Sources: Hugging Face transformers `load_balancing_loss_func` (Mixtral, Qwen2-MoE, Qwen3-MoE,
// OLMoE) and `router_z_loss_func` / Switch `load_balancing_loss_func`, as restated in
// tests/data/reference/FORMAT.md section 6; Fedus et al. 2021 (Switch Transformers, eqs. 4-6);
// Zoph et al. 2022 (ST-MoE, eq. 5, router z-loss); Gale et al. 2022 (MegaBlocks,
// `batched_load_balancing_loss`); DeepSeek-AI 2024 (DeepSeek-V3 technical report, eqs. 16-20 and
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/losses/common.hpp"
#include "moe/tensor.hpp"

namespace moe {


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
}  // namespace losses
}  // namespace moe
