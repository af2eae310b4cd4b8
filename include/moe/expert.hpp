// moe: expert FFN weights, stacked for all experts of a layer, and the FFN math on a block of rows.
#pragma once

#include <algorithm>
#include <type_traits>

#include <Eigen/Core>

#include "moe/activations.hpp"
#include "moe/error.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe {

template <class Format>
class CompactMatrix;  // moe/compact.hpp

/// The weights of `num_experts` FFN experts of one layer, stacked like ggml / transformers v5.
///
/// Per expert e, in checkpoint (nn.Linear [out x in]) orientation:
///   input projection  w_in(e):  [in_rows x d_model], in_rows = 2 d_ff when gated, gate rows
///                                first then up rows (HF v5 gate_up_proj[e]); d_ff when plain (wi);
///   output projection w_out(e): [d_model x d_ff] (down_proj / w2 / wo).
/// Fusing gate and up lets one product per expert compute both. Owned, contiguous storage.
template <class T>
class ExpertStack {
 public:
  ExpertStack() = default;
  /// Zero-initialised weights. Throws config_error on negative sizes.
  ExpertStack(Index num_experts, Index d_model, Index d_ff, bool gated)
      : num_experts_(num_experts), d_model_(d_model), d_ff_(d_ff), gated_(gated) {
    if (num_experts < 0 || d_model < 0 || d_ff < 0) {
      throw config_error(detail::concat("moe: ExpertStack sizes must be >= 0, got num_experts = ",
                                        num_experts, ", d_model = ", d_model, ", d_ff = ", d_ff));
    }
    w_in_ = RowMatrix<T>::Zero(num_experts * in_rows(), d_model);
    w_out_ = RowMatrix<T>::Zero(num_experts * d_model, d_ff);
  }

  Index num_experts() const { return num_experts_; }
  Index d_model() const { return d_model_; }
  Index d_ff() const { return d_ff_; }
  bool gated() const { return gated_; }
  bool empty() const { return num_experts_ == 0; }
  /// Rows of one expert's input projection: 2 d_ff (gate + up) or d_ff.
  Index in_rows() const { return gated_ ? 2 * d_ff_ : d_ff_; }

  /// [in_rows x d_model] fused input projection of expert e.
  ConstMap<T> w_in(Index e) const {
    return {w_in_.data() + e * in_rows() * d_model_, in_rows(), d_model_};
  }
  MutMap<T> w_in(Index e) { return {w_in_.data() + e * in_rows() * d_model_, in_rows(), d_model_}; }
  /// [d_model x d_ff] output projection of expert e.
  ConstMap<T> w_out(Index e) const {
    return {w_out_.data() + e * d_model_ * d_ff_, d_model_, d_ff_};
  }
  MutMap<T> w_out(Index e) { return {w_out_.data() + e * d_model_ * d_ff_, d_model_, d_ff_}; }
  /// [d_ff x d_model] gate (or, for a plain FFN, the only) input projection of expert e.
  MutMap<T> gate(Index e) { return {w_in_.data() + e * in_rows() * d_model_, d_ff_, d_model_}; }
  ConstMap<T> gate(Index e) const {
    return {w_in_.data() + e * in_rows() * d_model_, d_ff_, d_model_};
  }
  /// [d_ff x d_model] up projection of expert e (gated only).
  MutMap<T> up(Index e) {
    MOE_ASSERT(gated_);
    return {w_in_.data() + (e * in_rows() + d_ff_) * d_model_, d_ff_, d_model_};
  }
  ConstMap<T> up(Index e) const {
    MOE_ASSERT(gated_);
    return {w_in_.data() + (e * in_rows() + d_ff_) * d_model_, d_ff_, d_model_};
  }

  /// Copies a gated expert's weights in checkpoint orientation (gate, up [d_ff x d_model],
  /// down [d_model x d_ff]). Throws shape_error naming the tensor and both shapes.
  void set_gated(Index e, const MatrixRef<T>& gate_w, const MatrixRef<T>& up_w,
                 const MatrixRef<T>& down_w) {
    check_expert(e);
    if (!gated_) throw config_error("moe: set_gated called on a plain (non-gated) expert stack");
    detail::check_shape(name("gate", e).c_str(), gate_w.rows(), gate_w.cols(), d_ff_, d_model_);
    detail::check_shape(name("up", e).c_str(), up_w.rows(), up_w.cols(), d_ff_, d_model_);
    detail::check_shape(name("down", e).c_str(), down_w.rows(), down_w.cols(), d_model_, d_ff_);
    gate(e) = gate_w;
    up(e) = up_w;
    w_out(e) = down_w;
  }
  /// Copies a plain expert's weights (wi [d_ff x d_model], wo [d_model x d_ff]).
  void set_plain(Index e, const MatrixRef<T>& wi, const MatrixRef<T>& wo) {
    check_expert(e);
    if (gated_) throw config_error("moe: set_plain called on a gated expert stack");
    detail::check_shape(name("wi", e).c_str(), wi.rows(), wi.cols(), d_ff_, d_model_);
    detail::check_shape(name("wo", e).c_str(), wo.rows(), wo.cols(), d_model_, d_ff_);
    gate(e) = wi;
    w_out(e) = wo;
  }

