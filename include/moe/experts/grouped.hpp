// moe: the grouped experts: every expert of a stack on its own contiguous rows, router-free. The
// block calls it between gather and combine (moe/dispatch.hpp); an expert-parallel block calls it
// on the rows it received for its local experts.
#pragma once

#include <type_traits>
#include <utility>

#include "moe/experts/ffn_tasks.hpp"
#include "moe/experts/storage.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe {

/// Rows already grouped by expert and the buffers the experts write, all row-major, with
/// N = offsets[E] rows in all and in_rows = 2 d_ff (gated) or d_ff (plain):
///   x [N x d_model]: the rows of expert e are [offsets[e], offsets[e] + counts[e]);
///   hidden [N x in_rows]: pre-activations (kept for backward);
///   act: activations [N x d_ff], row stride ld_act; may be `hidden` with ld_act = in_rows
///        (in place over the gate columns, inference);
///   y [N x d_model]: each row's expert output, unweighted;
///   scratch: per-worker decode scratch, scratch_stride floats per executor worker, at least
///        decode_scratch_floats(stack, max_e counts[e]) (nullptr when that is 0).
template <class T>
struct GroupedRows {
  const T* x = nullptr;
  const Index* offsets = nullptr;  ///< [E] first row of each expert
  const Index* counts = nullptr;   ///< [E] rows of each expert
  T* hidden = nullptr;
  T* act = nullptr;
  Index ld_act = 0;
  T* y = nullptr;
  T* scratch = nullptr;
  Index scratch_stride = 0;
  /// Stacks whose operands read converted inputs (prepared_bytes_per_row(stack) > 0): N rows of
  /// converted x, then N rows of converted activations (nullptr otherwise).
  unsigned char* prepared = nullptr;
};

namespace detail {

/// Whether a stack may hold expert biases (in_bias(e) / out_bias(e), nullptr when it has none):
/// fp32 and compact stacks; not packed ones, whose fused epilogue has no bias term.
template <class Stack, class = void>
struct has_expert_biases : std::false_type {};
template <class Stack>
struct has_expert_biases<Stack, std::void_t<decltype(std::declval<const Stack&>().in_bias(Index()))>>
    : std::true_type {};

/// The FFN job of expert e of a stack on n rows (see FfnJob for the layouts).
template <class Stack, class T>
auto expert_job(const Stack& experts, Index e, const T* x, Index ldx, Index n, T* hidden, T* act,
                Index ld_act, T* y, T* scratch = nullptr, Index scratch_stride = 0) {
  const auto ops = expert_operands(experts, e);
  FfnJob<T, std::decay_t<decltype(ops.gate)>> job;
  job.x = x;
  job.ldx = ldx;
  job.n = n;
  job.gate = ops.gate;
  job.up = ops.up;
  job.down = ops.down;
  job.d = experts.d_model();
  job.f = experts.d_ff();
  job.in = experts.in_rows();
  job.hidden = hidden;
  job.act = act;
  job.ld_act = ld_act;
  job.y = y;
  job.scratch = scratch;
  job.scratch_stride = scratch_stride;
  if constexpr (has_expert_biases<Stack>::value) {
    job.in_bias = experts.in_bias(e);
    job.out_bias = experts.out_bias(e);
  }
  return job;
}

/// The job of expert e on its rows of `rows`; operands that read converted inputs get their
/// rows' regions of rows.prepared (x for gate and up, the activations for down).
template <class Stack, class T>
auto grouped_expert_job(const Stack& experts, const GroupedRows<T>& rows, Index e) {
  const Index begin = rows.offsets[e], d = experts.d_model();
  auto job = expert_job(experts, e, rows.x + begin * d, d, rows.counts[e],
                        rows.hidden + begin * experts.in_rows(), rows.act + begin * rows.ld_act,
                        rows.ld_act, rows.y + begin * d, rows.scratch, rows.scratch_stride);
  using Operand = decltype(job.gate);
  if constexpr (prepacks_x_v<Operand>) {
    if (rows.prepared != nullptr) {  // else each input-phase task packs its own copy of x
      job.gate.xpack = reinterpret_cast<T*>(rows.prepared) + Operand::xpack_offset(begin, e, d);
    }
  }
  if constexpr (prepares_input_v<Operand>) {
    if (rows.prepared == nullptr) return job;  // no operand of this stack reads converted inputs
    const Index N = rows.offsets[experts.num_experts() - 1] + rows.counts[experts.num_experts() - 1];
    const Index bx = Operand::input_bytes_per_row(job.d), ba = Operand::input_bytes_per_row(job.f);
    job.gate.bind_input(rows.prepared + begin * bx, job.n, job.d);
    job.up.bind_input(rows.prepared + begin * bx, job.n, job.d);  // gate's rows, converted once
    job.down.bind_input(rows.prepared + N * bx + begin * ba, job.n, job.f);
  }
  return job;
}

/// One FFN (expert e of the stack) on n rows through the same tasks as the block: x [n x d] (row
/// stride ldx), hidden [n x in_rows], act [n x d_ff] (row stride ld_act; may be hidden's gate
/// columns), y [n x d]. What a dense FFN calls to give the block's results bitwise.
template <class Ffn, class T>
void ffn_forward(const ExpertStack<T>& w, Index e, const T* x, Index ldx, Index n, T* hidden,
                 T* act, Index ld_act, T* y, const Executor& executor = serial_executor()) {
  const auto job = expert_job(w, e, x, ldx, n, hidden, act, ld_act, y);
  Index task_begin[2];
  run_ffn_jobs<Ffn>(
      1, [&](Index) { return job; }, task_begin, executor);
}

}  // namespace detail

/// Runs every expert e of `experts` (an ExpertStack<T> or a CompactExpertStack<Format>) on its
/// rows of `rows`: rows.y[r] = FFN_e(rows.x[r]) for r in [offsets[e], offsets[e] + counts[e]).
/// Ffn: the expert kind (SwiGLU, ...), matching experts.gated(). task_begin: caller-owned
/// scratch of num_experts + 1 indices. Tasks are (expert, column-block) pairs whose split depends
/// on the shapes only: bitwise the same result for every executor, and the same as the block's
/// experts. Streaming products (at most kernels::small_batch_rows rows, or x small enough)
/// allocate nothing; Eigen's GEMM may allocate its packing buffers. Validate before calling:
/// nothing here throws (MOE_ASSERT in debug builds).
template <class Ffn, class Stack, class T>
void run_grouped_experts(const Stack& experts, const GroupedRows<T>& rows, Index* task_begin,
                         const Executor& executor = serial_executor()) {
  detail::run_ffn_jobs<Ffn>(
      experts.num_experts(), [&](Index e) { return detail::grouped_expert_job(experts, rows, e); },
      task_begin, executor);
}

}  // namespace moe
