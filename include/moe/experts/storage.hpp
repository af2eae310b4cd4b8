// moe: storage policies of a block's routed experts, and what each supplies to the block: its
// stack type, the weight operands of expert e (experts/operand.hpp), and the per-worker scratch
// its products need. A new format adds a policy (or a Format for CompactExperts), an operand and
// an overload of expert_operands / decode_scratch_floats here; the block does not change.
#pragma once

#include <algorithm>
#include <type_traits>

#include "moe/experts/compact_expert_stack.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/experts/operand.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Storage policy of a block's routed experts: the block's own scalar T (ExpertStack<T>, the
/// default; the only policy that supports training / block_backward).
struct NativeExperts {
  template <class T>
  using stack = ExpertStack<T>;
  static constexpr bool compact = false;
};

/// Storage policy of a block's routed experts: compact weights (CompactExpertStack<Format>,
/// Format = Bf16, Int8 or Fp8E4M3; experts/compact_matrix.hpp), for float blocks. The router, the
/// routing weights, the shared expert, activations and accumulation stay fp32. Inference only:
/// block_backward does not accept such a block (it does not compile).
template <class Format>
struct CompactExperts {
  static_assert(std::is_same_v<Format, Bf16> || std::is_same_v<Format, Int8> ||
                    std::is_same_v<Format, Fp8E4M3>,
                "moe: CompactExperts<Format> needs Format = Bf16, Int8 or Fp8E4M3");
  using format = Format;
  template <class T>
  using stack = CompactExpertStack<Format>;
  static constexpr bool compact = true;
};

/// The operands of expert e of an fp32 (or double) stack: gate and up are row ranges of the
/// fused input projection w_in(e), down is w_out(e).
template <class T>
ExpertOperands<DenseOperand<T>> expert_operands(const ExpertStack<T>& s, Index e) {
  const Index d = s.d_model(), f = s.d_ff();
  const T* w_in = s.w_in(e).data();
  ExpertOperands<DenseOperand<T>> ops;
  ops.gate = {w_in, d};
  if (s.gated()) ops.up = {w_in + f * d, d};
  ops.down = {s.w_out(e).data(), f};
  return ops;
}

/// The operands of expert e of a compact stack (kernel views of its matrices).
template <class Format>
ExpertOperands<CompactOperand<Format>> expert_operands(const CompactExpertStack<Format>& s,
                                                       Index e) {
  ExpertOperands<CompactOperand<Format>> ops;
  ops.gate.w = s.gate(e).kernel_view();
  if (s.gated()) ops.up.w = s.up(e).kernel_view();
  ops.down.w = s.w_out(e).kernel_view();
  return ops;
}

/// Per-worker scratch floats the experts of a stack need when no expert gets more than max_rows
/// rows: 0 for fp32 weights (nothing to decode).
template <class T>
Index decode_scratch_floats(const ExpertStack<T>& s, Index max_rows) {
  (void)s, (void)max_rows;
  return 0;
}

/// Compact: one decoded tile of 256 rows of the widest projection (256 max(d_model, d_ff)
/// floats) once an expert gets more than kernels::small_batch_rows rows (prefill), else 0.
template <class Format>
Index decode_scratch_floats(const CompactExpertStack<Format>& s, Index max_rows) {
  if (max_rows <= kernels::small_batch_rows) return 0;
  return kernels::gemm_compact_scratch_floats(std::max(s.d_model(), s.d_ff()));
}

/// Called by the block after routing, before the expert products (counts[e]: rows routed to
/// expert e): nothing for fp32 stacks (owned memory).
template <class T>
void note_routed(const ExpertStack<T>& s, const Index* counts) {
  (void)s, (void)counts;
}

/// Compact stacks loaded from a checkpoint: usage counters and, for mapped views, a read-ahead
/// hint for the chosen experts' pages (ExpertResidency::routed). Nothing otherwise.
template <class Format>
void note_routed(const CompactExpertStack<Format>& s, const Index* counts) {
  if (s.residency() != nullptr) s.residency()->routed(counts);
}

namespace detail {

/// What a block with native storage holds in place of a compact stack.
struct NoCompactStack {};

template <class S, class = void>
struct is_storage_policy : std::false_type {};
template <class S>
struct is_storage_policy<S, std::void_t<typename S::template stack<float>>> : std::true_type {};

template <class F, class = void>
struct is_ffn_kind : std::false_type {};
template <class F>
struct is_ffn_kind<F, std::void_t<typename F::activation, decltype(F::gated)>> : std::true_type {};

}  // namespace detail

/// True for a storage policy (NativeExperts, CompactExperts<Format>).
template <class S>
inline constexpr bool is_storage_policy_v = detail::is_storage_policy<S>::value;
/// True for an FFN kind (SwiGLU, GeGLU, ReluMlp, Gated<A>, Plain<A>).
template <class F>
inline constexpr bool is_ffn_kind_v = detail::is_ffn_kind<F>::value;

}  // namespace moe
