// moe: the block-quantised weights (Q8, Q4, Mxfp4) of the FFN experts of one layer.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/experts/expert_matrices.hpp"
#include "moe/experts/quant_matrix.hpp"
#include "moe/experts/residency.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Block-quantised weights of `num_experts` FFN experts, mirroring CompactExpertStack: per expert
/// e gate(e) [d_ff x d_model], when gated up(e) [d_ff x d_model], and w_out(e) [d_model x d_ff],
/// each a QuantMatrix in one layout for the whole stack (panels: the fast products; stored: the
/// exact products; kLayout is the default, which CompactExperts<Format, mode> picks). d_model and
/// d_ff must be multiples of 32. Immutable once built; one stack serves many threads.
template <class Format, QuantLayout kLayout = QuantLayout::panels>
class QuantExpertStack : public detail::ExpertMatrices<QuantMatrix<Format>> {
  using Base = detail::ExpertMatrices<QuantMatrix<Format>>;
  using Base::gate_, Base::up_, Base::down_, Base::d_model_, Base::d_ff_;

 public:
  QuantExpertStack() = default;
  /// Empty matrices for num_experts experts, to be filled with set_gated / set_plain.
  /// Throws config_error on negative sizes, shape_error unless d_model and d_ff are multiples
  /// of 32.
  QuantExpertStack(Index num_experts, Index d_model, Index d_ff, bool gated,
                   QuantLayout layout = kLayout)
      : Base("QuantExpertStack", num_experts, d_model, d_ff, gated), layout_(layout) {
    if (num_experts > 0) {
      kernels::check_quant_cols(Format::name, "d_model", d_model);
      kernels::check_quant_cols(Format::name, "d_ff", d_ff);
    }
  }

  /// Quantises every expert of an fp32 stack (ExpertStack<float>: gate(e), up(e), w_out(e));
  /// its biases, if any, stay fp32.
  template <class FloatStack>
  static QuantExpertStack from(const FloatStack& w, QuantLayout layout = kLayout) {
    QuantExpertStack s(w.num_experts(), w.d_model(), w.d_ff(), w.gated(), layout);
    using M = QuantMatrix<Format>;
    for (Index e = 0; e < w.num_experts(); ++e) {
      s.gate_[std::size_t(e)] = M::quantize(w.gate(e), layout);
      if (w.gated()) s.up_[std::size_t(e)] = M::quantize(w.up(e), layout);
      s.down_[std::size_t(e)] = M::quantize(w.w_out(e), layout);
    }
    s.copy_biases(w);
    return s;
  }

  QuantLayout layout() const { return layout_; }

  /// Sets a gated expert's matrices (any layout given is converted to the stack's: stored
  /// bytes are repacked into panels, a panel matrix given to a stored stack is refused).
  /// Throws config_error / shape_error.
  void set_gated(Index e, QuantMatrix<Format> gate_w, QuantMatrix<Format> up_w,
                 QuantMatrix<Format> down_w) {
    this->check_set(e, /*gated_call=*/true);
    gate_[std::size_t(e)] = adopt("gate", e, std::move(gate_w), d_ff_, d_model_);
    up_[std::size_t(e)] = adopt("up", e, std::move(up_w), d_ff_, d_model_);
    down_[std::size_t(e)] = adopt("down", e, std::move(down_w), d_model_, d_ff_);
  }
  /// Sets a plain expert's matrices (wi [d_ff x d_model], wo [d_model x d_ff]).
  void set_plain(Index e, QuantMatrix<Format> wi, QuantMatrix<Format> wo) {
    this->check_set(e, /*gated_call=*/false);
    gate_[std::size_t(e)] = adopt("wi", e, std::move(wi), d_ff_, d_model_);
    down_[std::size_t(e)] = adopt("wo", e, std::move(wo), d_model_, d_ff_);
  }

  /// Usage counters and memory ranges of the experts (set by the checkpoint loader; mapped ranges
  /// for views of a checkpoint in the stored layout), or nullptr.
  const ExpertResidency* residency() const { return residency_.get(); }
  /// Attaches usage counters / memory ranges (shared by the copies of this stack).
  void set_residency(std::shared_ptr<const ExpertResidency> residency) {
    residency_ = std::move(residency);
  }

 private:
  QuantMatrix<Format> adopt(const char* what, Index e, QuantMatrix<Format> m, Index rows,
                            Index cols) const {
    const std::string name = detail::concat("expert ", e, ' ', what, " weight");
    detail::check_shape(name.c_str(), m.rows(), m.cols(), rows, cols);
    if (m.layout() == layout_) return m;
    if (layout_ == QuantLayout::panels) return QuantMatrix<Format>::repack(m.stored());
    throw config_error(detail::concat("moe: ", name,
                                      " is in the panel layout, expected the stored layout of an "
                                      "exact-mode stack"));
  }

  QuantLayout layout_ = QuantLayout::panels;
  std::shared_ptr<const ExpertResidency> residency_;
};

}  // namespace moe
