// moe: the block-quantised weights (Q8, Q4, Mxfp4) of the FFN experts of one layer.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
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
class QuantExpertStack {
 public:
  QuantExpertStack() = default;
  /// Empty matrices for num_experts experts, to be filled with set_gated / set_plain.
  /// Throws config_error on negative sizes, shape_error unless d_model and d_ff are multiples
  /// of 32.
  QuantExpertStack(Index num_experts, Index d_model, Index d_ff, bool gated,
                   QuantLayout layout = kLayout)
      : num_experts_(num_experts), d_model_(d_model), d_ff_(d_ff), gated_(gated),
        layout_(layout) {
    if (num_experts < 0 || d_model < 0 || d_ff < 0) {
      throw config_error(detail::concat(
          "moe: QuantExpertStack sizes must be >= 0, got num_experts = ", num_experts,
          ", d_model = ", d_model, ", d_ff = ", d_ff));
    }
    if (num_experts > 0) {
      kernels::check_quant_cols(Format::name, "d_model", d_model);
      kernels::check_quant_cols(Format::name, "d_ff", d_ff);
    }
    gate_.resize(std::size_t(num_experts));
    up_.resize(gated ? std::size_t(num_experts) : 0);
    down_.resize(std::size_t(num_experts));
  }

  /// Quantises every expert of an fp32 stack (ExpertStack<float>: gate(e), up(e), w_out(e)).
  template <class FloatStack>
  static QuantExpertStack from(const FloatStack& w, QuantLayout layout = kLayout) {
    QuantExpertStack s(w.num_experts(), w.d_model(), w.d_ff(), w.gated(), layout);
    using M = QuantMatrix<Format>;
    for (Index e = 0; e < w.num_experts(); ++e) {
      s.gate_[std::size_t(e)] = M::quantize(w.gate(e), layout);
      if (w.gated()) s.up_[std::size_t(e)] = M::quantize(w.up(e), layout);
      s.down_[std::size_t(e)] = M::quantize(w.w_out(e), layout);
    }
    return s;
  }

  Index num_experts() const { return num_experts_; }
  Index d_model() const { return d_model_; }
  Index d_ff() const { return d_ff_; }
  bool gated() const { return gated_; }
  Index in_rows() const { return gated_ ? 2 * d_ff_ : d_ff_; }
  QuantLayout layout() const { return layout_; }

  const QuantMatrix<Format>& gate(Index e) const { return gate_[std::size_t(e)]; }
  const QuantMatrix<Format>& up(Index e) const {
    MOE_ASSERT(gated_);
    return up_[std::size_t(e)];
  }
  const QuantMatrix<Format>& w_out(Index e) const { return down_[std::size_t(e)]; }

  /// Sets a gated expert's matrices (any layout given is converted to the stack's: stored
  /// bytes are repacked into panels, a panel matrix given to a stored stack is refused).
  /// Throws config_error / shape_error.
  void set_gated(Index e, QuantMatrix<Format> gate_w, QuantMatrix<Format> up_w,
                 QuantMatrix<Format> down_w) {
    check_expert(e);
    if (!gated_) throw config_error("moe: set_gated called on a plain (non-gated) expert stack");
    gate_[std::size_t(e)] = adopt("gate", e, std::move(gate_w), d_ff_, d_model_);
    up_[std::size_t(e)] = adopt("up", e, std::move(up_w), d_ff_, d_model_);
    down_[std::size_t(e)] = adopt("down", e, std::move(down_w), d_model_, d_ff_);
  }
  /// Sets a plain expert's matrices (wi [d_ff x d_model], wo [d_model x d_ff]).
  void set_plain(Index e, QuantMatrix<Format> wi, QuantMatrix<Format> wo) {
    check_expert(e);
    if (gated_) throw config_error("moe: set_plain called on a gated expert stack");
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

  /// Bytes of codes and scales of all experts.
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const auto& m : gate_) b += m.bytes();
    for (const auto& m : up_) b += m.bytes();
    for (const auto& m : down_) b += m.bytes();
    return b;
  }

 private:
  void check_expert(Index e) const {
    if (e < 0 || e >= num_experts_) {
      throw config_error(
          detail::concat("moe: expert index ", e, " out of range [0, ", num_experts_, ")"));
    }
  }
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

  Index num_experts_ = 0, d_model_ = 0, d_ff_ = 0;
  bool gated_ = true;
  QuantLayout layout_ = QuantLayout::panels;
  std::vector<QuantMatrix<Format>> gate_, up_, down_;
  std::shared_ptr<const ExpertResidency> residency_;
};

}  // namespace moe
