// moe: fp32 experts with their weights packed once, at block construction, into the panel layout
// of the packed GEMM (kernels/gemm_packed.hpp), and the operand through which they supply their
// products to the FFN tasks: SwiGLU (or the plain activation) fused into the input product's
// epilogue, so the [n x 2 d_ff] pre-activation is never written.
#pragma once

#include <cstddef>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "moe/activations.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/kernels/gemm_packed.hpp"
#include "moe/kernels/gemm_packed_epilogue.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// The routed experts of a layer with their weights in the packed GEMM's panel layout.
///
/// Per expert e: w_in(e) the input projection (gated: gate and up interleaved in groups of
/// GemmPackedShape<T>::pair_group columns, kernels::pack_gated_nt; plain: kernels::pack_nt of
/// the d_ff rows), w_out(e) the output projection [d_model x d_ff] packed (kernels::pack_nt).
/// One owned, 64-byte aligned allocation; about the bytes of the fp32 stack (panels padded to
/// whole panels). Immutable after construction; inference only.
template <class T>
class PackedExpertStack {
 public:
  PackedExpertStack() = default;

  /// Packs every expert of s (cost: one pass over the weights).
  static PackedExpertStack from(const ExpertStack<T>& s) {
    PackedExpertStack p;
    p.num_experts_ = s.num_experts();
    p.d_model_ = s.d_model();
    p.d_ff_ = s.d_ff();
    p.gated_ = s.gated();
    const Index d = p.d_model_, f = p.d_ff_;
    const Index in_cols = p.gated_ ? kernels::gemm_packed_gated_cols<T>(f) : f;
    p.in_size_ = kernels::gemm_packed_size<T>(in_cols, d);
    p.out_size_ = kernels::gemm_packed_size<T>(d, f);
    p.data_.resize(std::size_t(p.num_experts_ * (p.in_size_ + p.out_size_)));
    for (Index e = 0; e < p.num_experts_; ++e) {
      T* in = p.data_.data() + e * (p.in_size_ + p.out_size_);
      if (p.gated_) {
        kernels::pack_gated_nt(s.gate(e).data(), d, s.up(e).data(), d, f, d, in);
      } else {
        kernels::pack_nt(s.gate(e).data(), f, d, d, in);
      }
      kernels::pack_nt(s.w_out(e).data(), d, f, f, in + p.in_size_);
    }
    return p;
  }

  Index num_experts() const { return num_experts_; }
  Index d_model() const { return d_model_; }
  Index d_ff() const { return d_ff_; }
  bool gated() const { return gated_; }
  bool empty() const { return num_experts_ == 0; }
  /// Columns of the block's hidden buffer per row (as ExpertStack: 2 d_ff gated, d_ff plain).
  Index in_rows() const { return gated_ ? 2 * d_ff_ : d_ff_; }

  /// Packed input projection of expert e (inner dimension d_model).
  kernels::PackedPanels<T> w_in(Index e) const {
    const Index cols = gated_ ? kernels::gemm_packed_gated_cols<T>(d_ff_) : d_ff_;
    return {data_.data() + e * (in_size_ + out_size_), cols, d_model_};
  }
  /// Packed output projection of expert e (d_model columns, inner dimension d_ff).
  kernels::PackedPanels<T> w_out(Index e) const {
    return {data_.data() + e * (in_size_ + out_size_) + in_size_, d_model_, d_ff_};
  }

  std::size_t bytes() const { return data_.size() * sizeof(T); }

 private:
  Index num_experts_ = 0, d_model_ = 0, d_ff_ = 0;
  bool gated_ = true;
  Index in_size_ = 0, out_size_ = 0;
  std::vector<T, Eigen::aligned_allocator<T>> data_;
};

/// One projection of a packed expert as the FFN tasks see it (the operand interface of
/// experts/operand.hpp), plus fused_input: the input product with the activation in its epilogue.
/// Every product is split-invariant (kernels/gemm_packed.hpp): a row's result does not depend on
/// how the columns are split into tasks, so tasks may be sized from the number of workers.
template <class T>
struct PackedOperand {
  kernels::PackedPanels<T> w;
  bool gated_pairs = false;  ///< w holds gate/up pairs (the gated input projection)

