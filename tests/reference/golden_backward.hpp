// Test support: checks the loss values and gradients a golden case stores (FORMAT.md sections 3,
// 6 and 9) with moe/losses.hpp and moe/backward.hpp.
//
// Adds to the runner's line of such a case:
//   aux=<x>       largest relative error of aux_loss / aux_loss_nomask / aux_loss_postcap
//   z=<x>         relative error of z_loss
//   grad=<x>      largest absolute error over every grad.* and grad_noaux.* tensor (double)
//   grad_rel=<x>  the same divided by (1 + max|reference|), the form of the 1e-5 tolerance
//   grad_f32=<x>  the float block's largest error, in the same relative form (tolerance 1e-4)
// and FAILs the case when any of them is out of tolerance.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "moe/backward.hpp"
#include "moe/losses.hpp"

#include "reference/golden_case.hpp"

namespace moe::golden {
namespace backward_detail {

/// FORMAT.md section 9.
struct LossTolerances {
  double aux = 1e-6;         ///< relative; HF accumulates the aux loss in float32
  double z = 1e-12;          ///< relative
  double grad = 1e-5;        ///< times (1 + max|g|); HF routes in float32
  double grad_float = 1e-4;  ///< our float block, times (1 + max|g|)
};

/// Largest errors seen, for the extra fields.
struct Errors {
  double grad_abs = 0, grad_rel = 0, grad_f32 = 0;
};

inline void compare_grad(Report& r, Errors& e, const std::string& what,
                         const RowMatrix<double>& got, const RowMatrix<double>& ref, double tol,
                         bool is_float) {
  if (got.rows() != ref.rows() || got.cols() != ref.cols()) {
    r.fail(what + ": shape " + detail::shape_str(got.rows(), got.cols()) + " vs reference " +
           detail::shape_str(ref.rows(), ref.cols()));
    return;
  }
  if (ref.size() == 0) return;
  const double s = ref.cwiseAbs().maxCoeff();
  const double err = (got - ref).cwiseAbs().maxCoeff();
  const double rel = err / (1 + s);
  if (is_float) {
    e.grad_f32 = std::max(e.grad_f32, rel);
  } else {
    e.grad_abs = std::max(e.grad_abs, err);
    e.grad_rel = std::max(e.grad_rel, rel);
  }
  if (!(err <= tol * (1 + s))) {
    r.fail(detail::concat(what, ": max abs error ", err, " exceeds ", tol, " * (1 + ", s, ")"));
  }
}

inline double relative_error(double got, double ref) {
  return std::abs(got - ref) / std::max(std::abs(ref), 1e-300);
}

/// The HF attention mask flattened to [T] (batch-major), or empty.
inline std::vector<double> token_mask(const Case& c) {
  std::vector<double> mask;
  if (!c.has("attention_mask")) return mask;
  const RowMatrix<std::int64_t> m = c.mat<std::int64_t>("attention_mask");
  for (Index i = 0; i < m.size(); ++i) mask.push_back(static_cast<double>(m.data()[i]));
  return mask;
}

/// The loss that FORMAT.md's loss_definition names for the family: Mixtral-family
/// load_balancing_loss_func (with the mask), Switch's per-sequence top-1 loss, none for
/// DeepSeek-V3 (HF has none).
inline LossCoefficients coefficients(const Case& c, const std::string& family,
                                     const std::vector<double>& mask) {
  LossCoefficients k;
  k.aux = c.meta_double_or("aux_coef", 0.0);
  k.z = c.meta_double_or("z_coef", 0.0);
  if (family == "switch") {
    k.aux_loss = AuxLoss::switch_top1;
    k.seq_len = c.meta_int_or("seq_len", 0);
  } else if (family == "deepseek_v3") {
    k.aux_loss = AuxLoss::none;
  } else {
    k.aux_loss = AuxLoss::load_balancing;
    if (!mask.empty()) k.token_mask = mask.data();
  }
  return k;
}

/// Runs the block in training mode, checks the stored loss values, and (backward cases) the
/// gradients of L = sum(output * cotangent) + aux_coef aux_loss (+ z_coef z_loss), and of the
/// same without the auxiliary terms (grad_noaux.*).
template <class Gating, class Ffn>
void check(const Case& c, Report& r, const MoeConfig& config,
           const typename Gating::Options& options, const std::string& family) {
  const LossTolerances tol;
  const std::vector<double> mask = token_mask(c);
  const LossCoefficients coeffs = coefficients(c, family, mask);

  using Block = SparseMoeBlock<double, Gating, Ffn>;
  const Block block(config, c.weights<double>(config, Ffn::gated, Gating::uses_bias), options);
  const RowMatrix<double> x = c.mat("input");
  RowMatrix<double> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  Workspace<double> ws;
  ws.set_training(true);
  block.forward(x, y, ws);
  const Routing<double>& routing = ws.routing();
  const auto logits = routing.logits();

  // ---- loss values -------------------------------------------------------------------------
  double aux_err = -1;
  auto check_aux = [&](const std::string& name, double got) {
    const double ref = c.mat(name)(0, 0);
    const double err = relative_error(got, ref);
    aux_err = std::max(aux_err, err);
    if (!(err <= tol.aux)) {
      r.fail(detail::concat(name, ": ", got, " vs reference ", ref, " (relative error ", err, " > ",
                            tol.aux, ")"));
    }
  };
  if (c.has("aux_loss")) {
    if (family == "switch") {
      check_aux("aux_loss", losses::switch_load_balancing_loss<double>(logits, routing.experts(),
                                                                       coeffs.seq_len));
    } else {
      check_aux("aux_loss",
                losses::load_balancing_loss<double>(logits, config.top_k, BalanceNormalization::hf,
                                                    mask.empty() ? nullptr : mask.data()));
    }
  }
  if (c.has("aux_loss_nomask")) {
    check_aux("aux_loss_nomask", losses::load_balancing_loss<double>(logits, config.top_k));
  }
  if (c.has("aux_loss_postcap")) {
    // HF 4.x passed the argmax of the capacity-masked one-hot row: 0 for a dropped token.
    RowMatrix<std::int32_t> postcap(routing.num_tokens(), 1);
    for (Index t = 0; t < routing.num_tokens(); ++t) {
      postcap(t, 0) = routing.kept()(t, 0) ? routing.experts()(t, 0) : 0;
    }
    check_aux("aux_loss_postcap",
              losses::switch_load_balancing_loss<double>(logits, postcap, coeffs.seq_len));
  }
  if (aux_err >= 0) r.extra.emplace_back("aux", aux_err);
  if (c.has("z_loss")) {
    const double got = losses::router_z_loss<double>(logits), ref = c.mat("z_loss")(0, 0);
    const double err = relative_error(got, ref);
    r.extra.emplace_back("z", err);
    if (!(err <= tol.z)) {
      r.fail(detail::concat("z_loss: ", got, " vs reference ", ref, " (relative error ", err, " > ",
                            tol.z, ")"));
    }
  }
  if (!c.meta_bool_or("backward", false) || !c.has("cotangent")) return;

  // ---- gradients ---------------------------------------------------------------------------
  const RowMatrix<double> dy = c.mat("cotangent");
  Errors errors;
  auto grads = MoeGradients<double>::zeros_like(block.weights());
  BackwardWorkspace<double> bws;
  block_backward(block, x, dy, ws, grads, dx, coeffs, bws);
  auto cmp = [&](const std::string& name, const RowMatrix<double>& got) {
    if (!c.has(name)) {
      r.fail("case stores no " + name);
      return;
    }
    compare_grad(r, errors, name, got, c.mat(name), tol.grad, false);
  };
  auto check_params = [&](const MoeGradients<double>& g, const RowMatrix<double>& gx,
                          const std::string& prefix, bool all) {
    cmp(prefix + "input", gx);
    cmp(prefix + "router.weight", g.router);
    if (!all) return;
    for (Index e = 0; e < config.num_experts; ++e) {
      const std::string p = prefix + "experts." + std::to_string(e) + ".";
      if (Ffn::gated) {
        cmp(p + "gate.weight", g.experts.gate(e));
        cmp(p + "up.weight", g.experts.up(e));
        cmp(p + "down.weight", g.experts.w_out(e));
      } else {
        cmp(p + "wi.weight", g.experts.gate(e));
        cmp(p + "wo.weight", g.experts.w_out(e));
      }
    }
    if (config.shared_d_ff > 0) {
      cmp(prefix + "shared.gate.weight", g.shared.gate(0));
      cmp(prefix + "shared.up.weight", g.shared.up(0));
      cmp(prefix + "shared.down.weight", g.shared.w_out(0));
      if (config.shared_expert_gate) cmp(prefix + "shared_gate.weight", g.shared_gate);
    }
  };
  check_params(grads, dx, "grad.", true);
  // Without the auxiliary terms: only the input and router gradients change (FORMAT.md 3).
  auto grads_noaux = MoeGradients<double>::zeros_like(block.weights());
  block_backward(block, x, dy, ws, grads_noaux, dx, LossCoefficients{}, bws);
  check_params(grads_noaux, dx, "grad_noaux.", false);

  // The float block against the same HF gradients (input and router: where float routing shows).
  {
    using BlockF = SparseMoeBlock<float, Gating, Ffn>;
    const BlockF bf(config, c.weights<float>(config, Ffn::gated, Gating::uses_bias), options);
    const RowMatrix<float> xf = x.cast<float>(), dyf = dy.cast<float>();
    RowMatrix<float> yf(x.rows(), x.cols()), dxf(x.rows(), x.cols());
    Workspace<float> wsf;
    wsf.set_training(true);
    bf.forward(xf, yf, wsf);
    auto gf = MoeGradients<float>::zeros_like(bf.weights());
    block_backward(bf, xf, dyf, wsf, gf, dxf, coeffs);
    compare_grad(r, errors, "float grad.input", dxf.template cast<double>(), c.mat("grad.input"),
                 tol.grad_float, true);
    compare_grad(r, errors, "float grad.router.weight", gf.router.template cast<double>(),
                 c.mat("grad.router.weight"), tol.grad_float, true);
    compare_grad(r, errors, "float grad.experts.0 input projection",
                 gf.experts.gate(0).template cast<double>(),
                 c.mat(Ffn::gated ? "grad.experts.0.gate.weight" : "grad.experts.0.wi.weight"),
                 tol.grad_float, true);
  }
  r.extra.emplace_back("grad", errors.grad_abs);
  r.extra.emplace_back("grad_rel", errors.grad_rel);
  r.extra.emplace_back("grad_f32", errors.grad_f32);
}

}  // namespace backward_detail

/// Adds the loss and gradient comparisons of a case to the report (every family that stores
/// them; the block is built from the metadata exactly as run_family does).
inline void check_losses_and_gradients(const Case& c, Report& r) {
  const std::string family = c.meta("family");
  const MoeConfig config = c.config();
  using backward_detail::check;
  if (family == "mixtral" || family == "qwen2_moe" || family == "qwen3_moe" || family == "olmoe") {
    const bool family_default = family == "mixtral" || family == "qwen3_moe";
    gating::SoftmaxTopK::Options o;
    o.normalize = family == "mixtral" ? true : c.meta_bool_or("norm_topk_prob", family_default);
    check<gating::SoftmaxTopK, SwiGLU>(c, r, config, o, family);
  } else if (family == "deepseek_v3") {
    const Index n_group = c.meta_int_or("n_group", 1), topk_group = c.meta_int_or("topk_group", 1);
    const double scaling = c.meta_double_or("routed_scaling_factor", 1.0);
    const bool normalize = c.meta_bool_or("norm_topk_prob", true);
    if (c.has("router.bias")) {
      using G = gating::GroupLimitedTopK;
      check<G, SwiGLU>(c, r, config,
                       G::Options::deepseek_v3(n_group, topk_group, scaling, normalize), family);
    } else {
      using G = gating::BasicGroupLimitedTopK<false>;
      check<G, SwiGLU>(c, r, config,
                       G::Options::deepseek_v3(n_group, topk_group, scaling, normalize), family);
    }
  } else if (family == "switch") {
    const std::string rule = c.meta_or("capacity_rule", "none in effect");
    const Index capacity = c.meta_int_or("capacity", 0);
    const bool dropless = rule.rfind("none in effect", 0) == 0 || capacity <= 0;
    const auto o = dropless ? gating::CapacityTopK::Options::dropless()
                            : gating::CapacityTopK::Options::switch_transformers(capacity);
    check<gating::CapacityTopK, ReluMlp>(c, r, config, o, family);
  }
}

}  // namespace moe::golden
