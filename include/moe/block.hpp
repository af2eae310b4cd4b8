// moe: the sparse Mixture-of-Experts block: router + gating + grouped experts (+ shared expert).
#pragma once

#include <algorithm>
#include <utility>

#include "moe/activations.hpp"
#include "moe/compact.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/expert.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/gemm_compact.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/router.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// Storage policy of a block's routed experts: the block's own scalar T (ExpertStack<T>, the
/// default; the only policy that supports training / block_backward).
struct NativeExperts {};

/// Storage policy of a block's routed experts: compact weights (CompactExpertStack<Format>,
/// Format = Bf16, Int8 or Fp8E4M3; moe/compact.hpp), for float blocks. The router, the routing
/// weights, the shared expert, activations and accumulation stay fp32. Inference only:
/// block_backward does not accept such a block (it does not compile).
template <class Format>
struct CompactExperts {
  using format = Format;
};

namespace detail {

struct NoCompactStack {};

template <class Storage>
struct expert_storage {
  static_assert(std::is_same_v<Storage, NativeExperts>,
                "moe: expert storage must be NativeExperts or CompactExperts<Format>");
  static constexpr bool compact = false;
  using format = void;
  using stack = NoCompactStack;
};

template <class Format>
struct expert_storage<CompactExperts<Format>> {
  static_assert(std::is_same_v<Format, Bf16> || std::is_same_v<Format, Int8> ||
                    std::is_same_v<Format, Fp8E4M3>,
                "moe: CompactExperts<Format> needs Format = Bf16, Int8 or Fp8E4M3");
  static constexpr bool compact = true;
  using format = Format;
  using stack = CompactExpertStack<Format>;
};

}  // namespace detail

/// A sparse MoE layer (HF MixtralSparseMoeBlock and its relatives).
///
///   y[t] = sum_{j < slots} w[t,j] * FFN_{e[t,j]}(x[t])  (+ g(x[t]) * Shared(x[t]))
///
/// Template parameters: T the scalar (float or double), Gating the routing policy (gating.hpp),
/// Ffn the expert kind (SwiGLU, GeGLU, ReluMlp...), Storage the routed experts' storage
/// (NativeExperts: ExpertStack<T>; CompactExperts<Bf16 | Int8 | Fp8E4M3>: compact weights, float
/// blocks only, see docs/compact.md). Sizes live in MoeConfig, the gating's numbers in
/// Gating::Options; both are validated in the constructor.
///
/// forward() groups the tokens of each expert into one contiguous matrix (counting sort), runs
/// every expert as (expert, column-block) tasks through the executor (experts with at most
/// detail::small_batch_rows rows on the streaming small-batch kernel, larger ones on Eigen's
/// GEMM), and scatters back weighted. The sum over a token's k
/// experts is taken in slot order (descending weight), then the shared expert is added: the same
/// order for every batch size and thread count, so results are deterministic.
///
/// The block is immutable after construction; forward() is const and may be called from many
/// threads at once, each with its own Workspace.
template <class T, class Gating = gating::Mixtral, class Ffn = SwiGLU,
          class Storage = NativeExperts>
