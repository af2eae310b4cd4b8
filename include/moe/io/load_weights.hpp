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
// dequantised block by block; gpt-oss's MXFP4 experts (W_blocks + W_scales) are dequantised.
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
#include "moe/io/expert_biases.hpp"
#include "moe/io/families.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/io/mxfp4_experts.hpp"
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
  if constexpr (std::is_same_v<A, Relu2>) return act == "relu2";
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
    if (kind == RoutingKind::biased_scored) return detail::as_options<Want>(s.biased_options);
    require(RoutingKind::deepseek_v3, "gating::GroupLimitedTopK");
    return detail::as_options<Want>(gating::GroupLimitedTopK::Options::deepseek_v3(
        s.n_group, s.topk_group, s.routed_scaling_factor, s.norm_topk_prob));
  } else if constexpr (std::is_base_of_v<gating::ScoredTopK, G>) {
    if (kind == RoutingKind::scored) return detail::as_options<Want>(s.scored_options);
    if (kind == RoutingKind::biased_scored && s.row().hash_defaults != nullptr) {
      return detail::as_options<Want>(s.hash_options);  // a hash layer (load_any_moe_layer)
    }
    require(RoutingKind::deepseek_v2, "gating::DeepSeekV2");
    // HF DeepseekV2: with norm_topk_prob the weights are renormalised and NOT scaled.
    auto o = gating::DeepSeekV2::Options::deepseek_v2(
        s.n_group, s.topk_group, s.norm_topk_prob ? 1.0 : s.routed_scaling_factor);
    o.normalize = s.norm_topk_prob;
    return detail::as_options<Want>(o);
  } else if constexpr (std::is_base_of_v<gating::Sparsemixer, G>) {
    require(RoutingKind::sparsemixer, "gating::Sparsemixer");
    typename gating::Sparsemixer::Options o{};
    o.jitter_eps = s.jitter_eps;
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
  const std::int64_t He = c.expert_d_model(), L = c.latent_dim;  // the experts' input width
  const bool gated = row.gated_experts;

  const std::string p = detail::sparse_names_prefix(m, r, layer);
  const std::string router = p + row.router;
  if (row.refused_router_bias != nullptr && (s.router_bias || r.has(p + row.refused_router_bias))) {
    throw io_error("moe: " + m.directory() + ": '" + p + row.refused_router_bias +
                   "': a router bias is not supported");
  }
  const std::int64_t R = E + (s.row().biased_defaults ? s.biased_options.zero_experts : 0);
  if (R != E)
    r.check(router, {R, H});  // zero experts score too (LongCat)
  else
    r.check(router, {E, H});
  const bool bias = row.router_bias != nullptr && !s.is_hash_layer(layer);
  auto vector_shape = [&](const std::string& name, std::int64_t n) {
    // [n], or [1, n] (ERNIE moe_statics)
    if (r.has(name) && m.tensors().info(name).shape.size() == 2)
      return std::vector<std::int64_t>{1, n};
    return std::vector<std::int64_t>{n};
  };
  if (bias) r.check(p + row.router_bias, vector_shape(p + row.router_bias, R));
  auto optional_vector = [&](const char* name, std::int64_t n) {
    if (name == nullptr) return false;
    r.check(p + name, vector_shape(p + name, n));
    return true;
  };
  const bool logit_bias = optional_vector(row.router_logit_bias, R);
  const bool input_scale = optional_vector(row.router_input_scale, H);
  const bool weight_scale = optional_vector(row.expert_weight_scale, E);
  const bool out_bias = optional_vector(row.output_bias, H);
  const bool in_norm = row.expert_input_norm != nullptr && r.has(p + row.expert_input_norm) &&
                       optional_vector(row.expert_input_norm, H);
  const bool out_norm = row.expert_output_norm != nullptr && r.has(p + row.expert_output_norm) &&
                        optional_vector(row.expert_output_norm, H);
  const bool table = row.expert_table != nullptr && s.is_hash_layer(layer);
  if (L > 0) {
    r.check(p + row.latent_in, {L, H});
    r.check(p + row.latent_out, {H, L});
  }
  if (table && !r.has(p + row.expert_table)) {
    throw io_error(moe::detail::concat("moe: ", m.directory(), ": layer ", layer, " (",
                                       family_name(s.family), "): missing tensor '", p,
                                       row.expert_table, "'"));
  }

  // Routed experts: fused (MXFP4 blocks + scales, or floating) or per expert; only the chosen
  // ones are checked and read.
  const bool mxfp4 = row.fused_gate_up != nullptr && row.fused_down != nullptr && gated &&
                     has_mxfp4(m, p + row.fused_gate_up);
  const bool fused =
      mxfp4 ||
      (row.fused_gate_up != nullptr && (row.expert_gate == nullptr || r.has(p + row.fused_gate_up) ||
                                        (row.fused_down != nullptr && r.has(p + row.fused_down))));
  const std::string fused_in = fused ? p + row.fused_gate_up : "";
  const std::string fused_out = fused && row.fused_down ? p + row.fused_down : "";
  auto expert_name = [&](const char* pattern, Index e) {
    return p + expand_name(pattern, layer, e);
  };
  const FusedLayout layout = row.fused_layout;
  // Rows of the fused input tensor per expert; zero experts may add unused rows (LongCat).
  const std::int64_t E_in = fused && !mxfp4 && r.has(fused_in) &&
                                    m.tensors().info(fused_in).shape.size() == 3 &&
                                    m.tensors().info(fused_in).shape[0] == R
                                ? R
                                : E;
  if (mxfp4) {
    check_mxfp4(m, layer, fused_in, E, 2 * I, He);
    check_mxfp4(m, layer, fused_out, E, He, I);
  } else if (fused) {
    switch (layout) {
      case FusedLayout::out_in:
        r.check(fused_in, {E_in, 2 * I, He});
        r.check(fused_out, {E, He, I});
        break;
      case FusedLayout::in_out:
      case FusedLayout::in_out_interleaved:
        r.check(fused_in, {E, He, 2 * I});
        r.check(fused_out, {E, I, He});
        break;
      case FusedLayout::stacked_rows:
        r.check(fused_in, {E * I, He});
        r.check(p + row.fused_up, {E * I, He});
        r.check(fused_out, {E * I, He});
        break;
      case FusedLayout::plain_out_in:
        r.check(fused_in, {E, I, He});
        r.check(fused_out, {E, He, I});
        break;
    }
  } else {
    for (Index e : chosen) {
      r.check(expert_name(row.expert_gate, e), {I, He});
      if (gated) r.check(expert_name(row.expert_up, e), {I, He});
      r.check(expert_name(row.expert_down, e), {He, I});
    }
  }
  const bool expert_biases = row.expert_in_bias != nullptr;
  if (expert_biases) {
    r.check(p + row.expert_in_bias, {E, (gated ? 2 : 1) * I});
    r.check(p + row.expert_out_bias, {E, He});
  }
  // Shared expert(s); absent tensors mean none where the family allows it (Granite).
  const char* shared_in_name = row.shared_fused_in ? row.shared_fused_in : row.shared_gate;
  const bool shared = S > 0 && !(row.shared_optional && !r.has(p + shared_in_name));
  if (shared) {
    if (row.shared_fused_in != nullptr) {
      r.check(p + row.shared_fused_in, {(gated ? 2 : 1) * S, H});
    } else {
      r.check(p + row.shared_gate, {S, H});
      if (gated) r.check(p + row.shared_up, {S, H});
    }
    r.check(p + row.shared_down, {H, S});
    if (c.shared_expert_gate) r.check(p + row.shared_expert_gate_name, {1, H});
  }

  // Every shape agrees: allocate and read.
  // Sized for the chosen experts only: a rank's shard never holds the others, even briefly.
  MoeWeights<T> w;
  w.experts = ExpertStack<T>(static_cast<Index>(chosen.size()), c.expert_d_model(), c.d_ff, gated);
  if (expert_biases) w.experts.add_biases();
  if (shared) w.shared = ExpertStack<T>(1, c.d_model, c.shared_d_ff, gated);
  w.router = r.read<T>(router);
  auto read_vector = [&](const char* name) -> Vector<T> { return r.read<T>(p + name).transpose(); };
  if (bias) w.router_bias = read_vector(row.router_bias);
  if (logit_bias) w.router_logit_bias = read_vector(row.router_logit_bias);
  if (input_scale) w.router_input_scale = read_vector(row.router_input_scale);
  if (weight_scale) w.expert_weight_scale = read_vector(row.expert_weight_scale);
  if (out_bias) w.output_bias = read_vector(row.output_bias);
  if (in_norm) w.expert_input_norm = read_vector(row.expert_input_norm);
  if (out_norm) w.expert_output_norm = read_vector(row.expert_output_norm);
  if (table) w.expert_table = m.tensors().read_matrix<std::int64_t>(p + row.expert_table);
  if (L > 0) {
    w.latent_in = r.read<T>(p + row.latent_in);
    w.latent_out = r.read<T>(p + row.latent_out);
  }
  auto slice = [&](const std::string& name, Index first, Index rows, Index cols) {
    RowMatrix<T> a(rows, cols);
    r.read_rows_into<T>(name, first, MutMap<T>(a.data(), rows, cols));
    return a;
  };
  for (std::size_t j = 0; j < chosen.size(); ++j) {
    const Index e = chosen[j], slot = static_cast<Index>(j);
    if (expert_biases) {
      detail::read_expert_biases<T>(m, r, p, e, w.experts.in_biases().row(slot).data(),
                                    w.experts.out_biases().row(slot).data());
    }
    if (mxfp4) {
      read_mxfp4_expert<T>(m, fused_in, fused_out, e, He, I, w.experts.gate(slot),
                           w.experts.up(slot), w.experts.w_out(slot));
      r.check_finite(fused_in + "_blocks", w.experts.w_in(slot).data(), 2 * I, He, e * 2 * I);
      r.check_finite(fused_out + "_blocks", w.experts.w_out(slot).data(), He, I, e * He);
      continue;
    }
    if (!fused) {
      r.read_into<T>(expert_name(row.expert_gate, e), w.experts.gate(slot));
      if (gated) r.read_into<T>(expert_name(row.expert_up, e), w.experts.up(slot));
      r.read_into<T>(expert_name(row.expert_down, e), w.experts.w_out(slot));
      continue;
    }
    switch (layout) {
      case FusedLayout::out_in:
        r.read_rows_into<T>(fused_in, e * 2 * I, w.experts.w_in(slot));
        r.read_rows_into<T>(fused_out, e * He, w.experts.w_out(slot));
        break;
      case FusedLayout::in_out:
        w.experts.w_in(slot) = slice(fused_in, e * He, He, 2 * I).transpose();
        w.experts.w_out(slot) = slice(fused_out, e * I, I, He).transpose();
        break;
      case FusedLayout::in_out_interleaved: {
        const RowMatrix<T> in = slice(fused_in, e * He, He, 2 * I);  // [He x 2I], x W
        for (Index i = 0; i < I; ++i) {
          w.experts.gate(slot).row(i) = in.col(2 * i).transpose();
          w.experts.up(slot).row(i) = in.col(2 * i + 1).transpose();
        }
        w.experts.w_out(slot) = slice(fused_out, e * I, I, He).transpose();
        break;
      }
      case FusedLayout::stacked_rows:
        r.read_rows_into<T>(fused_in, e * I, w.experts.gate(slot));
        r.read_rows_into<T>(p + row.fused_up, e * I, w.experts.up(slot));
        w.experts.w_out(slot) = slice(fused_out, e * I, I, He).transpose();  // applied as h W
        break;
      case FusedLayout::plain_out_in:
        r.read_rows_into<T>(fused_in, e * I, w.experts.gate(slot));
        r.read_rows_into<T>(fused_out, e * He, w.experts.w_out(slot));
        break;
    }
  }
  if (shared) {
    if (row.shared_fused_in != nullptr) {
      r.read_into<T>(p + row.shared_fused_in, w.shared.w_in(0));
    } else {
      r.read_into<T>(p + row.shared_gate, w.shared.gate(0));
      if (gated) r.read_into<T>(p + row.shared_up, w.shared.up(0));
    }
    r.read_into<T>(p + row.shared_down, w.shared.w_out(0));
    if (c.shared_expert_gate) w.shared_gate = r.read<T>(p + row.shared_expert_gate_name);
  }
  return w;
}

/// The config a loaded layer runs with: the spec's, without the shared expert when the family's
/// shared tensors were absent (shared_optional).
template <class T>
MoeConfig layer_config(const ModelSpec& s, const MoeWeights<T>& w) {
  MoeConfig c = s.moe;
  if (w.shared.empty()) {
    c.shared_d_ff = 0;
    c.shared_expert_gate = false;
  }
  return c;
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
