// moe: the compact weights of the FFN experts of one layer (gate, up, down per expert).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/experts/compact_matrix.hpp"
#include "moe/experts/expert_matrices.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/experts/residency.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Compact weights of `num_experts` FFN experts, mirroring ExpertStack: per expert e the input
/// projection w_in(e) [in_rows x d_model] is gate(e) [d_ff x d_model] (rows [0, d_ff)) followed,
/// when gated, by up(e) [d_ff x d_model] (rows [d_ff, 2 d_ff)); w_out(e) is [d_model x d_ff].
/// Gate, up and down are separate CompactMatrix objects (each with its own scale grid, as
/// DeepSeek-V3 stores gate_proj / up_proj / down_proj), so checkpoint tensors can be viewed
/// without a copy. Immutable once built; one stack serves many threads.
template <class Format>
class CompactExpertStack : public detail::ExpertMatrices<CompactMatrix<Format>> {
  using Base = detail::ExpertMatrices<CompactMatrix<Format>>;
  using Base::gate_, Base::up_, Base::down_, Base::d_model_, Base::d_ff_;

 public:
  CompactExpertStack() = default;
  /// Empty matrices for num_experts experts, to be filled with set_gated / set_plain.
  /// Throws config_error on negative sizes.
  CompactExpertStack(Index num_experts, Index d_model, Index d_ff, bool gated)
      : Base("CompactExpertStack", num_experts, d_model, d_ff, gated) {}

  /// Quantises every expert of an fp32 stack (fp8: 128 x 128 blocks per projection); its biases,
  /// if any, stay fp32.
  static CompactExpertStack from(const ExpertStack<float>& w) {
    CompactExpertStack s(w.num_experts(), w.d_model(), w.d_ff(), w.gated());
    using M = CompactMatrix<Format>;
    for (Index e = 0; e < w.num_experts(); ++e) {
      s.gate_[std::size_t(e)] = M::quantize(w.gate(e));
      if (w.gated()) s.up_[std::size_t(e)] = M::quantize(w.up(e));
      s.down_[std::size_t(e)] = M::quantize(w.w_out(e));
    }
    s.copy_biases(w);
    return s;
  }

  /// Sets a gated expert's matrices (quantised or checkpoint views). Throws shape_error.
  void set_gated(Index e, CompactMatrix<Format> gate_w, CompactMatrix<Format> up_w,
                 CompactMatrix<Format> down_w) {
    this->check_set(e, /*gated_call=*/true);
    check("gate", e, gate_w, d_ff_, d_model_);
    check("up", e, up_w, d_ff_, d_model_);
    check("down", e, down_w, d_model_, d_ff_);
    gate_[std::size_t(e)] = std::move(gate_w);
    up_[std::size_t(e)] = std::move(up_w);
    down_[std::size_t(e)] = std::move(down_w);
  }
  /// Sets a plain expert's matrices (wi [d_ff x d_model], wo [d_model x d_ff]).
  void set_plain(Index e, CompactMatrix<Format> wi, CompactMatrix<Format> wo) {
    this->check_set(e, /*gated_call=*/false);
    check("wi", e, wi, d_ff_, d_model_);
    check("wo", e, wo, d_model_, d_ff_);
    gate_[std::size_t(e)] = std::move(wi);
    down_[std::size_t(e)] = std::move(wo);
  }

  /// Usage counters and memory ranges of the experts (set by the checkpoint loader for views of
  /// a mapped file; the block reports each routing to it), or nullptr.
  const ExpertResidency* residency() const { return residency_.get(); }
  /// Attaches usage counters / memory ranges (shared by the copies of this stack).
  void set_residency(std::shared_ptr<const ExpertResidency> residency) {
    residency_ = std::move(residency);
  }

 private:
  static void check(const char* what, Index e, const CompactMatrix<Format>& m, Index rows,
                    Index cols) {
    const std::string name = detail::concat("expert ", e, ' ', what, " weight");
    detail::check_shape(name.c_str(), m.rows(), m.cols(), rows, cols);
  }

  std::shared_ptr<const ExpertResidency> residency_;
};

/// The stack of CompactExperts<Bf16> in the fast mode: the same matrices as
/// CompactExpertStack<Bf16>, whose operands (Bf16FastOperand, experts/quant_operand.hpp) round
/// each job's activations to bf16 once and stream the codes through kernels::gemv_bf16_nt at
/// decode. Converts implicitly from CompactExpertStack<Bf16> (what the checkpoint loaders return),
/// keeping views as views; the exact mode uses CompactExpertStack<Bf16> itself.
class Bf16FastExpertStack : public CompactExpertStack<Bf16> {
 public:
  using CompactExpertStack<Bf16>::CompactExpertStack;
  Bf16FastExpertStack() = default;
  // NOLINTNEXTLINE(google-explicit-constructor): a loaded stack passes as the fast block's stack
  Bf16FastExpertStack(CompactExpertStack<Bf16> s) : CompactExpertStack<Bf16>(std::move(s)) {}

  /// Rounds every expert of an fp32 stack to bf16 (CompactExpertStack<Bf16>::from).
  static Bf16FastExpertStack from(const ExpertStack<float>& w) {
    return CompactExpertStack<Bf16>::from(w);
  }
};

}  // namespace moe
