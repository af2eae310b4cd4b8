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

/// A sparse block whose family is chosen at run time: one alternative per (gating policy, FFN
/// kind) pair some family needs; every other family difference is data (MoeConfig numbers,
/// optional tensors of MoeWeights, the policy's Options), so the variant grows only when a new
/// pair appears.
///   0: SoftmaxTopK + SwiGLU        Mixtral, Qwen2/3-MoE, OLMoE, Qwen3-Next/3.5, Jamba, ...
///   1: DeepSeekV2 + SwiGLU         DeepSeek-V2
///   2: GroupLimitedTopK + SwiGLU   DeepSeek-V3 and every sigmoid/softmax + selection-bias family
///   3: CapacityTopK + ReluMlp      Switch Transformers
///   4: ScoredTopK + SwiGLU         gpt-oss, Llama 4, Granite, JetMoE, Cohere2, DBRX, Mistral 4,
///                                  DeepSeek-V4 hash layers
///   5: GroupLimitedTopK + Relu2Mlp Nemotron-H
///   6: SoftmaxTopK + GeGLUTanh     Gemma 4
///   7: Sparsemixer + SwiGLU        Phi-3.5-MoE
/// Immutable and const like the blocks: one AnyMoeBlock serves many threads, each with its own
/// Workspace.
namespace detail {

/// Block with its Storage replaced.
template <class Block, class Storage>
struct with_storage;
template <class T, class G, class F, class S, class Storage>
struct with_storage<SparseMoeBlock<T, G, F, S>, Storage> {
  using type = SparseMoeBlock<T, G, F, Storage>;
};
template <class Block, class Storage>
using with_storage_t = typename with_storage<Block, Storage>::type;

/// The variant of every family block (native storage) followed, for float, by the same blocks
/// with bf16, int8, fp8, then q8, q4, mxfp4 (fast), then q8, q4, mxfp4 (exact) experts:
/// alternative s * F + f is family f with storage s.
template <class T, class FamilyVariant>
struct stored_variant {
  using type = FamilyVariant;
};
template <class... Blocks>
struct stored_variant<float, std::variant<Blocks...>> {
  template <class Format, CompactMode Mode = CompactMode::fast>
  using C = CompactExperts<Format, Mode>;
  static constexpr CompactMode x = CompactMode::exact;
  using type = std::variant<
      Blocks..., with_storage_t<Blocks, C<Bf16>>..., with_storage_t<Blocks, C<Int8>>...,
      with_storage_t<Blocks, C<Fp8E4M3>>..., with_storage_t<Blocks, C<Q8>>...,
      with_storage_t<Blocks, C<Q4>>..., with_storage_t<Blocks, C<Mxfp4>>...,
      with_storage_t<Blocks, C<Q8, x>>..., with_storage_t<Blocks, C<Q4, x>>...,
      with_storage_t<Blocks, C<Mxfp4, x>>...>;
};

template <class Storage>
constexpr WeightFormat format_of() {
  if constexpr (!Storage::compact) {
    return WeightFormat::fp32;
  } else {
    using F = typename Storage::format;
    return std::is_same_v<F, Bf16>   ? WeightFormat::bf16
           : std::is_same_v<F, Int8> ? WeightFormat::int8
           : std::is_same_v<F, Q8>   ? WeightFormat::q8
           : std::is_same_v<F, Q4>   ? WeightFormat::q4
           : std::is_same_v<F, Mxfp4> ? WeightFormat::mxfp4
                                      : WeightFormat::fp8;
  }
}

template <class Storage>
constexpr bool exact_of() {
  if constexpr (Storage::compact) {
    return !moe::detail::is_quant_format_v<typename Storage::format> ||
           Storage::mode == CompactMode::exact;
  } else {
    return true;
  }
}

}  // namespace detail

template <class T>
class AnyMoeBlock {
 public:
  using Scalar = T;
  /// One block type per family alternative (native storage), see the class comment.
  using FamilyVariant = std::variant<SparseMoeBlock<T, gating::SoftmaxTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::DeepSeekV2, SwiGLU>,
                               SparseMoeBlock<T, gating::GroupLimitedTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::CapacityTopK, ReluMlp>,
                               SparseMoeBlock<T, gating::ScoredTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::GroupLimitedTopK, Relu2Mlp>,
                               SparseMoeBlock<T, gating::SoftmaxTopK, GeGLUTanh>,
                               SparseMoeBlock<T, gating::Sparsemixer, SwiGLU>>;
  /// FamilyVariant's blocks, then (float only) the same with compact routed experts:
  /// alternative s * num_families + f is family alternative f with storage s (0 fp32, 1 bf16,
  /// 2 int8, 3 fp8, 4 q8, 5 q4, 6 mxfp4 (fast products), 7 q8, 8 q4, 9 mxfp4 (exact products)).
  using Variant = typename detail::stored_variant<T, FamilyVariant>::type;
  /// Number of family alternatives (FamilyVariant's size).
  static constexpr std::size_t num_families = std::variant_size_v<FamilyVariant>;
  /// The block type of alternative I (see the class comment).
  template <std::size_t I>
  using Alternative = std::variant_alternative_t<I, Variant>;

