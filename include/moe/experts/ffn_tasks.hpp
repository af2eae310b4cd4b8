// moe: the FFN task scheduler: one FFN on n rows (a routed expert on its gathered rows, the shared
// expert on the tokens, a dense FFN) as (job, column-block) tasks in two phases, input projection
// + activation then output projection, generic over the weight operand (experts/operand.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>

#include "moe/activations.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/experts/operand.hpp"
#include "moe/kernels/activation.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe::detail {

/// One FFN applied to n rows, all row-major:
///   x [n x d] (row stride ldx), hidden [n x in] (row stride in, in = 2 f gated, f plain),
///   act [n x f] (row stride ld_act; may be hidden's gate columns), y [n x d] (row stride d);
///   gate, up (gated only) and down: the weight operands. scratch: scratch_stride floats per
///   executor worker (worker w at scratch + w * scratch_stride), at least the operands'
///   scratch_floats(n); nullptr when they need none.
template <class T, class Operand>
struct FfnJob {
  const T* x = nullptr;
  Index ldx = 0, n = 0;
  Operand gate{}, up{}, down{};
  Index d = 0, f = 0, in = 0;
  T* hidden = nullptr;
  T* act = nullptr;
  Index ld_act = 0;
  T* y = nullptr;
  T* scratch = nullptr;
  Index scratch_stride = 0;
  const T* in_bias = nullptr;   ///< [in] added to hidden before the activation, or nullptr
  const T* out_bias = nullptr;  ///< [d] added to y, or nullptr
  GluOptions glu{};             ///< clamp / offset / slope of a gated FFN (plain: the fast kernel)
};

/// Column granule of every task: a multiple of the small kernels' register tiles and of a cache
/// line of floats, so tasks write whole lines and only the last block has a partial tile.
inline constexpr Index ffn_granule = 16;

/// Operands that read their input converted once per job (experts/quant_operand.hpp) declare
/// prepares_input = true and provide prepare_rows / prepare_cols and a column granule.
template <class Operand, class = void>
struct prepares_input : std::false_type {};
template <class Operand>
struct prepares_input<Operand, std::enable_if_t<Operand::prepares_input>> : std::true_type {};
template <class Operand>
inline constexpr bool prepares_input_v = prepares_input<Operand>::value;

/// Operands whose x is packed once per job for all its input-phase tasks (packed weights) declare
/// prepacks_x = true and provide prepare_rows and uses_xpack(n).
template <class Operand, class = void>
struct prepacks_x : std::false_type {};
template <class Operand>
struct prepacks_x<Operand, std::enable_if_t<Operand::prepacks_x>> : std::true_type {};
template <class Operand>
inline constexpr bool prepacks_x_v = prepacks_x<Operand>::value;

/// Granule of the input phase's column blocks: also a whole number of the down operand's
/// conversion blocks, so that each task converts the activation columns it computed.
/// Column granule of an operand's tasks: Operand::granule when it has one (the packed operand:
/// whole panels and gate/up pairs), else ffn_granule.
template <class Operand, class = void>
struct operand_granule {
  static constexpr Index value = ffn_granule;
};
template <class Operand>
struct operand_granule<Operand, std::void_t<decltype(Operand::granule)>> {
  static constexpr Index value = Operand::granule;
};

/// Whether an operand's products are split-invariant (a row's result does not depend on how its
/// columns are split into tasks): then tasks may be sized from the number of workers.
template <class Operand, class = void>
struct operand_split_invariant : std::false_type {};
template <class Operand>
struct operand_split_invariant<Operand, std::void_t<decltype(Operand::split_invariant)>>
    : std::bool_constant<Operand::split_invariant> {};

/// Whether an operand computes the input product with the activation fused (fused_input).
template <class Ffn, class T, class Operand, class = void>
struct has_fused_input : std::false_type {};
template <class Ffn, class T, class Operand>
struct has_fused_input<Ffn, T, Operand,
                       std::void_t<decltype(std::declval<const Operand&>().template fused_input<Ffn>(
                           std::declval<const T*>(), Index(), Index(), Index(), Index(), Index(),
                           std::declval<T*>(), Index(), std::declval<T*>()))>> : std::true_type {};

template <class Operand>
constexpr Index ffn_up_granule() {
  if constexpr (prepares_input_v<Operand>) {
    return std::max(ffn_granule, Operand::granule);
  } else {
    return operand_granule<Operand>::value;
  }
}
/// Granule of the output phase's column blocks.
template <class Operand>
constexpr Index ffn_down_granule() {
  if constexpr (prepares_input_v<Operand>) {
    return ffn_granule;
  } else {
    return operand_granule<Operand>::value;
  }
}


