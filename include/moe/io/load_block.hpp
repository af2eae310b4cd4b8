// moe/io: a sparse layer of a checkpoint as a block: the block type the caller names
// (load_moe_layer), or the one config.json's family routes with, chosen at run time
// (load_any_moe_layer -> AnyMoeBlock).
//
//   auto block = moe::io::load_moe_layer<moe::SparseMoeBlock<float>>("Mixtral-8x7B-v0.1", 3);
//   moe::io::AnyMoeBlock<float> any = moe::io::load_any_moe_layer<float>("DeepSeek-V3", 5);
//   moe::RowMatrix<float> y = any.forward(x);        // or any.forward(x, y, ws, pool)
#pragma once

#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include <Eigen/Core>

#include "moe/block.hpp"
#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating.hpp"
#include "moe/io/any_block.hpp"
#include "moe/io/families.hpp"
#include "moe/io/load_experts.hpp"
#include "moe/io/load_weights.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/workspace.hpp"

namespace moe::io {

/// Sparse layer `layer` as the block type the caller names, e.g.
/// `load_moe_layer<SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU>>(m, 3)`. The gating options
/// come from config.json (gating_options). Throws config_error when Block's gating policy or Ffn
/// is not the family's ("moe: DIR/config.json: deepseek_v3 routes with gating::GroupLimitedTopK;
/// the block type uses gating::SoftmaxTopK") or when options.experts is not empty (a block holds
/// every expert: load_moe_shard reads a subset), plus the errors of load_moe_weights.
template <class Block>
Block load_moe_layer(const ModelCheckpoint& m, Index layer, const LoadOptions& options = {}) {
  using G = typename Block::GatingPolicy;
  if (!options.experts.empty()) {
    throw config_error(moe::detail::concat(
        "moe: LoadOptions::experts selects ", options.experts.size(), " of ",
        m.spec().moe.num_experts,
        " experts; a block holds every expert (load_moe_shard reads a subset)"));
  }
  check_ffn<typename Block::FfnKind>(m.spec());
  const typename G::Options options_of_g = gating_options<G>(m.spec(), options);
  if constexpr (Block::compact) {
    // The experts as views / quantised one by one (load_experts.hpp); everything else in float.
    LoadOptions others = options;
    others.routed_experts = false;
    MoeWeights<float> w = load_moe_weights<float>(m, layer, others);
    const MoeConfig config = layer_config(m.spec(), w);
    auto experts = load_expert_stack<typename Block::CompactStack>(m, layer, options);
    if (m.spec().row().expert_in_bias != nullptr) {  // gpt-oss: fp32 next to the stored experts
      ExpertBiases<float> b = load_expert_biases<float>(m, layer);
      experts.set_biases(std::move(b.in), std::move(b.out));
    }
    return Block(config, std::move(w), std::move(experts), options_of_g);
  } else {
    MoeWeights<typename Block::Scalar> w = load_moe_weights<typename Block::Scalar>(m, layer);
    const MoeConfig config = layer_config(m.spec(), w);
    return Block(config, std::move(w), options_of_g);
  }
}

/// Opens `dir` (config.json + safetensors) and loads one layer: see the overload above. To load
/// several layers, open a ModelCheckpoint once.
template <class Block>
Block load_moe_layer(const std::string& dir, Index layer, const LoadOptions& options = {}) {
  return load_moe_layer<Block>(ModelCheckpoint::open(dir), layer, options);
}

/// Sparse layer `layer` as the alternative of AnyMoeBlock<T> that config.json's family routes
/// with (the RoutingKind of its row). Same errors as load_moe_layer.
namespace detail {

/// The format a load resolves to: options.weights, or for as_stored the stored one (fp32 for a
/// double block). Throws config_error for a compact format with T = double.
template <class T>
WeightFormat resolve_format(const ModelCheckpoint& m, Index layer, const LoadOptions& options) {
  WeightFormat f = options.weights;
  if (f == WeightFormat::as_stored) {
    f = std::is_same_v<T, float> ? stored_format(m, layer) : WeightFormat::fp32;
  }
  if (!std::is_same_v<T, float> && f != WeightFormat::fp32) {
    throw config_error(moe::detail::concat("moe: LoadOptions::weights = ", weight_format_name(f),
                                           " needs a float block (compact experts are float)"));
  }
  return f;
}

/// A type carried as a value (to pass storage policies to a generic lambda).
template <class T>
struct template_type {
  using type = T;
};

/// Family block `Block` (native storage) with the routed experts in format f (options.exact:
/// the exact products of block-quantised formats).
template <class Any, class Block>
Any load_stored(const ModelCheckpoint& m, Index layer, const LoadOptions& options,
                WeightFormat f) {
  if constexpr (std::is_same_v<typename Block::Scalar, float>) {
    auto as = [&](auto fast, auto exact) -> Any {
      using Fast = with_storage_t<Block, typename decltype(fast)::type>;
      using Exact = with_storage_t<Block, typename decltype(exact)::type>;
      if (options.exact) return load_moe_layer<Exact>(m, layer, options);
      return load_moe_layer<Fast>(m, layer, options);
    };
    switch (f) {
      case WeightFormat::bf16:
        return as(template_type<CompactExperts<Bf16>>{}, template_type<CompactExperts<Bf16>>{});
      case WeightFormat::int8:
        return as(template_type<CompactExperts<Int8>>{}, template_type<CompactExperts<Int8>>{});
      case WeightFormat::fp8:
        return as(template_type<CompactExperts<Fp8E4M3>>{},
                  template_type<CompactExperts<Fp8E4M3>>{});
      case WeightFormat::q8:
        return as(template_type<CompactExperts<Q8>>{},
                  template_type<CompactExperts<Q8, CompactMode::exact>>{});
      case WeightFormat::q4:
        return as(template_type<CompactExperts<Q4>>{},
                  template_type<CompactExperts<Q4, CompactMode::exact>>{});
      case WeightFormat::mxfp4:
        return as(template_type<CompactExperts<Mxfp4>>{},
                  template_type<CompactExperts<Mxfp4, CompactMode::exact>>{});
      default:
        break;
    }
  }
  (void)f;
  return load_moe_layer<Block>(m, layer, options);
}

}  // namespace detail

/// Sparse layer `layer` as the alternative of AnyMoeBlock<T> that config.json's family routes
/// with (the RoutingKind of its row), its routed experts stored as options.weights says:
/// as_stored keeps BF16 / F8_E4M3 experts compact and viewed in the mapped file (float blocks;
/// double blocks convert), other formats quantise on load (see load_experts.hpp). Same errors as
/// load_moe_layer, plus config_error for a compact format with T = double.
template <class T>
AnyMoeBlock<T> load_any_moe_layer(const ModelCheckpoint& m, Index layer,
                                  const LoadOptions& options = {}) {
  using Any = AnyMoeBlock<T>;
  const FamilyRow& row = m.spec().row();
  const WeightFormat f = detail::resolve_format<T>(m, layer, options);
  if (m.spec().is_hash_layer(layer)) {
    return detail::load_stored<Any, typename Any::template Alternative<4>>(m, layer, options, f);
  }
  switch (row.routing) {
    case RoutingKind::softmax_top_k:
      if (row.expert_kind == ExpertKind::geglu_tanh) {
        return detail::load_stored<Any, typename Any::template Alternative<6>>(m, layer, options, f);
      }
      return detail::load_stored<Any, typename Any::template Alternative<0>>(m, layer, options, f);
    case RoutingKind::deepseek_v2:
      return detail::load_stored<Any, typename Any::template Alternative<1>>(m, layer, options, f);
    case RoutingKind::deepseek_v3:
    case RoutingKind::biased_scored:
      if (row.expert_kind == ExpertKind::relu2) {
        return detail::load_stored<Any, typename Any::template Alternative<5>>(m, layer, options, f);
      }
      return detail::load_stored<Any, typename Any::template Alternative<2>>(m, layer, options, f);
    case RoutingKind::capacity_top_1:
      return detail::load_stored<Any, typename Any::template Alternative<3>>(m, layer, options, f);
    case RoutingKind::scored:
      return detail::load_stored<Any, typename Any::template Alternative<4>>(m, layer, options, f);
    case RoutingKind::sparsemixer:
      return detail::load_stored<Any, typename Any::template Alternative<7>>(m, layer, options, f);
  }
  throw value_error("moe: unknown RoutingKind in the family table");
}

/// Opens `dir` and loads one layer; see the overload above.
template <class T>
AnyMoeBlock<T> load_any_moe_layer(const std::string& dir, Index layer,
                                  const LoadOptions& options = {}) {
  return load_any_moe_layer<T>(ModelCheckpoint::open(dir), layer, options);
}

#ifdef MOE_EXTERN_ANY_BLOCK
// Defined once, in the translation unit that includes moe/io/any_block_instances.hpp (see
// any_block.hpp).
extern template AnyMoeBlock<float> load_any_moe_layer<float>(const ModelCheckpoint&, Index,
                                                             const LoadOptions&);
extern template AnyMoeBlock<double> load_any_moe_layer<double>(const ModelCheckpoint&, Index,
                                                               const LoadOptions&);
#endif

}  // namespace moe::io
