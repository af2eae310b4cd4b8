// moe/io: the weights of one layer read from a checkpoint, names from the family's row of
// families.hpp: a sparse layer's MoeWeights (all experts, or a chosen subset for an
// expert-parallel rank: load_moe_shard), a dense layer's FFN, and the gating options config.json
// implies for a gating policy.
//
//   const auto m = moe::io::ModelCheckpoint::open("DeepSeek-V3");
//   moe::io::LoadOptions o;
//   o.experts = {4, 5, 6, 7};                         // this rank's experts, in this order
//   const auto shard = moe::io::load_moe_shard<float>(m, 3, o);
//   // shard.weights: router [E x d_model], bias, shared expert; experts 4..7 only
//   const auto g = shard.gating_options<moe::gating::GroupLimitedTopK>();
//
// Every tensor's shape is checked against config.json before anything is allocated, so sizes are
// bounded by the files; every value read is checked finite. Floating dtypes (F32, F64, F16, BF16,
// F8_E4M3) convert to the scalar; a DeepSeek-V3 FP8 weight W with a sibling W_scale_inv is
// dequantised block by block.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/activations.hpp"
#include "moe/config.hpp"
#include "moe/dense.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/families.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/tensor.hpp"
#include "moe/weights.hpp"

namespace moe::io {

namespace detail {

/// Does the Ffn type compute what config.json's activation names?
template <class Ffn>
bool ffn_matches(const std::string& act) {
  using A = typename Ffn::activation;
  if constexpr (std::is_same_v<A, Silu>) return act == "silu" || act == "swish";
  if constexpr (std::is_same_v<A, Relu>) return act == "relu";
  if constexpr (std::is_same_v<A, Gelu>) return act == "gelu";
  if constexpr (std::is_same_v<A, GeluTanh>) {
    return act == "gelu_pytorch_tanh" || act == "gelu_new" || act == "gelu_fast";
  }
  return false;
}

template <class>
inline constexpr bool no_family_routes_with_v = false;

}  // namespace detail

/// Throws config_error unless the Ffn type is the family's (gated or plain, and the activation
/// config.json names): "moe: DIR/config.json: switch_transformers experts are plain with
/// activation 'relu'; the block type's Ffn is gated and does not match".
template <class Ffn>
void check_ffn(const ModelSpec& s) {
  const bool gated = s.row().gated_experts;
  if (Ffn::gated != gated || !detail::ffn_matches<Ffn>(s.hidden_act)) {
    throw config_error(moe::detail::concat(
        "moe: ", s.source, ": ", family_name(s.family), " experts are ", gated ? "gated" : "plain",
        " with activation '", s.hidden_act, "'; the block type's Ffn is ",
        Ffn::gated ? "gated" : "plain", " and does not match"));
  }
}

namespace detail {

/// `base` as the Options of a policy type: the same type, or a family's Options deriving from
/// it (a family name whose defaults differ; the loader overrides every field it reads).
template <class Want, class Have>
Want as_options(const Have& base) {
  if constexpr (std::is_same_v<Want, Have>) {
    return base;
  } else {
    static_assert(std::is_base_of_v<Have, Want>,
                  "moe::io: the policy's Options must be its generic policy's Options or derive "
                  "from them");
    Want w{};
    static_cast<Have&>(w) = base;
    return w;
  }
}

}  // namespace detail

/// The gating options config.json implies for policy G (norm_topk_prob, n_group, topk_group,
/// routed_scaling_factor, expert_capacity): G is a generic policy or a family type deriving from
/// one. Throws config_error when G is not the policy the family routes with: "moe:
/// DIR/config.json: deepseek_v3 routes with gating::GroupLimitedTopK; the block type uses
/// gating::SoftmaxTopK".
template <class G>
typename G::Options gating_options(const ModelSpec& s, const LoadOptions& lo = {}) {
  using Want = typename G::Options;
  const RoutingKind kind = s.row().routing;
  auto require = [&](RoutingKind want, const char* have) {
    if (kind != want) {
      throw config_error(moe::detail::concat("moe: ", s.source, ": ", family_name(s.family),
                                             " routes with ", s.row().gating,
                                             "; the block type uses ", have));
    }
  };
  if constexpr (std::is_base_of_v<gating::SoftmaxTopK, G>) {
    require(RoutingKind::softmax_top_k, "gating::SoftmaxTopK");
    typename gating::SoftmaxTopK::Options o{};
    o.normalize = s.norm_topk_prob;
    return detail::as_options<Want>(o);
  } else if constexpr (std::is_base_of_v<gating::GroupLimitedTopK, G>) {
    require(RoutingKind::deepseek_v3, "gating::GroupLimitedTopK");
    return detail::as_options<Want>(gating::GroupLimitedTopK::Options::deepseek_v3(
        s.n_group, s.topk_group, s.routed_scaling_factor, s.norm_topk_prob));
  } else if constexpr (std::is_base_of_v<gating::DeepSeekV2, G>) {
    require(RoutingKind::deepseek_v2, "gating::DeepSeekV2");
    // HF DeepseekV2: with norm_topk_prob the weights are renormalised and NOT scaled.
    auto o = gating::DeepSeekV2::Options::deepseek_v2(
        s.n_group, s.topk_group, s.norm_topk_prob ? 1.0 : s.routed_scaling_factor);
    o.normalize = s.norm_topk_prob;
    return detail::as_options<Want>(o);
  } else if constexpr (std::is_base_of_v<gating::CapacityTopK, G>) {
    require(RoutingKind::capacity_top_1, "gating::CapacityTopK");
    return detail::as_options<Want>(
        lo.switch_dropless ? gating::CapacityTopK::Options::dropless()
                           : gating::CapacityTopK::Options::switch_transformers(s.expert_capacity));
  } else {
    static_assert(detail::no_family_routes_with_v<G>,
                  "moe::io: no checkpoint family routes with this policy");
  }
}

/// The weights of sparse layer `layer` in checkpoint orientation, converted to T, with the
/// routed experts options.experts (empty: all) in that order: router [E x d_model] (always all
/// E rows); the routed experts from the per-expert names or the v5 fused gate_up_proj/down_proj
/// (only the chosen [e] slices are read); the selection bias [E]; the shared expert(s) and its
/// gate [1 x d_model]. w.experts.num_experts() is the number of experts chosen.
/// Throws config_error when the layer is out of range or dense, or for an expert id out of range
/// or repeated ("moe: LoadOptions::experts[1] = 9 is out of range [0, 8) of DIR/config.json");
/// io_error naming a missing tensor ("moe: DIR: layer 3 (mixtral): missing tensor 'NAME'"), a
/// non-floating dtype, or a non-finite value ("moe: FILE: layer 3: tensor 'NAME' has a
/// non-finite value (nan at [i, j])"); shape_error naming the tensor and both shapes ("moe: DIR:
/// tensor 'NAME' has shape [a x b], config.json implies [c x d]").
template <class T>
MoeWeights<T> load_moe_weights(const ModelCheckpoint& m, Index layer,
                               const LoadOptions& options = {}) {
  const ModelSpec& s = m.spec();
  if (!s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a dense layer, not a sparse MoE layer"));
  }
  const std::vector<Index> chosen = detail::chosen_experts(s, options);
  const detail::LayerReader r(m, layer);
  const FamilyRow& row = s.row();
  const MoeConfig& c = s.moe;
  const std::int64_t E = c.num_experts, H = c.d_model, I = c.d_ff, S = c.shared_d_ff;
  const bool gated = row.gated_experts;

  // The prefix: the hub name, or the transformers v5 in-memory one when only that is present.
  std::string p = s.moe_prefix(layer);
  if (row.sparse_prefix_v5 != nullptr && !r.has(p + row.router)) {
    const std::string v5 = expand_name(row.sparse_prefix_v5, layer);
    if (r.has(v5 + row.router)) p = v5;
  }
  const std::string router = p + row.router;
  r.check(router, {E, H});
  if (row.refused_router_bias != nullptr && (s.router_bias || r.has(p + row.refused_router_bias))) {
    throw io_error("moe: " + m.directory() + ": '" + p + row.refused_router_bias +
                   "': a router bias is not supported");
  }
  const bool bias = row.router_bias != nullptr;
  if (bias) r.check(p + row.router_bias, {E});

  // Routed experts: fused (v5) or per expert; only the chosen ones are checked and read.
  const bool fused =
      row.fused_gate_up != nullptr && (r.has(p + row.fused_gate_up) || r.has(p + row.fused_down));
  const std::string fused_in = fused ? p + row.fused_gate_up : "";
  const std::string fused_out = fused ? p + row.fused_down : "";
  auto expert_name = [&](const char* pattern, Index e) {
    return p + expand_name(pattern, layer, e);
  };
  if (fused) {
    r.check(fused_in, {E, 2 * I, H});
    r.check(fused_out, {E, H, I});
  } else {
    for (Index e : chosen) {
      r.check(expert_name(row.expert_gate, e), {I, H});
      if (gated) r.check(expert_name(row.expert_up, e), {I, H});
      r.check(expert_name(row.expert_down, e), {H, I});
    }
  }
  // Shared expert(s).
  if (S > 0) {
    r.check(p + row.shared_gate, {S, H});
    r.check(p + row.shared_up, {S, H});
    r.check(p + row.shared_down, {H, S});
    if (c.shared_expert_gate) r.check(p + row.shared_expert_gate_name, {1, H});
  }

  // Every shape agrees: allocate and read.
  // Sized for the chosen experts only: a rank's shard never holds the others, even briefly.
  MoeWeights<T> w;
  w.experts = ExpertStack<T>(static_cast<Index>(chosen.size()), c.d_model, c.d_ff, gated);
  if (S > 0) w.shared = ExpertStack<T>(1, c.d_model, c.shared_d_ff, gated);
  w.router = r.read<T>(router);
  if (bias) w.router_bias = r.read<T>(p + row.router_bias).transpose();
  for (std::size_t j = 0; j < chosen.size(); ++j) {
    const Index e = chosen[j], slot = static_cast<Index>(j);
    if (fused) {
      r.read_rows_into<T>(fused_in, e * 2 * I, w.experts.w_in(slot));
      r.read_rows_into<T>(fused_out, e * H, w.experts.w_out(slot));
      continue;
    }
    r.read_into<T>(expert_name(row.expert_gate, e), w.experts.gate(slot));
    if (gated) r.read_into<T>(expert_name(row.expert_up, e), w.experts.up(slot));
    r.read_into<T>(expert_name(row.expert_down, e), w.experts.w_out(slot));
  }
  if (S > 0) {
    r.read_into<T>(p + row.shared_gate, w.shared.gate(0));
    r.read_into<T>(p + row.shared_up, w.shared.up(0));
    r.read_into<T>(p + row.shared_down, w.shared.w_out(0));
    if (c.shared_expert_gate) w.shared_gate = r.read<T>(p + row.shared_expert_gate_name);
  }
  return w;
}

/// What an expert-parallel block needs from one sparse layer: the config, the router, its bias,
/// the shared expert and its gate (replicated on every rank), and only the chosen experts'
/// weights. weights.experts holds experts[j] at index j; config.num_experts is the layer's
/// total (the router's rows).
template <class T>
struct MoeShard {
  ModelSpec spec;              ///< the checkpoint's config.json (spec.moe: the layer's sizes)
  Index layer = 0;             ///< the layer loaded
  LoadOptions options;         ///< the options it was loaded with
  std::vector<Index> experts;  ///< global ids of the experts held, in the order held
  MoeWeights<T> weights;       ///< router [E x d_model] etc.; experts: experts.size() of them

