// moe: all parameters of one sparse MoE layer, in checkpoint orientation.
#pragma once

#include <cstdint>

#include "moe/config.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// The parameters of a sparse MoE block. Owned storage; the block takes them by value (move).
template <class T>
struct MoeWeights {
  RowMatrix<T> router;  ///< [E x d_model] router (HF `gate.weight`)
  Vector<T>
      router_bias;  ///< [E] selection-only bias (DeepSeek-V3 e_score_correction_bias), or empty
  RowMatrix<T> router_noise;  ///< [E x d_model] noise projection W_noise (noisy top-k), or empty
  ExpertStack<T> experts;     ///< the E routed experts
  ExpertStack<T> shared;      ///< one expert of width shared_d_ff every token visits, or empty
  RowMatrix<T> shared_gate;   ///< [1 x d_model] Qwen2-MoE shared_expert_gate, or empty
  // Router extras, each empty unless the family has it (the router applies what is present).
  Vector<T> router_logit_bias;  ///< [E] added to the logits (gpt-oss router.bias), or empty
  /// [d_model] the router sees x / rms(x) * scale * d_model^-1/2 (Gemma 4 router.scale; eps:
  /// MoeConfig::router_norm_eps), or empty
  Vector<T> router_input_scale;
  Vector<T> expert_weight_scale;  ///< [E] multiplies expert e's routing weights (Gemma 4
                                  ///< router.per_expert_scale), or empty
  /// [rows x top_k] the experts of each token id (DeepSeek-V4 hash layers gate.tid2eid), or empty
  RowMatrix<std::int64_t> expert_table;
  Vector<T> output_bias;  ///< [d_model] added to the routed output (JetMoE moe bias), or empty
  /// [d_model] RMSNorm weights around the routed experts (Gemma 4 decoder layer
  /// pre_feedforward_layernorm_2 / post_feedforward_layernorm_2: the experts see
  /// rmsnorm(x) * pre, their weighted sum becomes rmsnorm(sum) * post; the router sees x; float32
  /// as HF; eps: MoeConfig::router_norm_eps), or empty
  Vector<T> expert_input_norm;
  Vector<T> expert_output_norm;
  RowMatrix<T> latent_in;   ///< [latent_dim x d_model] (Nemotron-H fc1_latent_proj), or empty
  RowMatrix<T> latent_out;  ///< [d_model x latent_dim] (fc2_latent_proj), or empty

  /// Zero weights shaped for `config` (gated experts when `gated`), with a bias / noise projection
  /// when asked. Fill them, then hand them to the block.
  static MoeWeights zeros(const MoeConfig& config, bool gated = true, bool with_bias = false,
                          bool with_noise = false) {
    config.validate();
    MoeWeights w;
    w.router = RowMatrix<T>::Zero(config.num_experts, config.d_model);
    if (with_bias) w.router_bias = Vector<T>::Zero(config.num_experts);
    if (with_noise) w.router_noise = RowMatrix<T>::Zero(config.num_experts, config.d_model);
    w.experts = ExpertStack<T>(config.num_experts, config.expert_d_model(), config.d_ff, gated);
    if (config.latent_dim > 0) {
      w.latent_in = RowMatrix<T>::Zero(config.latent_dim, config.d_model);
      w.latent_out = RowMatrix<T>::Zero(config.d_model, config.latent_dim);
    }
    if (config.shared_d_ff > 0) {
      w.shared = ExpertStack<T>(1, config.d_model, config.shared_d_ff, gated);
      if (config.shared_expert_gate) w.shared_gate = RowMatrix<T>::Zero(1, config.d_model);
    }
    return w;
  }

