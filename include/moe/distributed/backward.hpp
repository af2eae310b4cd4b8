// moe: the backward pass of ExpertParallelBlock through the same exchange as its forward.
//
// After a forward in training mode (ws.set_training(true)), for the loss of block_backward
// (moe/backward.hpp) on the concatenation of every rank's tokens:
//   1. the token's rank forms dL/d routing weight (dy . expert output) and the output gradient
//      rows w * dy of its slots, in the forward's send order;
//   2. MPI_Alltoallv with the forward's counts takes them to the experts' ranks, which group them
//      by expert in global token order (the single-process plan's order) and run the experts'
//      backward there: expert weight gradients stay on the expert's rank;
//   3. the reverse MPI_Alltoallv returns the input-gradient rows;
//   4. the token's rank runs the routing backward, the shared expert's backward and the router's
//      on its tokens, and sums dx in the single-process slot order.
// The auxiliary losses (balance, z) are defined on the whole batch: every rank all-gathers the
// router logits and chosen experts (E + k values per token; batch-dependent families already
// hold them from the forward) and differentiates the whole-batch loss, keeping its own rows.
// Replicated parameters (router, shared expert, its gate) get this rank's tokens' share of their
// gradient: allreduce_replicated_gradients sums them over the ranks (data parallelism).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moe/backward.hpp"
#include "moe/detail/backward_steps.hpp"
#include "moe/distributed/agree.hpp"
#include "moe/distributed/exchange.hpp"
#include "moe/distributed/mpi.hpp"
#include "moe/gradients.hpp"
#include "moe/losses/coefficients.hpp"

#include <mpi.h>

namespace moe::distributed {

/// Zero gradients shaped for this rank of `block`: the replicated tensors' full shapes, and in
/// experts this rank's experts only (local_experts() order).
template <class T, class Gating, class Ffn>
MoeGradients<T> zero_gradients(const ExpertParallelBlock<T, Gating, Ffn, NativeExperts>& block) {
  MoeGradients<T> g = MoeGradients<T>::zeros_like(block.replicated_weights());
  const ExpertStack<T>& ex = block.local_experts();
  g.experts = ExpertStack<T>(ex.num_experts(), ex.d_model(), ex.d_ff(), ex.gated());
  return g;
}

/// Sums the gradients of the replicated parameters (router, router noise, shared expert, shared
/// gate) over the ranks of `comm` in place (MPI_Allreduce, MPI_SUM), so that every rank holds the
/// whole batch's gradient; the routed experts' (rank-local) are left alone. Collective. The sum's
/// order is MPI's, not the single process's token order: equal to block_backward's gradient to
/// rounding (about 1e-6 relative in float), not bitwise.
template <class T>
void allreduce_replicated_gradients(MPI_Comm comm, MoeGradients<T>& grads) {
  auto sum = [&](T* data, Index n) {
    if (n > 0)
      MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), detail::mpi_type<T>(), MPI_SUM, comm);
  };
  sum(grads.router.data(), grads.router.size());
  sum(grads.router_noise.data(), grads.router_noise.size());
  sum(grads.shared.stacked_in().data(), grads.shared.stacked_in().size());
  sum(grads.shared.stacked_out().data(), grads.shared.stacked_out().size());
  sum(grads.shared_gate.data(), grads.shared_gate.size());
}

namespace detail {

/// The backward's access to the workspace's saved forward values and scratch.
struct BackwardAccess {
  template <class T>
  static const char* exchange_unsupported_feature(const MoeConfig& config,
                                                  const MoeWeights<T>& w) {
    if (config.router_logit_softcap > 0) return "router logit soft-capping";
    if (w.router_logit_bias.size() != 0) return "a router logit bias";
    if (w.expert_table.size() != 0) return "hash routing";
    if (!config.expert_glu.plain() || !config.shared_glu.plain()) return "clamped GLU experts";
    if (config.weight_expert_input) return "weights applied to the expert input";
    if (config.shared_combine != SharedCombine::sum) return "this shared-expert combine";
    if (w.output_bias.size() != 0 || w.shared.has_biases()) return "expert biases";
    return nullptr;
  }