  /// The layer's sizes (num_experts: all E experts of the layer).
  const MoeConfig& config() const { return spec.moe; }
  /// The gating options of policy G for this layer; throws config_error as gating_options.
  template <class G>
  typename G::Options gating_options() const {
    return io::gating_options<G>(spec, options);
  }
};

/// Sparse layer `layer` with only the routed experts options.experts (empty: all), in that
/// order: see load_moe_weights for what is read and what it throws.
template <class T>
MoeShard<T> load_moe_shard(const ModelCheckpoint& m, Index layer, const LoadOptions& options) {
  MoeShard<T> shard;
  shard.weights = load_moe_weights<T>(m, layer, options);
  shard.spec = m.spec();
  shard.layer = layer;
  shard.options = options;
  shard.experts = detail::chosen_experts(m.spec(), options);
  return shard;
}

/// Opens `dir` (maps its files; only the chosen experts' bytes are read) and loads one shard.
template <class T>
MoeShard<T> load_moe_shard(const std::string& dir, Index layer, const LoadOptions& options) {
  return load_moe_shard<T>(ModelCheckpoint::open(dir), layer, options);
}

/// The dense FFN of a layer that is not sparse (DeepSeek below first_k_dense_replace, Qwen
/// mlp_only_layers, Switch blocks between sparse ones): the row's dense names ("PREFIX.{gate,up,
/// down}_proj.weight" of width intermediate_size, Switch "PREFIX.wi/wo.weight" of width d_ff).
/// Throws config_error for a sparse layer or a mismatched Ffn, io_error / shape_error as
/// load_moe_weights.
template <class T, class Ffn = SwiGLU>
DenseFfn<T, Ffn> load_dense_ffn(const ModelCheckpoint& m, Index layer) {
  const ModelSpec& s = m.spec();
  if (s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a sparse MoE layer, not a dense one"));
  }
  check_ffn<Ffn>(s);
  if (s.dense_d_ff <= 0) {
    throw config_error("moe: " + s.source + ": dense layers need intermediate_size");
  }
  const detail::LayerReader r(m, layer);
  const FamilyRow& row = s.row();
  const std::string p = s.moe_prefix(layer);
  const std::int64_t H = s.moe.d_model, F = s.dense_d_ff;
  ExpertStack<T> stack(1, H, F, Ffn::gated);
  r.check(p + row.dense_gate, {F, H});
  if constexpr (Ffn::gated) r.check(p + row.dense_up, {F, H});
  r.check(p + row.dense_down, {H, F});
  r.read_into<T>(p + row.dense_gate, stack.gate(0));
  if constexpr (Ffn::gated) r.read_into<T>(p + row.dense_up, stack.up(0));
  r.read_into<T>(p + row.dense_down, stack.w_out(0));
  return DenseFfn<T, Ffn>(std::move(stack));
}

}  // namespace moe::io
