// moe: the one place where expert parallelism touches the block's internals: run a rank's experts
// on the rows it received, grouped by expert (core's GroupedRows), together with the shared expert
// on the rank's own tokens, through the same FFN tasks as SparseMoeBlock, so every expert sees the
// same kernels on the same rows; then the block's weighted combine (moe/dispatch.hpp).
#pragma once

#include <algorithm>

#include "moe/detail/buffer.hpp"
#include "moe/dispatch.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/experts/ffn_tasks.hpp"
#include "moe/experts/grouped.hpp"
#include "moe/experts/storage.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe::distributed::detail {

/// Grow-only scratch of run_local_experts.
template <class T>
struct LocalExpertScratch {
  moe::detail::GrowBuffer<T> hidden;          ///< [rows x in_rows]
  moe::detail::GrowBuffer<T> act;             ///< [rows x d_ff] activations (training only)
  moe::detail::GrowBuffer<T> shared_hidden;   ///< [tokens x shared in_rows]
  moe::detail::GrowBuffer<T> shared_act;      ///< [tokens x shared d_ff] (training only)
  moe::detail::GrowBuffer<T> shared_gate;     ///< [tokens] the shared expert's scale
  moe::detail::GrowBuffer<T> decode;          ///< per-worker decode scratch (compact prefill)
  moe::detail::GrowBuffer<unsigned char> prepared;  ///< converted inputs (fast compact modes)
  moe::detail::GrowBuffer<Index> task_begin;  ///< [local experts + 2]

  std::size_t bytes() const {
    return hidden.bytes() + act.bytes() + shared_hidden.bytes() + shared_act.bytes() +
           shared_gate.bytes() + decode.bytes() + prepared.bytes() + task_begin.bytes();
  }
};

/// Runs local expert i of `experts` (ExpertStack<T> or CompactExpertStack<Format>, the rank's
/// experts only) on its counts[i] rows of x_rows ([rows x d] row-major, expert i's rows from
/// offsets[i]), writing y_rows (same layout); and, when `shared` holds an expert, the shared
/// expert on the tokens x into shared_y [tokens x d]. Inference writes the activations over the
/// pre-activations; training keeps both (s.act [rows x d_ff], s.shared_act [tokens x shared
/// d_ff]) for the backward, as the block's training mode does. The jobs and their task split are
/// the block's (grouped_expert_job, expert_job, run_ffn_jobs).
template <class Ffn, class T, class Stack>
void run_local_experts(const Stack& experts, const Index* counts, const Index* offsets,
                       const T* x_rows, T* y_rows, const ExpertStack<T>& shared,
                       const MatrixRef<T>& x, T* shared_y, LocalExpertScratch<T>& s, bool training,
                       const Executor& executor) {
  const Index num_local = experts.num_experts();
  const Index rows_total = num_local > 0 ? offsets[num_local] : 0;
  GroupedRows<T> rows;
  rows.x = x_rows;
  rows.offsets = offsets;
  rows.counts = counts;
  rows.hidden = s.hidden.ensure(rows_total * experts.in_rows());
  rows.act = training ? s.act.ensure(rows_total * experts.d_ff()) : rows.hidden;
  rows.ld_act = training ? experts.d_ff() : experts.in_rows();
  rows.y = y_rows;
  const Index max_rows = num_local > 0 ? *std::max_element(counts, counts + num_local) : 0;
  rows.scratch_stride = num_local > 0 ? decode_scratch_floats(experts, max_rows) : 0;
  if (rows.scratch_stride > 0) {
    rows.scratch = s.decode.ensure(executor.num_workers() * rows.scratch_stride);
  }
  // Fast compact modes (bf16, Q8 / Q4 / Mxfp4): the rows' x and activations converted once.
  const Index prepared = prepared_bytes(experts, rows_total);
  if (prepared > 0) rows.prepared = s.prepared.ensure(prepared);
  const bool has_shared = shared.num_experts() > 0 && x.rows() > 0;
  T* s_hidden = has_shared ? s.shared_hidden.ensure(x.rows() * shared.in_rows()) : nullptr;
  using SharedJob = decltype(moe::detail::expert_job(shared, Index(0), x.data(), Index(0), Index(0),
                                                     s_hidden, s_hidden, Index(0), shared_y));
  SharedJob shared_job{};
  if (has_shared) {
    T* s_act = training ? s.shared_act.ensure(x.rows() * shared.d_ff()) : s_hidden;
    shared_job =
        moe::detail::expert_job(shared, 0, x.data(), x.outerStride(), x.rows(), s_hidden, s_act,
                                training ? shared.d_ff() : shared.in_rows(), shared_y);
  }
  moe::detail::run_ffn_jobs<Ffn>(
      num_local, [&](Index e) { return moe::detail::grouped_expert_job(experts, rows, e); },
      has_shared ? 1 : 0, [&](Index) { return shared_job; }, s.task_begin.ensure(num_local + 2),
      executor);
}

/// The shared expert's scale per token, as SparseMoeBlock computes it: sigmoid(x[t] .
/// shared_gate) with Qwen2-MoE's gate, else 1. Returns s.shared_gate's [tokens] values.
template <class T>
const T* shared_scales(const MatrixRef<T>& x, const RowMatrix<T>& shared_gate, bool gated,
                       LocalExpertScratch<T>& s) {
  T* scale = s.shared_gate.ensure(x.rows());
  for (Index t = 0; t < x.rows(); ++t) {
    scale[t] = gated ? kernels::sigmoid<T>(x.row(t).dot(shared_gate.row(0))) : T(1);
  }
  return scale;
}

}  // namespace moe::distributed::detail