  /// The whole stacked input projection [E * in_rows x d_model] and output projection
  /// [E * d_model x d_ff] (for loaders and optimisers that treat the layer as one tensor).
  RowMatrix<T>& stacked_in() { return w_in_; }
  RowMatrix<T>& stacked_out() { return w_out_; }
  const RowMatrix<T>& stacked_in() const { return w_in_; }
  const RowMatrix<T>& stacked_out() const { return w_out_; }

  std::size_t bytes() const {
    return static_cast<std::size_t>(w_in_.size() + w_out_.size()) * sizeof(T);
  }

 private:
  void check_expert(Index e) const {
    if (e < 0 || e >= num_experts_) {
      throw config_error(
          detail::concat("moe: expert index ", e, " out of range [0, ", num_experts_, ")"));
    }
  }
  static std::string name(const char* what, Index e) {
    return detail::concat("expert ", e, ' ', what, " weight");
  }

  Index num_experts_ = 0, d_model_ = 0, d_ff_ = 0;
  bool gated_ = true;
  RowMatrix<T> w_in_, w_out_;
};

namespace detail {

/// Applies the FFN's activation to h [n x in_rows] (row stride ld_h), writing a [n x d_ff] into
/// act (row stride ld_act). Gated: a = act(gate) * up; plain: a = act(h). act may alias h's gate
/// columns (in-place SwiGLU): each element is read before it is written.
template <class Ffn, class T>
inline void apply_activation(const T* h, Index ld_h, Index n, Index d_ff, T* act, Index ld_act) {
  using A = typename Ffn::activation;
  for (Index r = 0; r < n; ++r) {
    const T* hr = h + r * ld_h;
    T* ar = act + r * ld_act;
    if constexpr (Ffn::gated) {
      for (Index i = 0; i < d_ff; ++i) ar[i] = A::value(hr[i]) * hr[d_ff + i];
    } else {
      for (Index i = 0; i < d_ff; ++i) ar[i] = A::value(hr[i]);
    }
  }
}

/// The plain (Eigen GEMM) expert FFN on n gathered rows: h = x * w_in^T; a = act(h); y = a *
/// w_out^T. x [n x d_model], h [n x in_rows], act [n x d_ff] (may point into h, row stride
/// ld_act), y [n x d_model]; all row-major.
template <class Ffn, class T>
inline void expert_ffn_rows(const ExpertStack<T>& w, Index e, const T* x, Index n, T* h, T* act,
                            Index ld_act, T* y) {
  if (n == 0) return;
  const Index d = w.d_model(), f = w.d_ff(), in = w.in_rows();
  ConstMap<T> xm(x, n, d);
  MutMap<T> hm(h, n, in);
  hm.noalias() = xm * w.w_in(e).transpose();
  apply_activation<Ffn>(h, in, n, f, act, ld_act);
  Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>> am(act, n, f,
                                                             Eigen::OuterStride<>(ld_act));
  MutMap<T> ym(y, n, d);
  ym.noalias() = am * w.w_out(e).transpose();
}

/// Rows at or below which an FFN runs on the small-batch kernel (kernels::gemm_small_nt, which
/// streams each weight once for all rows) instead of Eigen's blocked GEMM (which packs the weights
/// on every call). Measured on Zen 5 with the Mixtral-quarter and OLMoE shapes
/// (benchmarks/moe_bench.cpp, kind `sparse`): see docs/benchmarks.md.
#ifndef MOE_SMALL_BATCH_ROWS
#define MOE_SMALL_BATCH_ROWS 16
#endif
inline constexpr Index small_batch_rows = MOE_SMALL_BATCH_ROWS;

/// Above small_batch_rows the streaming kernel still beats Eigen's GEMM (which packs the weights
/// on every call) while the rows of x it reuses for every weight row stay in the L2 cache:
/// measured on Zen 5 (1 MiB L2), fp32, [n x 1024] * [1024 x 7168]: 153 against 106 GFLOP/s at
/// n = 128; [n x 3584] * [3584 x 1024]: equal at n = 64 (917 KiB of x), Eigen ahead beyond.
inline constexpr Index stream_x_bytes = Index(768) << 10;

/// Whether a product of n rows of length k runs on the streaming kernel (else on Eigen's GEMM).
template <class T>
constexpr bool use_stream(Index n, Index k) {
  return n <= small_batch_rows || n * k * Index(sizeof(T)) <= stream_x_bytes;
}

/// Rows at or below which a job on compact weights (moe/compact.hpp) streams them through
/// kernels::gemm_compact_nt (decoding in registers); above, each column block of up to 256 weight
/// rows is decoded into per-worker fp32 scratch and multiplied by Eigen's GEMM
/// (kernels::gemm_compact_nt_prefill).
inline constexpr Index compact_small_rows = 16;

/// The product on compact weights, defined in moe/kernels/gemm_compact.hpp (which includes this
/// header): run(x, n, ldx, w, c0, c1, out, ldo, small, scratch, scratch_floats).
template <class Format>
struct CompactProduct;

/// One FFN applied to n rows: a routed expert on its gathered rows, the shared expert on the
/// tokens, or a dense FFN. All row-major:
///   x [n x d] (row stride ldx), w_in [in x d], w_out [d x f], hidden [n x in] (row stride in),
///   act [n x f] (row stride ld_act; may be hidden's gate columns), y [n x d] (row stride d).
///
/// Compact weights (Format = Bf16, Int8 or Fp8E4M3, T = float): when c_gate is set, the job
/// reads c_gate / c_up [f x d] (c_up gated only) and c_out [d x f] instead of w_in / w_out; the
/// prefill path (n > compact_small_rows) needs scratch: scratch_stride floats per worker (at
/// least 256 max(d, f), kernels::gemm_compact_scratch_floats), worker w at scratch + w *
/// scratch_stride. Format = void (the default): fp32 weights only.
template <class T, class Format = void>
struct FfnJob {
  const T* x = nullptr;
  Index ldx = 0, n = 0;
  const T* w_in = nullptr;
  const T* w_out = nullptr;
  Index d = 0, f = 0, in = 0;
  T* hidden = nullptr;
  T* act = nullptr;
  Index ld_act = 0;
  T* y = nullptr;
  const CompactMatrix<Format>* c_gate = nullptr;
  const CompactMatrix<Format>* c_up = nullptr;
  const CompactMatrix<Format>* c_out = nullptr;
  T* scratch = nullptr;
  Index scratch_stride = 0;

