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
#include "moe/experts/quant_expert_stack.hpp"
#include "moe/experts/quant_operand.hpp"
#include "moe/experts/packed_expert_stack.hpp"
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

/// How a compact block multiplies its experts' weights at decode: fast (the default) converts
/// the activations once per job (int8 per block of 32 for Q8 / Q4 / Mxfp4, bf16 for Bf16) and
/// uses the integer / bf16 dot products; exact keeps fp32 activations and decodes the weights in
/// registers, bitwise the fp32 block on the dequantised weights. Int8 and Fp8E4M3 have only the
/// exact products (both modes run them). Prefill (more than kernels::small_batch_rows rows per
/// expert) is the same in both modes.
enum class CompactMode { fast, exact };

namespace detail {
template <class Format>
inline constexpr bool is_quant_format_v =
    std::is_same_v<Format, Q8> || std::is_same_v<Format, Q4> || std::is_same_v<Format, Mxfp4>;

template <class Format, CompactMode Mode, class = void>
struct CompactStackOf {
  using type = CompactExpertStack<Format>;
};
template <>
struct CompactStackOf<Bf16, CompactMode::fast> {
  using type = Bf16FastExpertStack;
};
template <class Format, CompactMode Mode>
struct CompactStackOf<Format, Mode, std::enable_if_t<is_quant_format_v<Format>>> {
  using type = QuantExpertStack<Format, Mode == CompactMode::fast ? QuantLayout::panels
                                                                  : QuantLayout::stored>;
};
}  // namespace detail

/// Storage policy of a block's routed experts: compact weights for float blocks. Format = Bf16,
/// Int8 or Fp8E4M3 (CompactExpertStack, experts/compact_matrix.hpp), or Q8, Q4 or Mxfp4
/// (QuantExpertStack, experts/quant_expert_stack.hpp; d_model and d_ff multiples of 32). Mode:
/// CompactMode above. The router, the routing weights, the shared expert, activations and
/// accumulation stay fp32. Inference only: block_backward does not accept such a block (it does
/// not compile).
template <class Format, CompactMode Mode = CompactMode::fast>
struct CompactExperts {
  static_assert(std::is_same_v<Format, Bf16> || std::is_same_v<Format, Int8> ||
                    std::is_same_v<Format, Fp8E4M3> || detail::is_quant_format_v<Format>,
                "moe: CompactExperts<Format> needs Format = Bf16, Int8, Fp8E4M3, Q8, Q4 or Mxfp4");
  using format = Format;
  static constexpr CompactMode mode = Mode;
  template <class T>
  using stack = typename detail::CompactStackOf<Format, Mode>::type;
  static constexpr bool compact = true;
};

/// Storage policy of a block's routed experts: fp32 weights packed once, at construction, into
/// the packed GEMM's panel layout (PackedExpertStack<float>, experts/packed_expert_stack.hpp):
/// prefill near the FMA peak with the activation fused into the input product, decode at the
/// streaming kernel's rate. The fp32 stack is freed after packing. Like compact storage, the
/// block converts and owns the stack (hence compact = true), float blocks only, inference only.
struct PackedExperts {
  template <class T>
  using stack = PackedExpertStack<T>;
  static constexpr bool compact = true;
};

/// The operands of expert e of a packed stack: gate holds the whole input projection (gate/up
/// pairs when gated; its fused_input computes the activations), down the output projection.
template <class T>
ExpertOperands<PackedOperand<T>> expert_operands(const PackedExpertStack<T>& s, Index e) {
  ExpertOperands<PackedOperand<T>> ops;
  ops.gate = {s.w_in(e), s.gated()};
  ops.up = {s.w_in(e), s.gated()};
  ops.down = {s.w_out(e), false};
  return ops;
}

/// Per-worker scratch of a packed stack's products of up to max_rows rows (packed x rows and
/// the accumulator block of the wider inner dimension).
template <class T>
Index decode_scratch_floats(const PackedExpertStack<T>& s, Index max_rows) {
  if (s.empty() || max_rows <= 0) return 0;
  const PackedOperand<T> in{s.w_in(0), s.gated()}, out{s.w_out(0), false};
  return std::max(in.scratch_floats(max_rows), out.scratch_floats(max_rows));
}

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