  template <class T, class Gating, class Ffn>
  static void validate(const ExpertParallelBlock<T, Gating, Ffn, NativeExperts>& block,
                       const MatrixRef<T>& x, const MatrixRef<T>& dy, const MatrixMut<T>& dx,
                       const ExpertParallelWorkspace<T>& ws, const MoeGradients<T>& grads,
                       const LossCoefficients& coeffs) {
    const MoeConfig& config = block.config();
    const MoeWeights<T>& W = block.replicated_weights();
    if (!ws.training_ || ws.trained_tokens_ < 0) {
      throw config_error(
          "moe: expert_parallel_backward needs a workspace filled by forward() in training mode "
          "(call ws.set_training(true) before forward)");
    }
    if (ws.trained_tokens_ != x.rows()) {
      throw shape_error(
          moe::detail::concat("moe: expert_parallel_backward: the workspace holds "
                              "the forward of ",
                              ws.trained_tokens_, " tokens, x has ", x.rows()));
    }
    moe::detail::check_shape("dy", dy.rows(), dy.cols(), x.rows(), config.d_model);
    moe::detail::check_shape("dx", dx.rows(), dx.cols(), x.rows(), config.d_model);
    auto same = [](const char* what, const auto& g, const auto& p) {
      moe::detail::check_shape(what, g.rows(), g.cols(), p.rows(), p.cols());
    };
    same("gradient of the router weight", grads.router, W.router);
    same("gradient of the router noise weight", grads.router_noise, W.router_noise);
    same("gradient of the local experts' input projections", grads.experts.stacked_in(),
         block.local_experts().stacked_in());
    same("gradient of the local experts' output projections", grads.experts.stacked_out(),
         block.local_experts().stacked_out());
    same("gradient of the shared expert's input projection", grads.shared.stacked_in(),
         W.shared.stacked_in());
    same("gradient of the shared expert's output projection", grads.shared.stacked_out(),
         W.shared.stacked_out());
    same("gradient of the shared expert gate", grads.shared_gate, W.shared_gate);
    const char* what = moe::detail::undifferentiated_feature(config, W);
    // What block_backward differentiates but this backward does not carry through the exchange
    // yet (the newer families' extras: docs/families.md).
    if (what == nullptr) what = exchange_unsupported_feature(config, W);
    if (what == nullptr && block.local_experts().has_biases()) what = "expert biases";
    if (what == nullptr && gating::routed_output_scale(block.gating()) != 1.0) {
      what = "a routed output scale";
    }
    if (what != nullptr) {
      throw config_error(
          moe::detail::concat("moe: expert_parallel_backward does not "
                              "differentiate ",
                              what, " yet"));
    }
    if (block.exchange_options().bf16_rows) {
      throw config_error(
          "moe: expert_parallel_backward exchanges rows in the block's scalar; bf16_rows is for "
          "inference");
    }
    if (coeffs.token_mask && coeffs.aux_loss != AuxLoss::load_balancing) {
      throw config_error(
          "moe: LossCoefficients::token_mask applies to AuxLoss::load_balancing only");
    }
    if (coeffs.importance != 0 || coeffs.load != 0) {
      throw config_error(
          "moe: LossCoefficients::importance and load apply to noisy top-k gating only");
    }
    if (coeffs.aux_loss == AuxLoss::switch_top1 || coeffs.aux_loss == AuxLoss::deepseek_sequence) {
      losses::detail::check_sequences(global_tokens(block, ws), coeffs.seq_len);
    }
  }

  template <class T, class Gating, class Ffn>
  static Index global_tokens(const ExpertParallelBlock<T, Gating, Ffn, NativeExperts>& block,
                             const ExpertParallelWorkspace<T>& ws) {
    Index total = 0;
    for (int r = 0; r < block.num_ranks(); ++r) total += ws.counts_[std::size_t(r)];
    return total;
  }

  /// All-gathers rows of `cols` values (MPI type `type`) of every rank, tokens_of[r] rows each.
  template <class V, class U>
  static void gather_rows(MPI_Comm comm, const V* mine, Index cols, MPI_Datatype type, U* all,
                          const std::int64_t* tokens_of, int R, std::vector<int>& ints, int me) {
    RowType row(static_cast<int>(cols), type);
    ints.assign(2 * static_cast<std::size_t>(R), 0);
    for (int r = 0, at = 0; r < R; ++r) {
      ints[std::size_t(r)] = to_int(tokens_of[r], "tokens of a rank");
      ints[static_cast<std::size_t>(R) + static_cast<std::size_t>(r)] = at;
      at += ints[std::size_t(r)];
    }
    MPI_Allgatherv(mine, ints[std::size_t(me)], row.type, all, ints.data(), ints.data() + R,
                   row.type, comm);
  }

