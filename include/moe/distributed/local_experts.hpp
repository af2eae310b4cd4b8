// moe: the one place where expert parallelism touches the block's internals: run a rank's
// experts on rows grouped by expert (plus the shared expert on the rank's tokens), through the
// same FFN tasks as SparseMoeBlock, so every expert sees the same kernels on the same rows.
// When the core refactor exposes its public grouped-experts function, only this file changes.
#pragma once

#include <algorithm>
#include <type_traits>

#include "moe/block.hpp"
#include "moe/compact.hpp"
#include "moe/detail/buffer.hpp"
#include "moe/expert.hpp"
#include "moe/kernels/gemm_compact.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe::distributed::detail {

/// Grow-only scratch of run_local_experts.
template <class T>
struct LocalExpertScratch {
  moe::detail::GrowBuffer<T> hidden;          ///< [rows x in_rows]
  moe::detail::GrowBuffer<T> shared_hidden;   ///< [tokens x shared in_rows]
  moe::detail::GrowBuffer<T> compact_tiles;   ///< per-worker decoded weight tiles (compact prefill)
  moe::detail::GrowBuffer<Index> task_begin;  ///< [jobs + 1]

  std::size_t bytes() const {
    return hidden.bytes() + shared_hidden.bytes() + compact_tiles.bytes() + task_begin.bytes();
  }
};

/// Runs local expert i of `experts` (ExpertStack<T>, Format = void; or CompactExpertStack<Format>)
/// on the
/// counts[i] rows x_rows[offsets[i] ...) ([rows x d] row-major), writing y_rows (same layout),
/// and, when `shared` holds an expert, the shared expert on the tokens x into shared_y [tokens x
/// d]. Inference only (activations in place). The task list is the block's (detail::run_ffn_jobs
/// with the same jobs): the same rows in the same order give the same bits.
template <class Ffn, class T, class Format, class Stack>
void run_local_experts(const Stack& experts, const Index* counts, const Index* offsets,
                       Index num_local, const T* x_rows, T* y_rows, const ExpertStack<T>& shared,
                       const MatrixRef<T>& x, T* shared_y, LocalExpertScratch<T>& s,
                       const Executor& executor) {
  constexpr bool compact = !std::is_void_v<Format>;
  const Index d = x.cols(), rows = num_local > 0 ? offsets[num_local] : 0;
  const Index f = experts.d_ff(), in = experts.in_rows();
  T* hidden = s.hidden.ensure(rows * in);
  const bool has_shared = shared.num_experts() > 0 && x.rows() > 0;
  const Index fs = shared.d_ff(), in_s = shared.in_rows();
  T* s_hidden = has_shared ? s.shared_hidden.ensure(x.rows() * in_s) : nullptr;
  T* tiles = nullptr;
  Index tile_stride = 0;
  if constexpr (compact) {
    bool prefill = false;
    for (Index i = 0; i < num_local; ++i) {
      prefill = prefill || counts[i] > moe::detail::compact_small_rows;
    }
    if (prefill) {
      tile_stride = kernels::gemm_compact_scratch_floats(std::max(d, f));
      tiles = s.compact_tiles.ensure(executor.num_workers() * tile_stride);
    }
  }
  auto job_at = [&](Index j) {
    moe::detail::FfnJob<T, Format> job;
    job.d = d;
    if (j < num_local) {
      const Index begin = offsets[j];
      job.x = x_rows + begin * d;
      job.ldx = d;
      job.n = counts[j];
      if constexpr (compact) {
        job.c_gate = &experts.gate(j);
        if constexpr (Ffn::gated) job.c_up = &experts.up(j);
        job.c_out = &experts.w_out(j);
        job.scratch = tiles;
        job.scratch_stride = tile_stride;
      } else {
        job.w_in = experts.w_in(j).data();
        job.w_out = experts.w_out(j).data();
      }
      job.f = f;
      job.in = in;
      job.hidden = hidden + begin * in;
      job.act = job.hidden;
      job.ld_act = in;
      job.y = y_rows + begin * d;
    } else {
      job.x = x.data();
      job.ldx = x.outerStride();
      job.n = x.rows();
      job.w_in = shared.w_in(0).data();
      job.w_out = shared.w_out(0).data();
      job.f = fs;
      job.in = in_s;
      job.hidden = s_hidden;
      job.act = s_hidden;
      job.ld_act = in_s;
      job.y = shared_y;
    }
    return job;
  };
  const Index num_jobs = num_local + (has_shared ? 1 : 0);
  moe::detail::run_ffn_jobs<Ffn, T>(num_jobs, job_at, s.task_begin.ensure(num_jobs + 1), executor);
}

}  // namespace moe::distributed::detail