  /// Throws shape_error / config_error unless every tensor agrees with `config`. check_experts =
  /// false skips the routed experts (a block that stores them compact checks them itself).
  /// router_rows: the router's rows, num_experts plus the gating's zero experts (LongCat; < 0:
  /// num_experts); the selection bias and the logit bias have as many entries.
  void validate(const MoeConfig& config, bool gated, bool needs_bias, bool needs_noise,
                bool check_experts = true, Index router_rows = -1) const {
    const Index E = config.num_experts, d = config.d_model;
    const Index R = router_rows < 0 ? E : router_rows;
    detail::check_shape("router weight", router.rows(), router.cols(), R, d);
    // A non-finite router weight would make every token's routing NaN: refuse it up front (the
    // check is E * d_model reads; expert weights are not scanned, their cost is the model size).
    if (!router.allFinite()) throw value_error("moe: router weight has non-finite values");
    if (needs_bias) {
      detail::check_shape("router bias", router_bias.rows(), router_bias.cols(), R, 1);
      if (!router_bias.allFinite()) throw value_error("moe: router bias has non-finite values");
    } else if (router_bias.size() != 0) {
      throw config_error("moe: router bias given, but the gating policy does not use one");
    }
    if (needs_noise) {
      detail::check_shape("router noise weight", router_noise.rows(), router_noise.cols(), E, d);
    }
    auto check_stack = [&](const char* what, const ExpertStack<T>& s, Index n, Index f, Index d) {
      if (s.num_experts() != n || s.d_model() != (n ? d : s.d_model()) || s.d_ff() != f ||
          (n && s.gated() != gated)) {
        throw shape_error(detail::concat(
            "moe: ", what, " hold ", s.num_experts(), " experts of d_model ", s.d_model(),
            ", d_ff ", s.d_ff(), (s.gated() ? " (gated)" : " (plain)"), ", expected ", n,
            " experts of d_model ", d, ", d_ff ", f, (gated ? " (gated)" : " (plain)")));
      }
    };
    if (check_experts)
      check_stack("routed experts", experts, E, config.d_ff, config.expert_d_model());
    if (config.latent_dim > 0) {
      detail::check_shape("latent_in", latent_in.rows(), latent_in.cols(), config.latent_dim, d);
      detail::check_shape("latent_out", latent_out.rows(), latent_out.cols(), d, config.latent_dim);
    } else if (latent_in.size() != 0 || latent_out.size() != 0) {
      throw config_error("moe: latent projections given, but config.latent_dim = 0");
    }
    check_stack("shared experts", shared, config.shared_d_ff > 0 ? 1 : 0,
                config.shared_d_ff > 0 ? config.shared_d_ff : shared.d_ff(), d);
    auto check_optional = [&](const char* what, const Vector<T>& v, Index n) {
      if (v.size() == 0) return;
      detail::check_shape(what, v.rows(), v.cols(), n, 1);
      if (!v.allFinite())
        throw value_error(detail::concat("moe: ", what, " has non-finite values"));
    };
    check_optional("router logit bias", router_logit_bias, R);
    check_optional("router input scale", router_input_scale, d);
    check_optional("expert weight scale", expert_weight_scale, E);
    check_optional("output bias", output_bias, d);
    check_optional("expert input norm", expert_input_norm, d);
    check_optional("expert output norm", expert_output_norm, d);
    if (expert_table.size() != 0) {
      if (expert_table.cols() != config.top_k) {
        throw shape_error(detail::concat("moe: expert table has ", expert_table.cols(),
                                         " columns, expected top_k = ", config.top_k));
      }
      if (expert_table.minCoeff() < 0 || expert_table.maxCoeff() >= E) {
        throw value_error(detail::concat("moe: expert table names experts outside [0, ", E, ")"));
      }
    }
    if (config.shared_expert_gate) {
      detail::check_shape("shared expert gate weight", shared_gate.rows(), shared_gate.cols(), 1,
                          d);
    } else if (shared_gate.size() != 0) {
      throw config_error("moe: shared_gate weight given, but config.shared_expert_gate is false");
    }
  }

  std::size_t bytes() const {
    return experts.bytes() + shared.bytes() +
           static_cast<std::size_t>(
               router.size() + router_bias.size() + router_noise.size() + shared_gate.size() +
               router_logit_bias.size() + router_input_scale.size() + expert_weight_scale.size() +
               output_bias.size() + expert_input_norm.size() + expert_output_norm.size() +
               latent_in.size() + latent_out.size()) *
               sizeof(T) +
           static_cast<std::size_t>(expert_table.size()) * sizeof(std::int64_t);
  }
};

}  // namespace moe
