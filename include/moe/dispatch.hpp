// moe: the two data movements around the grouped experts, router-free: gather (token rows into
// expert-grouped rows, by a DispatchPlan) and the weighted combine (expert outputs back into token
// rows, in slot order, plus an optional shared expert).
#pragma once

#include <algorithm>

#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe {

/// x_rows [plan.num_rows x d_model] (row-major, row stride d_model): row r = x[plan.row_token[r]].
/// x: [num_tokens x d_model] row-major. A copy of N * d_model values, cheap next to the expert
/// products, so it runs on the caller. No allocation.
template <class T>
void gather_rows(const MatrixRef<T>& x, const DispatchPlan& plan, T* x_rows) {
  const Index d = x.cols(), N = plan.num_rows;
  for (Index r = 0; r < N; ++r) {
    const T* src = x.data() + plan.row_token[static_cast<std::size_t>(r)] * x.outerStride();
    std::copy(src, src + d, x_rows + r * d);
  }
}

/// The weighted combine: for every token t of y [num_tokens x d_model],
///   y[t] = sum_{j < slots, executed} weights(t, j) * y_rows[plan.slot_row[t * slots + j]]
///          (+ shared_scale[t] * shared_y[t] when shared_y is given)
/// summed in slot order (descending weight), the shared expert last: one order for every batch
/// size and executor. weights: [num_tokens x slots] routing weights (Routing::weights()); y_rows
/// [plan.num_rows x d_model] the experts' unweighted outputs (row stride d_model); shared_y
/// [num_tokens x d_model] and shared_scale [num_tokens] (the shared expert's output and gate, 1
/// without a gate), or both nullptr. Runs as chunks of 32 tokens through the executor; no
/// allocation.
template <class T, class S>
void combine_expert_outputs(const DispatchPlan& plan, const ConstMap<S>& weights, const T* y_rows,
                            const T* shared_y, const T* shared_scale, MatrixMut<T> y,
                            const Executor& executor = serial_executor()) {
  const Index num_tokens = y.rows(), d = y.cols(), slots = plan.slots;
  constexpr Index kChunk = 32;
  executor.run((num_tokens + kChunk - 1) / kChunk, [&](Index task, Index) {
    const Index t0 = task * kChunk, t1 = std::min(num_tokens, t0 + kChunk);
    for (Index t = t0; t < t1; ++t) {
      auto yr = y.row(t);
      yr.setZero();
      for (Index j = 0; j < slots; ++j) {
        const Index r = plan.slot_row[static_cast<std::size_t>(t * slots + j)];
        if (r < 0) continue;
        yr += static_cast<T>(weights(t, j)) * ConstMap<T>(y_rows + r * d, 1, d);
      }
      if (shared_y != nullptr) yr += shared_scale[t] * ConstMap<T>(shared_y + t * d, 1, d);
    }
  });
}

}  // namespace moe