/// Columns per task for a product whose weight rows are `row_bytes` long: about 1 MiB of weights
/// per task on the streaming path (fine tasks balance two cores), 256 columns on the GEMM path
/// (compute bound; wide enough that Eigen's per-call packing of x is negligible). A function of the
/// shapes only, never of the thread count: the same tasks run serially or in parallel, so results
/// are bitwise identical for every executor.
inline Index ffn_parts(Index cols, Index row_bytes, bool small, Index granule = ffn_granule) {
  if (cols <= 0) return 0;
  Index width = 256;
  if (small) {
    width = std::max<Index>(ffn_granule, (Index(1) << 20) / std::max<Index>(row_bytes, 1));
  }
  width = (width + granule - 1) / granule * granule;
  return (cols + width - 1) / width;
}

/// Tasks of the input phase of a job (blocks of the d_ff activation columns).
template <class Ffn, class T, class Operand>
Index ffn_up_parts(const FfnJob<T, Operand>& job) {
  if (job.n == 0) return 0;
  return ffn_parts(job.f, (Ffn::gated ? 2 : 1) * job.d * job.gate.weight_bytes(),
                   job.gate.streams(job.n), ffn_up_granule<Operand>());
}
/// Tasks of the output phase of a job (blocks of the d_model output columns).
template <class T, class Operand>
Index ffn_down_parts(const FfnJob<T, Operand>& job) {
  if (job.n == 0) return 0;
  return ffn_parts(job.d, job.f * job.down.weight_bytes(), job.down.streams(job.n),
                   ffn_down_granule<Operand>());
}

/// Tasks of a phase of a job with split-invariant operands when the phase has too few tasks for
/// the workers: the job's share (work / total_work) of 2 tasks per worker, at most one per granule.
/// Results stay independent of the number of threads, because such products do not depend on
/// the split.
inline Index ffn_parts_for_workers(Index shape_parts, Index cols, Index granule, double work,
                                   double total_work, Index workers) {
  if (shape_parts == 0 || total_work <= 0) return shape_parts;
  const Index share = static_cast<Index>(std::ceil(2.0 * double(workers) * work / total_work));
  return std::max(shape_parts, std::min(share, (cols + granule - 1) / granule));
}


/// act[:, a:b] = the Ffn's activation of hidden's columns [a, b) (and [f + a, f + b) for the up
/// half of a gated FFN); SwiGLU on its vectorised kernel. act may alias hidden's gate columns.
template <class Ffn, class T>
inline void apply_activation_cols(const T* h, Index ld_h, Index n, Index d_ff, Index a, Index b,
                                  T* act, Index ld_act) {
  using A = typename Ffn::activation;
  if constexpr (Ffn::gated && std::is_same_v<A, Silu>) {
    kernels::swiglu_cols(h, ld_h, n, d_ff, a, b, act, ld_act);
  } else {
    kernels::activation_cols<A, Ffn::gated>(h, ld_h, n, d_ff, a, b, act, ld_act);
  }
}

