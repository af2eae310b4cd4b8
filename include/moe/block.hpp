// moe: the sparse Mixture-of-Experts block: router + gating + grouped experts (+ shared expert).
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "moe/activations.hpp"
#include "moe/config.hpp"
#include "moe/dispatch.hpp"
#include "moe/error.hpp"
#include "moe/experts/grouped.hpp"
#include "moe/experts/storage.hpp"
#include "moe/gating.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/kernels/topk.hpp"
#include "moe/router.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// A sparse MoE layer (HF MixtralSparseMoeBlock and its relatives).
///
///   y[t] = sum_{j < slots} w[t,j] * FFN_{e[t,j]}(x[t])  (+ g(x[t]) * Shared(x[t]))
///
/// Template parameters: T the scalar (float or double), Gating the routing policy (gating.hpp),
/// Ffn the expert kind (SwiGLU, GeGLU, ReluMlp...), Storage the routed experts' storage
/// (NativeExperts: ExpertStack<T>; CompactExperts<Bf16 | Int8 | Fp8E4M3>: compact weights, float
/// blocks only, see docs/compact.md; PackedExperts: fp32 weights packed for the packed GEMM at
/// construction, float blocks, inference only). Sizes live in MoeConfig, the gating's numbers in
/// Gating::Options; both are validated in the constructor.
///
/// forward() groups the tokens of each expert into one contiguous matrix (counting sort), runs
/// every expert as (expert, column-block) tasks through the executor (experts with at most
/// kernels::small_batch_rows rows on the streaming small-batch kernel, larger ones on Eigen's
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
  static_assert(!is_storage_policy_v<Ffn>,
                "moe: SparseMoeBlock<T, Gating, Ffn, Storage>: the third argument (Ffn) is a "
                "storage policy; write SparseMoeBlock<T, Gating, SwiGLU, CompactExperts<...>>");
  static_assert(is_ffn_kind_v<Ffn>,
                "moe: SparseMoeBlock<T, Gating, Ffn, Storage>: the third argument (Ffn) must be an "
                "FFN kind (SwiGLU, GeGLU, ReluMlp, Gated<A>, Plain<A>)");
  static_assert(is_storage_policy_v<Storage>,
                "moe: SparseMoeBlock<T, Gating, Ffn, Storage>: the fourth argument (Storage) must "
                "be NativeExperts, CompactExperts<Format> or PackedExperts");
  static_assert(!Storage::compact || std::is_same_v<T, float>,
                "moe: compact expert storage needs a float block");

 public:
  using Scalar = T;
  using RouteS = RouteScalar<T>;
  using GatingPolicy = Gating;
  using FfnKind = Ffn;
  using ExpertStorage = Storage;
  /// True when the routed experts are stored compact (CompactExperts<Format>) or packed.
  static constexpr bool compact = Storage::compact;
  /// True for PackedExperts (activation fused into the input product: plain GLU, no biases).
  static constexpr bool packed = std::is_same_v<Storage, PackedExperts>;
  /// The routed experts' stack: ExpertStack<T> (NativeExperts) or CompactExpertStack<Format>.
  using ExpertStackType = typename Storage::template stack<T>;
  /// CompactExpertStack<Format> for compact storage (else an empty placeholder type).
  using CompactStack = std::conditional_t<compact, ExpertStackType, detail::NoCompactStack>;
  using Options = typename Gating::Options;

  /// Validates config, gating options and every weight shape (config_error / shape_error /
  /// value_error, naming the field and both shapes). Compact storage: quantises
  /// weights.experts expert by expert (CompactMatrix::quantize; fp8 with 128 x 128 blocks) and
  /// frees the fp32 experts (weights().experts is then empty).
  SparseMoeBlock(const MoeConfig& config, MoeWeights<T> weights, Options options = {})
      : config_(config), weights_(std::move(weights)), router_(Gating(options)) {
    config_.validate();
    router_.gating().validate(config_);
    check_ffn_numbers();
    weights_.validate(config_, Ffn::gated, Gating::uses_bias, Gating::uses_noise, true,
                      router_.num_scored(config_));
    router_.prepare(weights_);
    if constexpr (compact) {
      // Compact stacks keep the biases (fp32); the packed stack's fused epilogue has no bias
      // term, and dropping gpt-oss's / JetMoE's biases would change the output without a word.
      if (packed && weights_.experts.has_biases()) {
        throw config_error(
            "moe: packed experts do not apply expert biases (gpt-oss, JetMoE): use NativeExperts "
            "or CompactExperts");
      }
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
    check_ffn_numbers();
    weights_.validate(config_, Ffn::gated, Gating::uses_bias, Gating::uses_noise,
                      /*check_experts=*/false, router_.num_scored(config_));
    router_.prepare(weights_);
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
  /// it would be copied silently); y: caller-owned [num_tokens x d_model], row-major (a Matrix,
  /// a Map or a block of rows of one; column-major does not compile). The routing of the call is
  /// left in ws (ws.routing(), ws.plan(), ws.stats()). No allocation of ours once ws is warm or
  /// reserved (reserve()).
  ///
  /// Non-finite values in a token's input make that token's output non-finite; the routing of the
  /// other tokens and their outputs are unaffected, and every expert index stays in range.
  /// Throws shape_error on a shape mismatch, before any work.
  template <class XDerived, class Y>
  void forward(const Eigen::DenseBase<XDerived>& x, Y&& y, Workspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>,
                  "moe: x must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
    static_assert(std::is_same_v<typename XDerived::Scalar, T>, "moe: x has the wrong scalar");
    using YType = std::remove_cv_t<std::remove_reference_t<Y>>;
    static_assert(std::is_base_of_v<Eigen::DenseBase<YType>, YType>,
                  "moe: y must be an Eigen matrix [num_tokens x d_model] (moe::RowMatrix<T>)");
    if constexpr (std::is_base_of_v<Eigen::DenseBase<YType>, YType>) {
      static_assert(is_row_major_v<YType>,
                    "moe: y must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
      static_assert(std::is_same_v<typename YType::Scalar, T>, "moe: y has the wrong scalar");
      if constexpr (is_row_major_v<YType> && std::is_same_v<typename YType::Scalar, T>) {
        forward_impl(MatrixRef<T>(x.derived()), MatrixMut<T>(y), ws, executor);
      }
    }
  }

  /// y = MoE(x), allocating: returns a new [num_tokens x d_model] matrix, computed serially with
  /// a workspace of its own (the first-use convenience; servers call the overload above with a
  /// reused workspace). x as above. Throws shape_error.
  template <class XDerived>
  RowMatrix<T> forward(const Eigen::DenseBase<XDerived>& x) const {
    RowMatrix<T> y(x.rows(), config_.d_model);
    Workspace<T> ws;
    forward(x, y, ws);
    return y;
  }

  /// Sizes ws for forward calls of up to max_tokens tokens on up to num_workers executor
  /// workers, for this block's gating (its slots per token) and expert storage (the compact
  /// decode scratch): such calls then allocate nothing of ours (Eigen's GEMM aside). In training
  /// mode (ws.set_training(true) first) the training buffers too. Throws config_error on
  /// max_tokens < 0 or num_workers < 1.
  void reserve(Workspace<T>& ws, Index max_tokens, Index num_workers = 1) const {
    const Index slots = router_.gating().slots(config_);
    const Index prepared_floats = (prepared_bytes(experts(), max_tokens * slots) + 3) / 4;
    detail::WorkspaceAccess::reserve(ws, config_, max_tokens, num_workers, slots,
                                     decode_scratch_floats(experts(), max_tokens),
                                     prepared_floats);
  }

 private:
  using Access = detail::WorkspaceAccess;

  // route -> plan -> gather -> experts (+ shared expert) -> combine.
  void forward_impl(const MatrixRef<T>& x, MatrixMut<T> y, Workspace<T>& ws,
                    const Executor& executor) const {
    const Index num_tokens = x.rows(), d = config_.d_model;
    detail::check_shape("x", x.rows(), x.cols(), num_tokens, d);
    detail::check_shape("y", y.rows(), y.cols(), num_tokens, d);

    router_.route(config_, x, weights_, ws, executor);
    DispatchPlan& plan = Access::plan(ws);
    plan.build(Access::routing(ws));
    Access::stats(ws).compute(Access::routing(ws), plan);
    if (num_tokens == 0) return;
    note_routed(experts(), plan.counts.data());  // mapped experts: read-ahead of chosen pages

    const GroupedRows<T> rows = grouped_rows(plan, ws, executor.num_workers());
    // Nemotron-H latent experts: they see h = x W1^T [T x L]; their weighted sum is projected
    // back by W2 after the combine. Both [T x L] halves live in one workspace buffer.
    const Index L = config_.latent_dim;
    T* latent = L > 0 ? Access::latent(ws).ensure(2 * num_tokens * L) : nullptr;
    if (L > 0) {
      kernels::gemm_small_nt<T>(x.data(), num_tokens, x.outerStride(), weights_.latent_in.data(), d,
                                d, 0, L, latent, L);
      gather_rows(MatrixRef<T>(ConstMap<T>(latent, num_tokens, L)), plan,
                  Access::x_rows(ws).data());
    } else {
      gather_rows(x, plan, Access::x_rows(ws).data(), executor);
    }
    if (weights_.expert_input_norm.size() != 0) {
      rms_norm_rows(Access::x_rows(ws).data(), plan.num_rows, weights_.expert_input_norm.data());
    }
    const auto weights = std::as_const(Access::routing(ws)).weights();
    if (config_.weight_expert_input) scale_gathered_rows(plan, weights, Access::x_rows(ws).data());
    const SharedJob shared = shared_job(x, ws);

    // Jobs 0..E-1: the routed experts on their gathered rows; job E: the shared expert on the
    // tokens (read in place, strided). Each job runs as (job, column-block) tasks in two phases
    // (input projection + activation, then output projection); see detail::run_ffn_jobs.
    const auto& stack = experts();
    const Index num_shared = shared.present ? 1 : 0;
    detail::run_ffn_jobs<Ffn>(
        config_.num_experts,
        [&](Index e) {
          auto job = detail::grouped_expert_job(stack, rows, e);
          job.glu = config_.expert_glu;
          return job;
        },
        num_shared, [&](Index) { return shared.job; },
        Access::task_begin(ws).ensure(config_.num_experts + num_shared + 1), executor);
    copy_zero_expert_rows(plan, rows);

    const T* s_gate = shared.present ? shared_gates(x, ws) : nullptr;
    CombineOptions<T> combine;
    combine.unit_weights = config_.weight_expert_input;
    combine.routed_scale = static_cast<T>(gating::routed_output_scale(router_.gating()));
    combine.routed_bias = weights_.output_bias.size() ? weights_.output_bias.data() : nullptr;
    combine.shared_average = config_.shared_combine == SharedCombine::average;
    combine.float32 = config_.combine_in_float32;
    if (L > 0) {
      T* routed = latent + num_tokens * L;
      combine_expert_outputs(plan, weights, rows.y, static_cast<const T*>(nullptr),
                             static_cast<const T*>(nullptr),
                             MatrixMut<T>(MutMap<T>(routed, num_tokens, L)), executor, combine);
      kernels::gemm_small_nt<T>(routed, num_tokens, L, weights_.latent_out.data(), L, L, 0, d,
                                y.data(), y.outerStride());
      if (shared.present) {
        for (Index t = 0; t < num_tokens; ++t) {
          y.row(t) += s_gate[t] * ConstMap<T>(shared.job.y + t * d, 1, d);
        }
      }
    } else {
      combine_expert_outputs(plan, weights, rows.y, shared.present ? shared.job.y : nullptr, s_gate,
                             y, executor, combine);
    }
    if (weights_.expert_output_norm.size() != 0) {
      for (Index t = 0; t < num_tokens; ++t) {
        rms_norm_rows(&y(t, 0), 1, weights_.expert_output_norm.data());
      }
    }
  }

  // rows [n x d_model] (contiguous) = rmsnorm(row) * w, in float32 as HF's Gemma 4 norms:
  // x * rsqrt(mean x^2 + eps) * w, then back to T.
  void rms_norm_rows(T* rows, Index n, const T* w) const {
    const Index d = config_.d_model;
    const float eps = static_cast<float>(config_.router_norm_eps);
    for (Index r = 0; r < n; ++r) {
      T* row = rows + r * d;
      float ms = 0;
      for (Index c = 0; c < d; ++c) ms += static_cast<float>(row[c]) * static_cast<float>(row[c]);
      const float inv = 1.0f / std::sqrt(ms / static_cast<float>(d) + eps);
      for (Index c = 0; c < d; ++c) {
        row[c] = static_cast<T>(static_cast<float>(row[c]) * inv * static_cast<float>(w[c]));
      }
    }
  }

  // Throws config_error for GLU numbers the Ffn kind cannot apply.
  void check_ffn_numbers() const {
    for (const GluOptions* g : {&config_.expert_glu, &config_.shared_glu}) {
      if (!g->plain() && !Ffn::gated) {
        throw config_error("moe: expert_glu / shared_glu clamps need a gated Ffn kind");
      }
      if (g->alpha != 1.0 && !std::is_same_v<typename Ffn::activation, Silu>) {
        throw config_error(
            detail::concat("moe: glu alpha = ", g->alpha, " needs Silu experts (gpt-oss)"));
      }
    }
    // Llama 4's input weighting scales the gathered rows before any expert product: every
    // storage supports it. The packed epilogue applies the plain activation only.
    if (packed && !config_.expert_glu.plain()) {
      throw config_error(
          "moe: packed experts apply the plain GLU only (gpt-oss's clamp needs NativeExperts or "
          "CompactExperts)");
    }
    // Latent experts (Nemotron-H) have d_model = latent_dim, which compact stacks are not
    // checked or loaded for.
    if (compact && config_.latent_dim > 0) {
      throw config_error(detail::concat("moe: compact experts do not support latent_dim = ",
                                        config_.latent_dim, " (Nemotron-H): use NativeExperts"));
    }
  }

  // Llama 4: each gathered row is scaled by its slot's routing weight before the expert.
  template <class W>
  void scale_gathered_rows(const DispatchPlan& plan, const W& weights, T* x_rows) const {
    const Index d = config_.expert_d_model();
    for (Index t = 0; t < plan.num_tokens; ++t) {
      for (Index j = 0; j < plan.slots; ++j) {
        const Index r = plan.slot_row[static_cast<std::size_t>(t * plan.slots + j)];
        if (r < 0) continue;
        const T w = static_cast<T>(weights(t, j));
        for (T* v = x_rows + r * d; v != x_rows + (r + 1) * d; ++v) *v *= w;
      }
    }
  }

  // Zero (identity) experts after the E routed ones (LongCat): their rows' output is their input.
  void copy_zero_expert_rows(const DispatchPlan& plan, const GroupedRows<T>& rows) const {
    const Index d = config_.expert_d_model();
    for (Index e = config_.num_experts; e < plan.num_experts; ++e) {
      const Index begin = plan.offsets[static_cast<std::size_t>(e)];
      const Index n = plan.counts[static_cast<std::size_t>(e)];
      std::copy(rows.x + begin * d, rows.x + (begin + n) * d, rows.y + begin * d);
    }
  }

  // The grouped rows of this call in ws: inference applies the activation in place over the
  // gate columns; training keeps the pre-activation for the backward pass and writes the
  // activations separately. Compact prefill: per-worker scratch for one decoded weight tile.
  GroupedRows<T> grouped_rows(const DispatchPlan& plan, Workspace<T>& ws, Index workers) const {
    const Index N = plan.num_rows, d = config_.expert_d_model(), in = experts().in_rows();
    const Index f = config_.d_ff;
    GroupedRows<T> rows;
    rows.x = Access::x_rows(ws).ensure(N * d);
    rows.offsets = plan.offsets.data();
    rows.counts = plan.counts.data();
    rows.hidden = Access::hidden(ws).ensure(N * in);
    rows.act = ws.training() ? Access::act(ws).ensure(N * f) : rows.hidden;
    rows.ld_act = ws.training() ? f : in;
    rows.y = Access::y_rows(ws).ensure(N * d);
    const Index max_rows =
        *std::max_element(plan.counts.begin(), plan.counts.begin() + config_.num_experts);
    rows.scratch_stride = decode_scratch_floats(experts(), max_rows);
    // Converted inputs (fast compact modes) after the workers' decode scratch, in floats.
    const Index prepared_floats = (prepared_bytes(experts(), N) + 3) / 4;
    if (rows.scratch_stride > 0 || prepared_floats > 0) {
      T* scratch =
          Access::compact_scratch(ws).ensure(workers * rows.scratch_stride + prepared_floats);
      if (rows.scratch_stride > 0) rows.scratch = scratch;
      if (prepared_floats > 0) {
        rows.prepared = reinterpret_cast<unsigned char*>(scratch + workers * rows.scratch_stride);
      }
    }
    return rows;
  }

  struct SharedJob {
    bool present = false;
    detail::FfnJob<T, DenseOperand<T>> job;
  };
  // The shared expert (job E) on all tokens of x, in place (strided), buffers in ws.
  SharedJob shared_job(const MatrixRef<T>& x, Workspace<T>& ws) const {
    SharedJob s;
    if (config_.shared_d_ff <= 0) return s;
    const Index n = x.rows(), fs = config_.shared_d_ff, in_s = weights_.shared.in_rows();
    T* hidden = Access::shared_hidden(ws).ensure(n * in_s);
    T* act = ws.training() ? Access::shared_act(ws).ensure(n * fs) : hidden;
    const Index ld_act = ws.training() ? fs : in_s;
    T* out = Access::shared_y(ws).ensure(n * config_.d_model);
    s.present = true;
    s.job = detail::expert_job(weights_.shared, 0, x.data(), x.outerStride(), n, hidden, act,
                               ld_act, out);
    s.job.glu = config_.shared_glu;
    return s;
  }

  // [T] the shared expert's scale per token (Qwen2-MoE sigmoid gate, else 1), kept in ws for
  // the backward pass.
  const T* shared_gates(const MatrixRef<T>& x, Workspace<T>& ws) const {
    T* s_gate = Access::shared_gate(ws).ensure(x.rows());
    for (Index t = 0; t < x.rows(); ++t) {
      s_gate[t] = config_.shared_expert_gate
                      ? kernels::sigmoid<T>(x.row(t).dot(weights_.shared_gate.row(0)))
                      : T(1);
    }
    return s_gate;
  }

  MoeConfig config_;
  MoeWeights<T> weights_;
  Router<T, Gating> router_;
  CompactStack experts_;  ///< the routed experts with compact storage (else empty)
};

}  // namespace moe