  /// True when the job reads compact weights.
  bool compact() const {
    if constexpr (std::is_void_v<Format>) {
      return false;
    } else {
      return c_gate != nullptr;
    }
  }
  /// Bytes of one stored weight (fp32: sizeof(T); compact: the code size).
  Index weight_bytes() const {
    if constexpr (std::is_void_v<Format>) {
      return Index(sizeof(T));
    } else {
      return compact() ? Index(sizeof(typename Format::code_type)) : Index(sizeof(T));
    }
  }
  /// The input projection (rows of length d) runs on the streaming kernel.
  bool up_stream() const { return compact() ? n <= compact_small_rows : use_stream<T>(n, d); }
  /// The output projection (rows of length f) runs on the streaming kernel.
  bool down_stream() const { return compact() ? n <= compact_small_rows : use_stream<T>(n, f); }
};

/// Column granule of every task: a multiple of the small kernel's register tile and of a cache
/// line of floats, so tasks write whole lines and only the last block has a partial tile.
inline constexpr Index ffn_granule = 16;

/// Columns per task for a product whose weight rows are `row_bytes` long: about 1 MiB of weights
/// per task on the streaming path (fine tasks balance two cores), 256 columns on the GEMM path
/// (compute bound; wide enough that Eigen's per-call packing of x is negligible). A function of the
/// shapes only, never of the thread count: the same tasks run serially or in parallel, so results
/// are bitwise identical for every executor.
inline Index ffn_parts(Index cols, Index row_bytes, bool small) {
  if (cols <= 0) return 0;
  Index width = 256;
  if (small) {
    width = std::max<Index>(ffn_granule, (Index(1) << 20) / std::max<Index>(row_bytes, 1));
  }
  width = (width + ffn_granule - 1) / ffn_granule * ffn_granule;
  return (cols + width - 1) / width;
}

/// Tasks of the input phase of a job (blocks of the d_ff activation columns).
template <class Ffn, class T, class Format>
Index ffn_up_parts(const FfnJob<T, Format>& job) {
  if (job.n == 0) return 0;
  return ffn_parts(job.f, (Ffn::gated ? 2 : 1) * job.d * job.weight_bytes(), job.up_stream());
}
/// Tasks of the output phase of a job (blocks of the d_model output columns).
template <class T, class Format>
Index ffn_down_parts(const FfnJob<T, Format>& job) {
  if (job.n == 0) return 0;
  return ffn_parts(job.d, job.f * job.weight_bytes(), job.down_stream());
}

/// act[:, a:b] = activation of hidden's columns [a, b) (and [f + a, f + b) for the up half of a
/// gated FFN). act may alias hidden's gate columns. SwiGLU is vectorised with Eigen's packet exp
/// (within an ulp or two of std::exp, and about ten times faster: at 512 tokens the scalar
/// std::exp took ~10% of a Mixtral-quarter forward); other activations follow apply_activation
/// element by element.
template <class Ffn, class T>
inline void apply_activation_cols(const T* h, Index ld_h, Index n, Index d_ff, Index a, Index b,
                                  T* act, Index ld_act) {
  using A = typename Ffn::activation;
  if constexpr (Ffn::gated && std::is_same_v<A, Silu>) {
    // Every element goes through the same packet code, the tail through a padded packet: the
    // result of an element depends neither on its address nor on the block split.
    using Packet = typename Eigen::internal::packet_traits<T>::type;
    constexpr Index kLanes = Eigen::internal::packet_traits<T>::size;
    const Packet one = Eigen::internal::pset1<Packet>(T(1));
    auto swiglu = [&](const Packet& g, const Packet& u) {
      using namespace Eigen::internal;
      return pmul(pdiv(g, padd(one, pexp(pnegate(g)))), u);
    };
    for (Index r = 0; r < n; ++r) {
      const T* gr = h + r * ld_h;
      const T* ur = gr + d_ff;
      T* ar = act + r * ld_act;
      Index i = a;
      for (; i + kLanes <= b; i += kLanes) {
        Eigen::internal::pstoreu(ar + i, swiglu(Eigen::internal::ploadu<Packet>(gr + i),
                                                Eigen::internal::ploadu<Packet>(ur + i)));
      }
      if (i < b) {
        T g[kLanes] = {}, u[kLanes] = {}, out[kLanes];
        std::copy(gr + i, gr + b, g);
        std::copy(ur + i, ur + b, u);
        Eigen::internal::pstoreu(
            out, swiglu(Eigen::internal::ploadu<Packet>(g), Eigen::internal::ploadu<Packet>(u)));
        std::copy(out, out + (b - i), ar + i);
      }
    }
    return;
  }
  for (Index r = 0; r < n; ++r) {
    const T* hr = h + r * ld_h;
    T* ar = act + r * ld_act;
    if constexpr (Ffn::gated) {
      for (Index i = a; i < b; ++i) ar[i] = A::value(hr[i]) * hr[d_ff + i];
    } else {
      for (Index i = a; i < b; ++i) ar[i] = A::value(hr[i]);
    }
  }
}

/// out[:, c0:c1] = x * W[c0:c1, :]^T, one column block of out = x * W^T, on the small kernel or
/// on Eigen's GEMM. x [n x k] (row stride ldx), W [* x k], out row stride ldo.
template <class T>
inline void ffn_product_block(const T* x, Index n, Index ldx, const T* w, Index k, Index c0,
                              Index c1, T* out, Index ldo, bool small) {
  if (c1 <= c0) return;
  if (small) {
    kernels::gemm_small_nt(x, n, ldx, w, k, k, c0, c1, out, ldo);
    return;
  }
  using Strided = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
  using MutStrided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
  const Strided xm(x, n, k, Eigen::OuterStride<>(ldx));
  const ConstMap<T> wm(w + c0 * k, c1 - c0, k);
  MutStrided om(out + c0, n, c1 - c0, Eigen::OuterStride<>(ldo));
  om.noalias() = xm * wm.transpose();
}

/// Input-phase task `part` of a job: hidden's gate (and up) columns of one block of d_ff, then
/// the activation of that block, in place when act aliases hidden.
template <class Ffn, class T, class Format>
void ffn_up_task(const FfnJob<T, Format>& job, Index part, Index worker = 0) {
  const Index parts = ffn_up_parts<Ffn>(job);
  const auto [a, b] = block_range(job.f, parts, part, ffn_granule);
  const bool small = job.up_stream();
  if constexpr (!std::is_void_v<Format>) {
    if (job.compact()) {
      T* scratch = job.scratch + worker * job.scratch_stride;
      CompactProduct<Format>::run(job.x, job.n, job.ldx, *job.c_gate, a, b, job.hidden, job.in,
                                  small, scratch, job.scratch_stride);
      if constexpr (Ffn::gated) {
        CompactProduct<Format>::run(job.x, job.n, job.ldx, *job.c_up, a, b, job.hidden + job.f,
                                    job.in, small, scratch, job.scratch_stride);
      }
      apply_activation_cols<Ffn>(job.hidden, job.in, job.n, job.f, a, b, job.act, job.ld_act);
      return;
    }
  }
  (void)worker;
  ffn_product_block(job.x, job.n, job.ldx, job.w_in, job.d, a, b, job.hidden, job.in, small);
  if constexpr (Ffn::gated) {
    ffn_product_block(job.x, job.n, job.ldx, job.w_in, job.d, job.f + a, job.f + b, job.hidden,
                      job.in, small);
  }
  apply_activation_cols<Ffn>(job.hidden, job.in, job.n, job.f, a, b, job.act, job.ld_act);
}

/// Output-phase task `part` of a job: one block of y's d_model columns.
template <class T, class Format>
void ffn_down_task(const FfnJob<T, Format>& job, Index part, Index worker = 0) {
  const Index parts = ffn_down_parts(job);
  const auto [c0, c1] = block_range(job.d, parts, part, ffn_granule);
  if constexpr (!std::is_void_v<Format>) {
    if (job.compact()) {
      CompactProduct<Format>::run(job.act, job.n, job.ld_act, *job.c_out, c0, c1, job.y, job.d,
                                  job.down_stream(), job.scratch + worker * job.scratch_stride,
                                  job.scratch_stride);
      return;
    }
  }
  (void)worker;
  ffn_product_block(job.act, job.n, job.ld_act, job.w_out, job.f, c0, c1, job.y, job.d,
                    job.down_stream());
}

/// Runs num_jobs FFN jobs (job_at(j) -> FfnJob<T>) through the executor as (job, column-block)
/// tasks in two phases: input projection + activation, then (after the barrier between the two
/// run() calls) the output projection. task_begin: caller-owned scratch of num_jobs + 1 indices
/// (no allocation here). The task list depends on the shapes only: bitwise identical results for
/// every executor. Eigen's GEMM (jobs above small_batch_rows rows) may allocate its packing
/// buffers; the small path allocates nothing.
template <class Ffn, class T, class JobAt>
void run_ffn_jobs(Index num_jobs, const JobAt& job_at, Index* task_begin,
                  const Executor& executor) {
  auto job_of_task = [&](Index task) {
    return static_cast<Index>(std::upper_bound(task_begin, task_begin + num_jobs + 1, task) -
                              task_begin) -
           1;
  };
  task_begin[0] = 0;
  for (Index j = 0; j < num_jobs; ++j)
    task_begin[j + 1] = task_begin[j] + ffn_up_parts<Ffn>(job_at(j));
  executor.run(task_begin[num_jobs], [&](Index task, Index worker) {
    const Index j = job_of_task(task);
    ffn_up_task<Ffn>(job_at(j), task - task_begin[j], worker);
  });
  for (Index j = 0; j < num_jobs; ++j)
    task_begin[j + 1] = task_begin[j] + ffn_down_parts(job_at(j));
  executor.run(task_begin[num_jobs], [&](Index task, Index worker) {
    const Index j = job_of_task(task);
    ffn_down_task(job_at(j), task - task_begin[j], worker);
  });
}

/// One FFN (expert e of the stack) on n rows through the same tasks as the block: x [n x d] (row
/// stride ldx), hidden [n x in_rows], act [n x d_ff] (row stride ld_act; may be hidden's gate
/// columns), y [n x d]. What a dense FFN calls to give the block's results bitwise.
template <class Ffn, class T>
void ffn_forward(const ExpertStack<T>& w, Index e, const T* x, Index ldx, Index n, T* hidden,
                 T* act, Index ld_act, T* y, const Executor& executor = serial_executor()) {
  FfnJob<T> job;
  job.x = x;
  job.ldx = ldx;
  job.n = n;
  job.w_in = w.w_in(e).data();
  job.w_out = w.w_out(e).data();
  job.d = w.d_model();
  job.f = w.d_ff();
  job.in = w.in_rows();
  job.hidden = hidden;
  job.act = act;
  job.ld_act = ld_act;
  job.y = y;
  Index task_begin[2];
  run_ffn_jobs<Ffn, T>(
      1, [&](Index) { return job; }, task_begin, executor);
}

}  // namespace detail
}  // namespace moe
