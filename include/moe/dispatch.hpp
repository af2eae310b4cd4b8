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
/// x: [num_tokens x d_model] row-major. A copy of N * d_model values, in chunks of rows on
/// `executor`: serial, it took 3.1-3.3 ms of a 54-56 ms olmoe / qwen3 forward at 512 tokens on
/// 16 threads (server, 2026-12-01), a bound on the scaling. No allocation.
template <class T>
void gather_rows(const MatrixRef<T>& x, const DispatchPlan& plan, T* x_rows,
                 const Executor& executor = serial_executor()) {
  const Index d = x.cols(), N = plan.num_rows;
  constexpr Index chunk = 64;
  const Index tasks = executor.num_workers() > 1 ? (N + chunk - 1) / chunk : 1;
  executor.run(tasks, [&](Index task, Index) {
    const Index r0 = tasks == 1 ? 0 : task * chunk, r1 = tasks == 1 ? N : std::min(N, r0 + chunk);
    for (Index r = r0; r < r1; ++r) {
      const T* src = x.data() + plan.row_token[static_cast<std::size_t>(r)] * x.outerStride();
      std::copy(src, src + d, x_rows + r * d);
    }
  });
}

/// What a family changes in the combine (defaults: the plain weighted sum plus the shared expert).
template <class T>
struct CombineOptions {
  bool unit_weights = false;       ///< Llama 4: the weights were applied to the expert inputs
  T routed_scale = T(1);           ///< the routed sum times this (Laguna, Step-3.x)
  const T* routed_bias = nullptr;  ///< [d_model] added to the routed sum (JetMoE), or nullptr
  bool shared_average = false;     ///< (routed + shared) / 2 (Cohere2 MoE "average")
  bool float32 = false;            ///< routed and shared rounded to float and added in float
};

/// The weighted combine: for every token t of y [num_tokens x d_model],
///   routed[t] = sum_{j < slots, executed} weights(t, j) * y_rows[plan.slot_row[t * slots + j]]
///   y[t] = routed[t] * routed_scale + routed_bias  (+ shared_scale[t] * shared_y[t])  (/ 2)
/// summed in slot order (descending weight), the shared expert last: one order for every batch
/// size and executor. weights: [num_tokens x slots] routing weights (Routing::weights()); y_rows
/// [plan.num_rows x d_model] the experts' unweighted outputs (row stride d_model); shared_y
/// [num_tokens x d_model] and shared_scale [num_tokens] (the shared expert's output and gate, 1
/// without a gate), or both nullptr. options: see CombineOptions (the defaults are the plain
/// combine, bitwise). Runs as chunks of 32 tokens through the executor; no allocation.
template <class T, class S>
void combine_expert_outputs(const DispatchPlan& plan, const ConstMap<S>& weights, const T* y_rows,
                            const T* shared_y, const T* shared_scale, MatrixMut<T> y,
                            const Executor& executor = serial_executor(),
                            const CombineOptions<T>& options = {}) {
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
        if (options.unit_weights) {
          yr += ConstMap<T>(y_rows + r * d, 1, d);
        } else {
          yr += static_cast<T>(weights(t, j)) * ConstMap<T>(y_rows + r * d, 1, d);
        }
      }
      if (options.routed_scale != T(1)) yr *= options.routed_scale;
      if (options.routed_bias != nullptr) yr += ConstMap<T>(options.routed_bias, 1, d);
      if (shared_y != nullptr) {
        if (options.float32) {
          for (Index c = 0; c < d; ++c) {
            yr[c] = static_cast<T>(static_cast<float>(yr[c]) +
                                   static_cast<float>(shared_scale[t] * shared_y[t * d + c]));
          }
        } else {
          yr += shared_scale[t] * ConstMap<T>(shared_y + t * d, 1, d);
        }
      }
      if (options.shared_average) yr *= T(0.5);
    }
  });
}

}  // namespace moe