/// Input-phase task `part` of `parts` of a job: hidden's gate (and up) columns of one block of
/// d_ff, plus the job's input bias, then the activation of that block (the clamped GLU when
/// job.glu is not plain), in place when act aliases hidden; or, for an operand with fused_input
/// (packed weights, inference), the activations of the block straight from the product's
/// epilogue (hidden is not written).
template <class Ffn, class T, class Operand>
void ffn_up_task(const FfnJob<T, Operand>& job, Index part, Index parts, Index worker = 0) {
  const auto [a, b] = block_range(job.f, parts, part, ffn_up_granule<Operand>());
  T* scratch = job.scratch ? job.scratch + worker * job.scratch_stride : nullptr;
  if constexpr (has_fused_input<Ffn, T, Operand>::value) {
    // The fused epilogue applies the plain activation with no bias, and the packed input
    // projection (gate/up pairs in panels) has no unfused product to fall back to: blocks with
    // such operands refuse expert biases and clamped GLUs at construction (block.hpp).
    MOE_ASSERT(job.in_bias == nullptr && job.glu.plain());
    job.gate.template fused_input<Ffn>(job.x, job.n, job.ldx, a, b, job.f, job.act, job.ld_act,
                                       scratch);
    return;
  }
  job.gate.product(job.x, job.n, job.ldx, a, b, job.hidden, job.in, scratch, job.scratch_stride);
  if constexpr (Ffn::gated) {
    job.up.product(job.x, job.n, job.ldx, a, b, job.hidden + job.f, job.in, scratch,
                   job.scratch_stride);
  }
  if (job.in_bias != nullptr) {
    for (Index r = 0; r < job.n; ++r) {
      T* hr = job.hidden + r * job.in;
      for (Index i = a; i < b; ++i) hr[i] += job.in_bias[i];
      if constexpr (Ffn::gated) {
        for (Index i = a; i < b; ++i) hr[job.f + i] += job.in_bias[job.f + i];
      }
    }
  }
  bool clamped = false;
  if constexpr (Ffn::gated) {
    clamped = !job.glu.plain();
    if (clamped) {
      kernels::clamped_glu_cols<typename Ffn::activation>(
          job.hidden, job.in, job.n, job.f, a, b, job.act, job.ld_act,
          static_cast<T>(job.glu.limit), job.glu.clamp_after_activation,
          static_cast<T>(job.glu.up_offset), static_cast<T>(job.glu.alpha));
    }
  }
  if (!clamped) {
    apply_activation_cols<Ffn>(job.hidden, job.in, job.n, job.f, a, b, job.act, job.ld_act);
  }
  // The output phase's input, converted where it was computed (no extra pass, no barrier).
  if constexpr (prepares_input_v<Operand>) {
    job.down.prepare_cols(job.act, job.n, job.ld_act, a, b);
  }
}

/// Whether a job's x is converted or packed before its input phase (ffn_prepare_task).
template <class T, class Operand>
bool ffn_needs_prepare(const FfnJob<T, Operand>& job) {
  if constexpr (prepares_input_v<Operand>) {
    return job.n > 0 && job.gate.reads_input(job.n);
  } else if constexpr (prepacks_x_v<Operand>) {
    return job.n > 0 && job.gate.uses_xpack(job.n);
  } else {
    return false;
  }
}

/// Converts (or packs) a job's x once for its gate and up products.
template <class T, class Operand>
void ffn_prepare_task(const FfnJob<T, Operand>& job) {
  if constexpr (prepares_input_v<Operand> || prepacks_x_v<Operand>) {
    if (job.n > 0) job.gate.prepare_rows(job.x, job.n, job.ldx);
  }
}

/// Output-phase task `part` of `parts` of a job: one block of y's d_model columns.
template <class T, class Operand>
void ffn_down_task(const FfnJob<T, Operand>& job, Index part, Index parts, Index worker = 0) {
  const auto [c0, c1] = block_range(job.d, parts, part, ffn_down_granule<Operand>());
  T* scratch = job.scratch ? job.scratch + worker * job.scratch_stride : nullptr;
  job.down.product(job.act, job.n, job.ld_act, c0, c1, job.y, job.d, scratch, job.scratch_stride);
  if (job.out_bias != nullptr) {
    for (Index r = 0; r < job.n; ++r) {
      T* yr = job.y + r * job.d;
      for (Index c = c0; c < c1; ++c) yr[c] += job.out_bias[c];
    }
  }
}

