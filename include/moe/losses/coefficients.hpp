// moe: what block_backward differentiates besides the upstream gradient: which balance loss,
// the coefficients of the auxiliary losses, and the raw loss values a backward returns.
#pragma once

#include "moe/losses/balance.hpp"
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

}  // namespace moe
