// moe: the runtime sizes of a sparse MoE block, validated once at construction.
#pragma once

#include <cmath>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Sizes of a sparse MoE block. Names follow our vocabulary; the Hugging Face config key is in
/// each comment. Routing options that belong to one gating family live in that policy's Options.
struct MoeConfig {
  Index d_model = 0;  ///< hidden_size
  Index d_ff = 0;     ///< intermediate_size / moe_intermediate_size (width of one routed expert)
  Index num_experts = 0;  ///< num_local_experts / num_experts / n_routed_experts
  Index top_k = 0;        ///< num_experts_per_tok
  /// Width of the shared expert that every token visits (Qwen2-MoE shared_expert_intermediate_size,
  /// DeepSeek n_shared_experts * moe_intermediate_size); 0 means no shared expert.
  Index shared_d_ff = 0;
  /// Qwen2-MoE: the shared expert's output is scaled by sigmoid(shared_expert_gate . x).
  bool shared_expert_gate = false;
  /// Router logits soft-capped to c tanh(z / c) before the gating (Laguna
  /// moe_router_logit_softcapping); 0 means none.
  double router_logit_softcap = 0.0;
  /// eps of the router's input RMS norm (Gemma 4 rms_norm_eps); read only when the weights carry
  /// MoeWeights::router_input_scale.
  double router_norm_eps = 1e-6;

  /// Throws config_error naming the first field that is out of range.
  void validate() const {
    auto positive = [](const char* name, Index v) {
      if (v <= 0) throw config_error(detail::concat("moe: ", name, " = ", v, " must be positive"));
    };
    positive("d_model", d_model);
    positive("d_ff", d_ff);
    positive("num_experts", num_experts);
    positive("top_k", top_k);
    if (top_k > num_experts) {
      throw config_error(
          detail::concat("moe: top_k = ", top_k, " exceeds num_experts = ", num_experts));
    }
    if (shared_d_ff < 0) {
      throw config_error(detail::concat("moe: shared_d_ff = ", shared_d_ff, " must be >= 0"));
    }
    if (shared_expert_gate && shared_d_ff == 0) {
      throw config_error("moe: shared_expert_gate is set but shared_d_ff = 0 (no shared expert)");
    }
    if (!std::isfinite(router_logit_softcap) || router_logit_softcap < 0) {
      throw config_error(detail::concat("moe: router_logit_softcap = ", router_logit_softcap,
                                        " must be finite and >= 0"));
    }
    if (!std::isfinite(router_norm_eps) || !(router_norm_eps > 0)) {
      throw config_error(detail::concat("moe: router_norm_eps = ", router_norm_eps,
                                        " must be finite and positive"));
    }
  }
};

}  // namespace moe