class SparseMoeBlock {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "moe: SparseMoeBlock supports float and double");
  using StorageTraits = detail::expert_storage<Storage>;
  static_assert(!StorageTraits::compact || std::is_same_v<T, float>,
                "moe: compact expert storage needs a float block");

 public:
  using Scalar = T;
  using RouteS = RouteScalar<T>;
  using GatingPolicy = Gating;
  using FfnKind = Ffn;
  using ExpertStorage = Storage;
  /// True when the routed experts are stored compact (CompactExperts<Format>).
  static constexpr bool compact = StorageTraits::compact;
  /// CompactExpertStack<Format> for compact storage (else an empty placeholder type).
  using CompactStack = typename StorageTraits::stack;
  using Options = typename Gating::Options;

  /// Validates config, gating options and every weight shape (config_error / shape_error /
  /// value_error, naming the field and both shapes). Compact storage: quantises
  /// weights.experts expert by expert (CompactMatrix::quantize; fp8 with 128 x 128 blocks) and
  /// frees the fp32 experts (weights().experts is then empty).
  SparseMoeBlock(const MoeConfig& config, MoeWeights<T> weights, Options options = {})
      : config_(config), weights_(std::move(weights)), router_(Gating(options)) {
    config_.validate();
    router_.gating().validate(config_);
    weights_.validate(config_, Ffn::gated, Gating::uses_bias, Gating::uses_noise);
    if constexpr (compact) {
      experts_ = CompactStack::from(weights_.experts);
      weights_.experts = ExpertStack<T>();
    }
  }

  /// Compact storage only: the routed experts given compact (quantised elsewhere, or views of
  /// checkpoint tensors: CompactMatrix::view, zero-copy); weights.experts must be empty
  /// (ExpertStack<float>()), every other tensor as for the other constructor. Throws
  /// config_error / shape_error as the other constructor, and when a matrix is missing.
  SparseMoeBlock(const MoeConfig& config, MoeWeights<T> weights, CompactStack experts,
                 Options options = {})
      : config_(config), weights_(std::move(weights)), router_(Gating(options)) {
    static_assert(compact, "moe: this constructor is for CompactExperts<Format> blocks");
    config_.validate();
    router_.gating().validate(config_);
    if (weights_.experts.num_experts() != 0) {
      throw config_error(
          "moe: a compact block takes its routed experts as a CompactExpertStack; pass an empty "
          "MoeWeights::experts");
    }
    weights_.validate(config_, Ffn::gated, Gating::uses_bias, Gating::uses_noise,
                      /*check_experts=*/false);
    if constexpr (compact) {
      if (experts.num_experts() != config_.num_experts || experts.d_model() != config_.d_model ||
          experts.d_ff() != config_.d_ff || experts.gated() != Ffn::gated) {
        throw shape_error(
            detail::concat("moe: compact routed experts hold ", experts.num_experts(),
                           " experts of d_model ", experts.d_model(), ", d_ff ", experts.d_ff(),
                           (experts.gated() ? " (gated)" : " (plain)"), ", expected ",
                           config_.num_experts, " experts of d_model ", config_.d_model, ", d_ff ",
                           config_.d_ff, (Ffn::gated ? " (gated)" : " (plain)")));
      }
      for (Index e = 0; e < experts.num_experts(); ++e) {
        const bool missing = experts.gate(e).codes() == nullptr ||
                             (Ffn::gated && experts.up(e).codes() == nullptr) ||
                             experts.w_out(e).codes() == nullptr;
        if (missing && config_.d_model * config_.d_ff > 0) {
          throw config_error(detail::concat("moe: compact expert ", e, " has no weights set"));
        }
      }
      experts_ = std::move(experts);
    }
  }

  const MoeConfig& config() const { return config_; }
  /// The block's weights. With compact storage, weights().experts is empty: see experts().
  const MoeWeights<T>& weights() const { return weights_; }
  /// The routed experts as stored: ExpertStack<T> (NativeExperts) or CompactExpertStack<Format>.
  const auto& experts() const {
    if constexpr (compact) {
      return experts_;
    } else {
      return weights_.experts;
    }
  }
  /// Resident bytes of the routed experts as stored (codes and scales for compact storage).
  std::size_t expert_bytes() const { return experts().bytes(); }
  const Router<T, Gating>& router() const { return router_; }
  const Gating& gating() const { return router_.gating(); }

  /// y = MoE(x). x: [num_tokens x d_model] row-major (a column-major argument does not compile:
  /// it would be copied silently); y: caller-owned [num_tokens x d_model]. The routing of the call
  /// is left in ws (ws.routing(), ws.plan(), ws.stats()).
  ///
  /// Non-finite values in a token's input make that token's output non-finite; the routing of the
  /// other tokens and their outputs are unaffected, and every expert index stays in range.
  /// Throws shape_error on a shape mismatch, before any work.
  template <class XDerived>
  void forward(const Eigen::DenseBase<XDerived>& x, MatrixMut<T> y, Workspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>,
                  "moe: x must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
    static_assert(std::is_same_v<typename XDerived::Scalar, T>, "moe: x has the wrong scalar");
    forward_impl(MatrixRef<T>(x.derived()), y, ws, executor);
  }

 private:
  void forward_impl(const MatrixRef<T>& x, MatrixMut<T> y, Workspace<T>& ws,
                    const Executor& executor) const {
    const Index num_tokens = x.rows(), d = config_.d_model;
    detail::check_shape("x", x.rows(), x.cols(), num_tokens, d);
    detail::check_shape("y", y.rows(), y.cols(), num_tokens, d);

    router_.route(config_, x, weights_, ws);
    ws.plan_.build(ws.routing_);
    ws.stats_.compute(ws.routing_, ws.plan_);
    if (num_tokens == 0) return;

    const DispatchPlan& plan = ws.plan_;
    const Index N = plan.num_rows, in = experts().in_rows(), f = config_.d_ff;
    T* x_rows = ws.x_rows_.ensure(N * d);
    T* hidden = ws.hidden_.ensure(N * in);
    T* y_rows = ws.y_rows_.ensure(N * d);
    // Inference applies the activation in place over the gate columns; training keeps the
    // pre-activation for the backward pass and writes the activations separately.
    const bool keep = ws.training();
    T* act = keep ? ws.act_.ensure(N * f) : hidden;
    const Index ld_act = keep ? f : in;

    const bool has_shared = config_.shared_d_ff > 0;
    const Index fs = config_.shared_d_ff, in_s = weights_.shared.in_rows();
    T* s_hidden = has_shared ? ws.shared_hidden_.ensure(num_tokens * in_s) : nullptr;
    T* s_act = has_shared ? (keep ? ws.shared_act_.ensure(num_tokens * fs) : s_hidden) : nullptr;
    const Index ld_s_act = keep ? fs : in_s;
    T* s_y = has_shared ? ws.shared_y_.ensure(num_tokens * d) : nullptr;
    T* s_gate = has_shared ? ws.shared_gate_.ensure(num_tokens) : nullptr;

    // Gather each expert's rows contiguously (plan row order). A copy of N * d_model values:
    // cheap next to the products, so it runs on the caller.
    for (Index r = 0; r < N; ++r) {
      const T* src = x.data() + plan.row_token[static_cast<std::size_t>(r)] * x.outerStride();
      std::copy(src, src + d, x_rows + r * d);
    }

    // Jobs 0..E-1: the routed experts on their gathered rows; job E: the shared expert on the
    // tokens (read in place, strided). Each job runs as (job, column-block) tasks in two phases
    // (input projection + activation, then output projection); see detail::run_ffn_jobs.
    const Index E = config_.num_experts;
    const T* shared_in = has_shared ? weights_.shared.w_in(0).data() : nullptr;
    const T* shared_out = has_shared ? weights_.shared.w_out(0).data() : nullptr;
    // Compact prefill: per-worker scratch for one decoded 256-row tile of weights.
    T* scratch = nullptr;
    Index scratch_stride = 0;
    if constexpr (compact) {
      bool prefill = false;
      for (Index e = 0; e < config_.num_experts; ++e)
        prefill = prefill || plan.counts[static_cast<std::size_t>(e)] > detail::compact_small_rows;
      if (prefill) {
        scratch_stride = kernels::gemm_compact_scratch_floats(std::max(d, f));
        scratch = ws.compact_scratch_.ensure(executor.num_workers() * scratch_stride);
      }
    }
    auto job_at = [&](Index j) {
      detail::FfnJob<T, typename StorageTraits::format> job;
      job.d = d;
      if (j < E) {
        const Index begin = plan.offsets[static_cast<std::size_t>(j)];
        job.x = x_rows + begin * d;
        job.ldx = d;
        job.n = plan.counts[static_cast<std::size_t>(j)];
        if constexpr (compact) {
          job.c_gate = &experts_.gate(j);
          if constexpr (Ffn::gated) job.c_up = &experts_.up(j);
          job.c_out = &experts_.w_out(j);
          job.scratch = scratch;
          job.scratch_stride = scratch_stride;
        } else {
          job.w_in = weights_.experts.w_in(j).data();
          job.w_out = weights_.experts.w_out(j).data();
        }
        job.f = f;
        job.in = in;
        job.hidden = hidden + begin * in;
        job.act = act + begin * ld_act;
        job.ld_act = ld_act;
        job.y = y_rows + begin * d;
      } else {
        job.x = x.data();
        job.ldx = x.outerStride();
        job.n = num_tokens;
        job.w_in = shared_in;
        job.w_out = shared_out;
        job.f = fs;
        job.in = in_s;
        job.hidden = s_hidden;
        job.act = s_act;
        job.ld_act = ld_s_act;
        job.y = s_y;
      }
      return job;
    };
    const Index num_jobs = E + (has_shared ? 1 : 0);
    detail::run_ffn_jobs<Ffn, T>(num_jobs, job_at, ws.task_begin_.ensure(num_jobs + 1), executor);

    // Weighted combine, per token in slot order, then the shared expert.
    const auto weights = ws.routing_.weights();
    const Index slots = plan.slots;
    const Index combine_chunk = 32;
    executor.run((num_tokens + combine_chunk - 1) / combine_chunk, [&](Index task, Index) {
      const Index t0 = task * combine_chunk, t1 = std::min(num_tokens, t0 + combine_chunk);
      for (Index t = t0; t < t1; ++t) {
        auto yr = y.row(t);
        yr.setZero();
        for (Index j = 0; j < slots; ++j) {
          const Index r = plan.slot_row[static_cast<std::size_t>(t * slots + j)];
          if (r < 0) continue;
          yr += static_cast<T>(weights(t, j)) * ConstMap<T>(y_rows + r * d, 1, d);
        }
        if (has_shared) {
          s_gate[t] = config_.shared_expert_gate
                          ? kernels::sigmoid<T>(x.row(t).dot(weights_.shared_gate.row(0)))
                          : T(1);
          yr += s_gate[t] * ConstMap<T>(s_y + t * d, 1, d);
        }
      }
    });
  }

  MoeConfig config_;
  MoeWeights<T> weights_;
  Router<T, Gating> router_;
  CompactStack experts_;  ///< the routed experts with compact storage (else empty)
};

}  // namespace moe