/// The operands of expert e of a fast bf16 stack; their inputs are bound per job by
/// grouped_expert_job (experts/grouped.hpp).
inline ExpertOperands<Bf16FastOperand> expert_operands(const Bf16FastExpertStack& s, Index e) {
  ExpertOperands<Bf16FastOperand> ops;
  ops.gate.w = s.gate(e).kernel_view();
  if (s.gated()) ops.up.w = s.up(e).kernel_view();
  ops.down.w = s.w_out(e).kernel_view();
  return ops;
}

/// The operands of expert e of a block-quantised stack: fast (panels) or exact (stored layout).
/// Their inputs (fast mode) are bound per job by bind_prepared_inputs.
template <class Format, QuantLayout L>
ExpertOperands<QuantOperand<Format>> expert_operands(const QuantExpertStack<Format, L>& s,
                                                     Index e) {
  ExpertOperands<QuantOperand<Format>> ops;
  auto set = [&](QuantOperand<Format>& op, const QuantMatrix<Format>& m) {
    op.exact = m.layout() == QuantLayout::stored;
    op.cols = m.cols();
    if (op.exact) {
      op.stored = m.stored();
    } else {
      op.panels = m.panels();
    }
  };
  set(ops.gate, s.gate(e));
  if (s.gated()) set(ops.up, s.up(e));
  set(ops.down, s.w_out(e));
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

/// Block-quantised: one decoded tile of 256 rows once an expert gets more than
/// kernels::small_batch_rows rows (prefill), else 0.
template <class Format, QuantLayout L>
Index decode_scratch_floats(const QuantExpertStack<Format, L>& s, Index max_rows) {
  if (max_rows <= kernels::small_batch_rows) return 0;
  return kernels::gemm_quant_scratch_floats(std::max(s.d_model(), s.d_ff()));
}

/// Bytes per grouped row of the converted inputs a stack's fast operands read (the row's x for
/// gate / up, its activations for down): 0 unless the stack prepares its inputs.
template <class Stack>
Index prepared_bytes_per_row(const Stack& s) {
  (void)s;
  return 0;
}
template <class Format>
Index prepared_bytes_per_row(const QuantExpertStack<Format, QuantLayout::panels>& s) {
  return Index(kernels::activations_i8_bytes(1, s.d_model()) +
               kernels::activations_i8_bytes(1, s.d_ff()));
}
/// Fast bf16: x and the activations rounded to bf16, rows padded to 32 values.
inline Index prepared_bytes_per_row(const Bf16FastExpertStack& s) {
  return Bf16FastOperand::input_bytes_per_row(s.d_model()) +
         Bf16FastOperand::input_bytes_per_row(s.d_ff());
}

/// Bytes of GroupedRows::prepared for `rows` grouped rows of a stack (what the block reserves).
template <class Stack>
Index prepared_bytes(const Stack& s, Index rows) {
  return rows * prepared_bytes_per_row(s);
}
/// Packed: each expert's x packed once per forward for its input-phase tasks, when the forward
/// has more than kernels::small_batch_rows rows in all; 0 at decode.
template <class T>
Index prepared_bytes(const PackedExpertStack<T>& s, Index rows) {
  if (rows <= kernels::small_batch_rows || s.empty()) return 0;
  return PackedOperand<T>::xpack_region_size(rows, s.num_experts(), s.d_model()) *
         Index(sizeof(T));
}

/// Called by the block after routing, before the expert products (counts[e]: rows routed to
/// expert e): nothing for stacks that own their memory (fp32, packed).
template <class Stack>
void note_routed(const Stack& s, const Index* counts) {
  (void)s, (void)counts;
}

/// Compact and block-quantised stacks loaded from a checkpoint: usage counters and, for mapped
/// views, a read-ahead hint for the chosen experts' pages (ExpertResidency::routed). Nothing
/// otherwise.
template <class Format>
void note_routed(const CompactExpertStack<Format>& s, const Index* counts) {
  if (s.residency() != nullptr) s.residency()->routed(counts);
}
template <class Format, QuantLayout L>
void note_routed(const QuantExpertStack<Format, L>& s, const Index* counts) {
  if (s.residency() != nullptr) s.residency()->routed(counts);
}
inline void note_routed(const Bf16FastExpertStack& s, const Index* counts) {
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