  template <class T, class Gating, class Ffn>
  static LossValues run(const ExpertParallelBlock<T, Gating, Ffn, NativeExperts>& block,
                        const MatrixRef<T>& x, const MatrixRef<T>& dy,
                        ExpertParallelWorkspace<T>& ws, MoeGradients<T>& grads, MatrixMut<T> dx,
                        const LossCoefficients& coeffs, bool any_mask, const Executor& executor) {
    using S = RouteScalar<T>;
    MPI_Comm comm = block.communicator();
    const int R = block.num_ranks(), me = block.rank();
    const MoeConfig& config = block.config();
    const MoeWeights<T>& W = block.replicated_weights();
    const ExpertStack<T>& ex = block.local_experts();
    const Index d = config.d_model, E = config.num_experts, f = config.d_ff, in = ex.in_rows();
    const Index L = block.placement().max_local(), num_local = ex.num_experts();
    const std::size_t RL = static_cast<std::size_t>(R * L);
    const ExchangePlan plan(ws.counts_.data(), R, L);
    Index offset = 0, total = 0;
    for (int r = 0; r < R; ++r) {
      if (r < me) offset += plan.tokens_of[r];
      total += plan.tokens_of[r];
    }
    LossValues values;
    if (total == 0) return values;  // every rank: total is global
    const Index T_mine = x.rows(), num_send = plan.send_off[RL], num_recv = plan.recv_off[RL];
    const int* scount = ws.mpi_ints_.data();
    const int *sdispl = scount + R, *rcount = sdispl + R, *rdispl = rcount + R;
    const Routing<S>& routing = ws.routing();
    const Index slots = routing.slots();
    const Index* slot_row = ws.back_plan_.slot_row.data();
    BackwardWorkspace<T>& b = ws.backward_;
    RowType row(static_cast<int>(d), mpi_type<T>());

    // ---- output-gradient rows to the experts' ranks ----------------------------------------
    S* dweights = b.dweights_.ensure(T_mine * slots);
    T* d_send = ws.d_send_.ensure(num_send * d);
    moe::detail::routing_weight_gradients<T, S>(slot_row, routing.weights(), dy, ws.back_.data(),
                                                dweights, d_send);
    T* d_recv = ws.d_recv_.ensure(num_recv * d);
    MPI_Alltoallv(d_send, scount, sdispl, row.type, d_recv, rcount, rdispl, row.type, comm);
    T* d_rows = b.d_rows_.ensure(num_recv * d);
    plan.for_each_received_block(R, L, num_local, [&](auto wire, auto grouped, auto n) {
      std::copy(d_recv + wire * d, d_recv + (wire + n) * d, d_rows + grouped * d);
    });

    // ---- local experts (one task each) and the shared expert on this rank's tokens -----------
    T* dh = b.dh_.ensure(num_recv * in);
    const bool has_shared = config.shared_d_ff > 0;
    const bool has_gate = has_shared && config.shared_expert_gate;
    T* ds_y = has_shared ? b.ds_y_.ensure(T_mine * d) : nullptr;
    T* ds_h = has_shared ? b.ds_h_.ensure(T_mine * W.shared.in_rows()) : nullptr;
    T* dgate = has_shared ? b.dgate_.ensure(T_mine) : nullptr;
    const LocalExpertScratch<T>& saved = ws.experts_;
    executor.run(num_local + (has_shared ? 1 : 0), [&](Index task, Index) {
      if (task < num_local) {
        const Index at = plan.expert_off[task], n = plan.expert_off[task + 1] - at;
        moe::detail::ffn_backward_rows<Ffn, T>(
            ex.w_in(task), ex.w_out(task), grads.experts.w_in(task), grads.experts.w_out(task),
            ws.x_rows_.data() + at * d, d, saved.hidden.data() + at * in, saved.act.data() + at * f,
            f, n, dh + at * in, d_rows + at * d);
        return;
      }
      // Row by row exactly when the single-process block is, i.e. decided on the whole batch.
      moe::detail::shared_expert_backward<Ffn, T>(
          config, W, grads, x, dy, ws.shared_y_.data(), saved.shared_gate.data(),
          saved.shared_hidden.data(), saved.shared_act.data(), use_stream<T>(total, d), ds_y, ds_h,
          dgate);
    });

    // ---- input-gradient rows back to the tokens' ranks, in send order ------------------------
    plan.for_each_received_block(R, L, num_local, [&](auto wire, auto grouped, auto n) {
      std::copy(d_rows + grouped * d, d_rows + (grouped + n) * d, d_recv + wire * d);
    });
    MPI_Alltoallv(d_recv, rcount, rdispl, row.type, d_send, scount, sdispl, row.type, comm);

    // ---- routing backward on this rank's rows of the whole batch's dlogits -------------------
    S* dlogits_all = b.dlogits_.ensure(total * E);
    std::fill(dlogits_all, dlogits_all + total * E, S(0));
    S* dlogits = dlogits_all + offset * E;
    block.gating().backward(config, routing, dweights, dlogits);
    Routing<S>& global = ws.global_;
    if (!ws.whole_batch_) {  // per-token families: gather what the whole-batch losses read
      global.resize(total, E, slots);
      gather_rows(comm, routing.logits().data(), E, mpi_type<S>(), global.logits().data(),
                  plan.tokens_of, R, ws.gather_ints_, me);
      gather_rows(comm, routing.experts().data(), slots, MPI_INT32_T, global.experts().data(),
                  plan.tokens_of, R, ws.gather_ints_, me);
    }
    LossCoefficients whole = coeffs;
    if (any_mask) {
      double* mask = ws.token_mask_.ensure(total);
      gather_rows(comm, coeffs.token_mask, 1, MPI_DOUBLE, mask, plan.tokens_of, R, ws.gather_ints_,
                  me);
      whole.token_mask = mask;
    }
    const MatrixRef<S> logits_all(ConstMap<S>(global.logits().data(), total, E));
    moe::detail::add_routing_losses<S>(config, whole, logits_all, global.experts(), dlogits_all,
                                       values);

    // ---- router, shared gate; dx in the single-process order ---------------------------------
    moe::detail::router_input_backward<T, S>(W, grads, x, dlogits, has_gate ? dgate : nullptr, dx);
    moe::detail::add_expert_input_gradients<T>(slot_row, slots, d_send, ds_y,
                                               has_gate ? dgate : nullptr, W.shared_gate, dx);
    return values;
  }
};

}  // namespace detail