  /// Wraps a block of one of the alternatives.
  template <class Block, class = std::enable_if_t<std::is_constructible_v<Variant, Block&&>>>
  AnyMoeBlock(Block&& block) : block_(std::forward<Block>(block)) {}  // NOLINT: implicit by design

  /// y = block(x). x: [num_tokens x d_model] row-major (a column-major x does not compile, as
  /// for the blocks: it would be copied silently); y: caller-owned [num_tokens x d_model]. The
  /// routing of the call is left in ws. Throws shape_error on a shape mismatch, before any work.
  template <class XDerived>
  void forward(const Eigen::DenseBase<XDerived>& x, MatrixMut<T> y, Workspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>,
                  "moe: x must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
    static_assert(std::is_same_v<typename XDerived::Scalar, T>, "moe: x has the wrong scalar");
    std::visit([&](const auto& b) { b.forward(x.derived(), y, ws, executor); }, block_);
  }

  /// y = block(x) into a new [num_tokens x d_model] matrix: serial, with a workspace of its own
  /// (allocates both; for a first try, not a hot loop). Same x rules and errors as above.
  template <class XDerived>
  RowMatrix<T> forward(const Eigen::DenseBase<XDerived>& x) const {
    RowMatrix<T> y(x.rows(), config().d_model);
    Workspace<T> ws;
    forward(x, y, ws);
    return y;
  }

  /// The layer's sizes.
  const MoeConfig& config() const {
    return std::visit([](const auto& b) -> const MoeConfig& { return b.config(); }, block_);
  }
  /// Which alternative is held (0..7 for fp32 experts, see the class comment; compact storages
  /// follow: see Variant).
  std::size_t index() const { return block_.index(); }
  /// Which family alternative is held (0..3, see the class comment), whatever the storage.
  std::size_t family_index() const { return block_.index() % num_families; }
  /// What the routed experts are stored as: fp32 (the scalar T), bf16, int8, fp8, q8, q4, mxfp4.
  WeightFormat weight_format() const {
    return std::visit(
        [](const auto& b) {
          return detail::format_of<typename std::decay_t<decltype(b)>::ExpertStorage>();
        },
        block_);
  }
  /// Whether the expert products are exact (bitwise the fp32 block on the dequantised weights):
  /// false only for q8, q4, mxfp4 in the fast mode (LoadOptions::exact).
  bool exact() const {
    return std::visit(
        [](const auto& b) {
          return detail::exact_of<typename std::decay_t<decltype(b)>::ExpertStorage>();
        },
        block_);
  }
  /// Resident bytes of the routed experts as stored (block.expert_bytes()).
  std::size_t expert_bytes() const {
    return std::visit([](const auto& b) { return b.expert_bytes(); }, block_);
  }
  /// Usage counters and mapped ranges of compact experts loaded from a checkpoint (see
  /// experts/residency.hpp), nullptr for fp32 experts.
  const ExpertResidency* residency() const {
    return std::visit(
        [](const auto& b) -> const ExpertResidency* {
          if constexpr (std::decay_t<decltype(b)>::compact) {
            return b.experts().residency();
          } else {
            return nullptr;
          }
        },
        block_);
  }
  /// The block of alternative I; throws std::bad_variant_access when another one is held.
  template <std::size_t I>
  const Alternative<I>& get() const {
    return std::get<I>(block_);
  }
  /// The block if it is of type Block, else nullptr.
  template <class Block>
  const Block* get_if() const {
    return std::get_if<Block>(&block_);
  }
  /// The underlying variant, for std::visit.
  const Variant& variant() const { return block_; }

 private:
  Variant block_;
};

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

/// y = block(x) whichever family the block is: the same as block.forward(x, y, ws, executor)
/// (a column-major x does not compile). T is deduced from the block.
template <class T, class XDerived>
void forward(const AnyMoeBlock<T>& block, const Eigen::DenseBase<XDerived>& x,
             MatrixMut<typename AnyMoeBlock<T>::Scalar> y, Workspace<T>& ws,
             const Executor& executor = serial_executor()) {
  block.forward(x, y, ws, executor);
}

/// The config of any block (sizes are the same for every alternative): block.config().
template <class T>
const MoeConfig& config_of(const AnyMoeBlock<T>& block) {
  return block.config();
}

}  // namespace moe::io
