// moe: the runtime sizes of a sparse MoE block, validated once at construction.
#pragma once

#include <cmath>
#include <limits>
#include <utility>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// How the gate and up halves of a gated expert combine beyond act(gate) * up, as numbers (one
/// FFN kind, SwiGLU, covers every family; defaults give the plain GLU and its vectorised kernel):
///   g' = min(g, limit)           (clamp_after_activation false: DeepSeek-V4, gpt-oss)
///   u' = clamp(u, -limit, limit) + up_offset
///   a  = act(g') * u'           with silu(x) = x * sigmoid(alpha x) (gpt-oss: alpha 1.702,
///                                up_offset 1, limit 7), or min(act(g), limit) * u' when
///                                clamp_after_activation (Step-3.x).
struct GluOptions {
  double limit = std::numeric_limits<double>::infinity();  ///< swiglu_limit; inf: no clamp
  bool clamp_after_activation = false;
  double up_offset = 0.0;
  double alpha = 1.0;  ///< silu's slope (Silu experts only)
  /// The plain GLU act(g) * u (the fast kernel applies).
  bool plain() const {
    return limit == std::numeric_limits<double>::infinity() && up_offset == 0.0 && alpha == 1.0;
  }
};

/// How the shared expert's output joins the routed output.
enum class SharedCombine {
  sum,      ///< y = routed + shared (Qwen2-MoE, DeepSeek, ...)
  average,  ///< y = (routed + shared) / 2 (Cohere2 MoE shared_expert_combination "average")
};

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

  // Expert numbers (every family runs on the FFN kinds of activations.hpp plus these).
  GluOptions expert_glu{};  ///< routed experts' clamp / offset / slope (gated experts)
  GluOptions shared_glu{};  ///< the shared expert's (Step-3.x: swiglu_limits_shared)
  /// Llama 4: the routing weight scales the expert's input, y = sum_j FFN_e(w_j x) (not w_j
  /// FFN_e(x)); the combine then adds the outputs unweighted.
  bool weight_expert_input = false;
  SharedCombine shared_combine = SharedCombine::sum;
  /// hy_v3 fp32 combine (float64 blocks): the routed sum and the shared output are each rounded
  /// to float32 and added in float32, as HF's HYV3MoE does; off: added in T.
  bool combine_in_float32 = false;
  /// Nemotron-H moe_latent_size: the routed experts work in a latent space of this width,
  /// h = x W1^T (MoeWeights::latent_in [L x d_model]), y_routed = (sum_j w_j FFN_e(h)) W2^T
  /// (latent_out [d_model x L]); the router and the shared expert see x. 0: none.
  Index latent_dim = 0;
  /// The routed experts' input width: latent_dim when set, else d_model.
  Index expert_d_model() const { return latent_dim > 0 ? latent_dim : d_model; }

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
    if (latent_dim < 0) {
      throw config_error(detail::concat("moe: latent_dim = ", latent_dim, " must be >= 0"));
    }
    if (!(router_logit_softcap >= 0) || router_logit_softcap == HUGE_VAL) {
      throw config_error(detail::concat("moe: router_logit_softcap = ", router_logit_softcap,
                                        " must be finite and >= 0"));
    }
    if (!(router_norm_eps > 0) || router_norm_eps == HUGE_VAL) {
      throw config_error(detail::concat("moe: router_norm_eps = ", router_norm_eps,
                                        " must be finite and positive"));
    }
    for (const auto& [name, g] :
         {std::pair<const char*, const GluOptions&>{"expert_glu", expert_glu},
          {"shared_glu", shared_glu}}) {
      if (!(g.limit > 0)) {
        throw config_error(
            detail::concat("moe: ", name, ".limit = ", g.limit, " must be positive"));
      }
      if (!std::isfinite(g.up_offset) || !std::isfinite(g.alpha)) {
        throw config_error(detail::concat("moe: ", name, ".up_offset = ", g.up_offset,
                                          ", alpha = ", g.alpha, " must be finite"));
      }
    }
  }
};

}  // namespace moe
