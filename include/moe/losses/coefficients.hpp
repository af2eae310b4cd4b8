// moe: what the backward differentiates besides the upstream gradient: the coefficients of the
// auxiliary routing losses, their raw values, and the one place that adds their gradients
// (block_backward, and the expert-parallel backward on the whole batch's logits).
#pragma once

#include "moe/config.hpp"
#include "moe/losses/balance.hpp"
#include "moe/losses/regularizers.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Which balance loss LossCoefficients::aux weights.
enum class AuxLoss {
  none,
  /// HF Mixtral-family load_balancing_loss_func (losses::load_balancing_loss), with the
  /// normalisation and token mask of LossCoefficients.
  load_balancing,
  /// HF Switch top-1 loss, groups = sequences of seq_len (losses::switch_load_balancing_loss),
  /// on the chosen expert of every token (dropped ones included, as HF's aux_loss).
  switch_top1,
  /// DeepSeek-V3 sequence-wise balance loss (losses::deepseek_sequence_balance_loss).
  deepseek_sequence,
};

/// The loss the backward differentiates besides the upstream gradient dy:
///   L = <y, dy> + aux * L_aux + z * L_z (+ importance * L_importance + load * L_load, noisy
///   top-k only)
/// Coefficients are raw multipliers (HF router_aux_loss_coef, router_z_loss_coef).
struct LossCoefficients {
  double aux = 0;  ///< weight of the balance loss (0: no gradient)
  AuxLoss aux_loss = AuxLoss::load_balancing;
  BalanceNormalization normalization = BalanceNormalization::hf;  ///< load_balancing only
  double z = 0;                                                   ///< router z-loss weight
  double importance = 0;  ///< Shazeer importance loss weight (noisy top-k)
  double load = 0;        ///< Shazeer load loss weight (noisy top-k)
  /// Tokens per sequence for the per-sequence losses (switch_top1, deepseek_sequence); 0 = the
  /// whole batch is one sequence. Must divide the number of tokens.
  Index seq_len = 0;
  /// null, or [T] weights of the load_balancing loss (HF attention_mask: 1 real, 0 padding).
  const double* token_mask = nullptr;
};

/// Raw values of the losses of the call (before coefficients; computed whether or not their
/// coefficient is 0, so a training loop can log them).
struct LossValues {
  double aux = 0, z = 0, importance = 0, load = 0;
  /// sum of coefficient * value over the auxiliary terms
  double weighted(const LossCoefficients& c) const {
    return c.aux * aux + c.z * z + c.importance * importance + c.load * load;
  }
};

namespace detail {

/// The balance loss and the z-loss of `logits` [T x E] (experts [T x k] for the per-sequence
/// losses): raw values into v, coefficient * gradient added into dlogits [T x E].
template <class S, class Experts>
void add_routing_losses(const MoeConfig& config, const LossCoefficients& coeffs,
                        const MatrixRef<S>& logits, const Experts& experts, S* dlogits,
                        LossValues& v) {
  switch (coeffs.aux_loss) {
    case AuxLoss::none:
      break;
    case AuxLoss::load_balancing:
      v.aux = losses::load_balancing_loss<S>(logits, config.top_k, coeffs.normalization,
                                             coeffs.token_mask, coeffs.aux != 0 ? dlogits : nullptr,
                                             coeffs.aux);
      break;
    case AuxLoss::switch_top1:
      v.aux = losses::switch_load_balancing_loss<S>(
          logits, experts, coeffs.seq_len, coeffs.aux != 0 ? dlogits : nullptr, coeffs.aux);
      break;
    case AuxLoss::deepseek_sequence:
      v.aux = losses::deepseek_sequence_balance_loss<S>(
          logits, experts, coeffs.seq_len, coeffs.aux != 0 ? dlogits : nullptr, coeffs.aux);
      break;
  }
  v.z = losses::router_z_loss<S>(logits, coeffs.z != 0 ? dlogits : nullptr, coeffs.z);
}

}  // namespace detail

}  // namespace moe