/// Backward of ExpertParallelBlock::forward on this rank's tokens, for the loss of
/// block_backward on the concatenation of all ranks' tokens (rank order):
///   L = <y, dy> + coeffs.aux * L_aux + coeffs.z * L_z,
/// with the auxiliary losses over the whole batch (coeffs.token_mask: this rank's [tokens]
/// mask; pass one on every rank that has tokens, or on none). Collective. WRITES dx [tokens x
/// d_model] and ADDS into grads (shaped by zero_gradients(block)): this rank's experts' weight
/// gradients (from every rank's tokens routed to them), and this rank's tokens' share of the
/// replicated parameters' gradients (sum them with allreduce_replicated_gradients). Returns the
/// whole batch's raw loss values (the same on every rank).
///
/// ws must hold this block's forward of x in training mode (ws.set_training(true) before
/// forward). Bitwise equal to block_backward on the concatenated batch: dx, dL/d routing weights
/// and every local expert's weight gradients; the shared expert's part of dx only while the
/// single-process backward runs it row by row (use_stream: at most 16 tokens or 768 KiB of x in
/// the whole batch, as its forward). Noisy top-k gating, compact storage, bf16_rows: not
/// supported (compile time / config_error).
///
/// Throws (every rank, agreed) config_error / shape_error before any exchange when any rank's
/// workspace, shapes, gradients or coefficients are wrong; a failure after the exchange has
/// begun aborts the job with the message (or_abort).
template <class T, class Gating, class Ffn, class XDerived, class DyDerived>
LossValues expert_parallel_backward(
    const ExpertParallelBlock<T, Gating, Ffn, NativeExperts>& block,
    const Eigen::DenseBase<XDerived>& x_in, const Eigen::DenseBase<DyDerived>& dy_in,
    ExpertParallelWorkspace<T>& ws, MoeGradients<T>& grads,
    MatrixMut<typename ExpertParallelBlock<T, Gating, Ffn, NativeExperts>::Scalar> dx,
    const LossCoefficients& coeffs = {}, const Executor& executor = serial_executor()) {
  static_assert(is_row_major_v<XDerived> && is_row_major_v<DyDerived>,
                "moe: x and dy must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
  static_assert(
      std::is_same_v<typename XDerived::Scalar, T> && std::is_same_v<typename DyDerived::Scalar, T>,
      "moe: x / dy have the wrong scalar");
  static_assert(!Gating::uses_noise,
                "moe: expert_parallel_backward does not support noisy top-k gating (its load loss "
                "needs the whole batch's noise)");
  const MatrixRef<T> x(x_in.derived());
  const MatrixRef<T> dy(dy_in.derived());
  // Whether any rank passes a token mask (then every rank with tokens must): its gather is
  // collective.
  int mask_flags[2] = {coeffs.token_mask != nullptr ? 1 : 0,
                       coeffs.token_mask == nullptr && x.rows() > 0 ? 1 : 0};
  MPI_Allreduce(MPI_IN_PLACE, mask_flags, 2, MPI_INT, MPI_MAX, block.communicator());
  const bool any_mask = mask_flags[0] == 1;
  agree(block.communicator(), [&] {
    detail::BackwardAccess::validate(block, x, dy, dx, ws, grads, coeffs);
    if (any_mask && mask_flags[1] == 1) {
      throw config_error(
          "moe: LossCoefficients::token_mask must be given on every rank with tokens or on none");
    }
  });
  LossValues values;
  or_abort(block.communicator(), [&] {
    values = detail::BackwardAccess::run(block, x, dy, ws, grads, dx, coeffs, any_mask, executor);
  });
  return values;
}

}  // namespace moe::distributed