/// Runs two groups of FFN jobs (first_at(j) for j < num_first, then second_at(j - num_first)
/// for the next num_second; each returns an FfnJob, the groups may differ in operand type)
/// through the executor as (job, column-block) tasks in two phases: input projection +
/// activation, then (after the barrier between the two run() calls) the output projection.
/// task_begin: caller-owned scratch of num_first + num_second + 1 indices (no allocation here).
/// The task list depends on the shapes only, except that jobs on split-invariant operands (packed
/// weights) are split further when a phase has fewer than two tasks per worker, which changes no
/// result: bitwise identical results for every executor.
/// Eigen's GEMM (non-streaming products) may allocate its packing buffers; streaming allocates
/// nothing.
template <class Ffn, class FirstAt, class SecondAt>
void run_ffn_jobs(Index num_first, const FirstAt& first_at, Index num_second,
                  const SecondAt& second_at, Index* task_begin, const Executor& executor) {
  const Index num_jobs = num_first + num_second;
  auto job_of_task = [&](Index task) {
    return static_cast<Index>(std::upper_bound(task_begin, task_begin + num_jobs + 1, task) -
                              task_begin) -
           1;
  };
  const Index workers = executor.num_workers();
  // Tasks of a phase: from the shapes; jobs on split-invariant operands get more when the phase
  // has fewer than two tasks per worker (one hot expert on 16 workers).
  auto plan_phase = [&](auto&& parts_of, auto&& cols_of, auto&& work_of) {
    task_begin[0] = 0;
    double total_work = 0;
    for (Index j = 0; j < num_jobs; ++j) {
      task_begin[j + 1] = task_begin[j] + parts_of(j);
      total_work += work_of(j);
    }
    if (task_begin[num_jobs] >= 2 * workers) return;
    Index begin = 0;
    for (Index j = 0; j < num_jobs; ++j) {
      Index parts = task_begin[j + 1] - begin;
      begin = task_begin[j + 1];
      const auto [cols, granule, invariant] = cols_of(j);
      if (invariant) {
        parts = ffn_parts_for_workers(parts, cols, granule, work_of(j), total_work, workers);
      }
      task_begin[j + 1] = task_begin[j] + parts;
    }
  };
  auto up_info = [&](const auto& job) {
    using Op = std::decay_t<decltype(job.gate)>;
    return std::tuple<Index, Index, bool>(job.f, ffn_up_granule<Op>(),
                                          operand_split_invariant<Op>::value);
  };
  auto down_info = [&](const auto& job) {
    using Op = std::decay_t<decltype(job.down)>;
    return std::tuple<Index, Index, bool>(job.d, ffn_down_granule<Op>(),
                                          operand_split_invariant<Op>::value);
  };
  auto work = [&](const auto& job) { return double(job.n) * double(job.d) * double(job.f); };
  auto at = [&](Index j, auto&& f) {
    return j < num_first ? f(first_at(j)) : f(second_at(j - num_first));
  };
  plan_phase([&](Index j) { return at(j, [](const auto& job) { return ffn_up_parts<Ffn>(job); }); },
             [&](Index j) { return at(j, up_info); }, [&](Index j) { return at(j, work); });
  // Operands that read converted (or packed) inputs: one task per job converts its x first (gate
  // and up share it). A separate run, skipped when no job needs it (decode of packed or exact
  // quantised weights): every column block of the input phase reads all of it.
  using FirstOperand = decltype(first_at(0).gate);
  using SecondOperand = decltype(second_at(0).gate);
  constexpr bool may_prepare = prepares_input_v<FirstOperand> || prepares_input_v<SecondOperand> ||
                               prepacks_x_v<FirstOperand> || prepacks_x_v<SecondOperand>;
  bool any_prepare = false;
  if constexpr (may_prepare) {
    for (Index j = 0; j < num_jobs && !any_prepare; ++j) {
      any_prepare = at(j, [](const auto& job) { return ffn_needs_prepare(job); });
    }
  }
  if (any_prepare) {
    executor.run(num_jobs, [&](Index j, Index) {
      if (j < num_first) {
        ffn_prepare_task(first_at(j));
      } else {
        ffn_prepare_task(second_at(j - num_first));
      }
    });
  }
  executor.run(task_begin[num_jobs], [&](Index task, Index worker) {
    const Index j = job_of_task(task);
    const Index part = task - task_begin[j], parts = task_begin[j + 1] - task_begin[j];
    if (j < num_first) {
      ffn_up_task<Ffn>(first_at(j), part, parts, worker);
    } else {
      ffn_up_task<Ffn>(second_at(j - num_first), part, parts, worker);
    }
  });
  plan_phase([&](Index j) { return at(j, [](const auto& job) { return ffn_down_parts(job); }); },
             [&](Index j) { return at(j, down_info); }, [&](Index j) { return at(j, work); });
  executor.run(task_begin[num_jobs], [&](Index task, Index worker) {
    const Index j = job_of_task(task);
    const Index part = task - task_begin[j], parts = task_begin[j + 1] - task_begin[j];
    if (j < num_first) {
      ffn_down_task(first_at(j), part, parts, worker);
    } else {
      ffn_down_task(second_at(j - num_first), part, parts, worker);
    }
  });
}

/// run_ffn_jobs on one group of num_jobs jobs (task_begin: num_jobs + 1 indices).
template <class Ffn, class JobAt>
void run_ffn_jobs(Index num_jobs, const JobAt& job_at, Index* task_begin,
                  const Executor& executor) {
  run_ffn_jobs<Ffn>(num_jobs, job_at, 0, job_at, task_begin, executor);
}

}  // namespace moe::detail