  using Shape = kernels::GemmPackedShape<T>;
  /// Column granule of tasks (in output columns: activations for the input projection): whole
  /// panels, whole gate/up pairs and whole cache lines.
  static constexpr Index granule =
      std::lcm(std::lcm(Index(16), Shape::nr), Shape::gated_granule / 2);
  static constexpr bool split_invariant = true;
  /// The job's x is packed once per forward (prepare_rows) for all its input-phase tasks.
  static constexpr bool prepacks_x = true;

  /// This job's x packed by kernels::gemm_packed_pack_x (gemm_packed_x_size<T>(n, w.k) elements
  /// of the caller's workspace), or nullptr: then each input-phase task packs its own copy.
  T* xpack = nullptr;

  Index weight_bytes() const { return Index(sizeof(T)); }
  /// Few rows: task sizing as for the streaming kernels (the packed kernel's few-row path reads
  /// the weights at the streaming kernel's rate).
  bool streams(Index n) const { return n <= kernels::small_batch_rows; }
  /// Per-worker scratch: the packed rows of x (up to one row block) and the accumulator block.
  Index scratch_floats(Index n) const { return kernels::gemm_packed_scratch_size<T>(n, w.k); }
  /// Whether the input product of n rows reads xpack: whenever the caller bound a region (the
  /// block does when a forward has more than small_batch_rows rows in all: prefill, and batches
  /// like 64 tokens where each of many experts gets a few rows over several column tasks). At
  /// decode each task packs its few rows itself: cheaper than the barrier of a packing pass.
  bool uses_xpack(Index n) const { return xpack != nullptr && n > 0; }
  /// Packs x [n x w.k] into xpack once for all input-phase tasks (no-op unless uses_xpack(n)).
  void prepare_rows(const T* x, Index n, Index ldx) const {
    if (uses_xpack(n)) kernels::gemm_packed_pack_x(x, n, ldx, w.k, xpack);
  }
  /// Where expert e's packed x starts in a region shared by grouped experts (its rows from
  /// `begin`, inner dimension k): each expert's rows rounded up to whole register tiles, so
  /// the regions of consecutive experts never overlap.
  static Index xpack_offset(Index begin, Index e, Index k) { return (begin + e * (Shape::mr - 1)) * k; }
  /// Elements of such a region for `rows` grouped rows over num_experts experts.
  static Index xpack_region_size(Index rows, Index num_experts, Index k) {
    return xpack_offset(rows, num_experts, k);
  }

  /// out[:, c0:c1] = x * W[c0:c1, :]^T (plain packing only).
  void product(const T* x, Index n, Index ldx, Index c0, Index c1, T* out, Index ldo, T* scratch,
               Index scratch_size) const {
    (void)scratch_size;
    kernels::gemm_packed_nt(x, n, ldx, w, c0, c1, kernels::StoreEpilogue<T>{out, ldo}, scratch);
  }
  /// act[:, a:b] = the Ffn's activation of the input product's columns [a, b) (gated: of the
  /// gate and up columns [a, b)); a a multiple of granule, b a multiple of it or d_ff.
  template <class Ffn>
  void fused_input(const T* x, Index n, Index ldx, Index a, Index b, Index d_ff, T* act,
                   Index ld_act, T* scratch) const {
    using A = typename Ffn::activation;
    // Bitwise the same either way (gemm_packed_nt_prepacked's contract); scratch holds the
    // accumulator block first in both.
    auto product = [&](Index c0, Index c1, const auto& epilogue) {
      if (uses_xpack(n)) {
        kernels::gemm_packed_nt_prepacked(xpack, n, w, c0, c1, epilogue, scratch);
      } else {
        kernels::gemm_packed_nt(x, n, ldx, w, c0, c1, epilogue, scratch);
      }
    };
    if constexpr (Ffn::gated) {
      const Index c1 = b >= d_ff ? w.cols : 2 * b;
      if constexpr (std::is_same_v<A, Silu>) {
        product(2 * a, c1, kernels::SwiGluEpilogue<T>{act, ld_act, d_ff});
      } else {
        product(2 * a, c1, kernels::GatedEpilogue<T, A>{act, ld_act, d_ff});
      }
    } else {
      product(a, b, kernels::ActivationEpilogue<T, A>{act, ld_act});
    }
  }
};

}  // namespace moe
