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
  MoeWeights<typename Block::Scalar> w = load_moe_weights<typename Block::Scalar>(m, layer);
  const MoeConfig config = layer_config(m.spec(), w);
  return Block(config, std::move(w), options_of_g);
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
template <class T>
class AnyMoeBlock {
 public:
  using Scalar = T;
  using Variant = std::variant<SparseMoeBlock<T, gating::SoftmaxTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::DeepSeekV2, SwiGLU>,
                               SparseMoeBlock<T, gating::GroupLimitedTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::CapacityTopK, ReluMlp>,
                               SparseMoeBlock<T, gating::ScoredTopK, SwiGLU>,
                               SparseMoeBlock<T, gating::GroupLimitedTopK, Relu2Mlp>,
                               SparseMoeBlock<T, gating::SoftmaxTopK, GeGLUTanh>,
                               SparseMoeBlock<T, gating::Sparsemixer, SwiGLU>>;
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
  /// Which alternative is held (0..7, see the class comment).
  std::size_t index() const { return block_.index(); }
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
template <class T>
AnyMoeBlock<T> load_any_moe_layer(const ModelCheckpoint& m, Index layer,
                                  const LoadOptions& options = {}) {
  using Any = AnyMoeBlock<T>;
  const FamilyRow& row = m.spec().row();
  if (m.spec().is_hash_layer(layer)) {
    return load_moe_layer<typename Any::template Alternative<4>>(m, layer, options);
  }
  switch (row.routing) {
    case RoutingKind::softmax_top_k:
      if (row.expert_kind == ExpertKind::geglu_tanh) {
        return load_moe_layer<typename Any::template Alternative<6>>(m, layer, options);
      }
      return load_moe_layer<typename Any::template Alternative<0>>(m, layer, options);
    case RoutingKind::deepseek_v2:
      return load_moe_layer<typename Any::template Alternative<1>>(m, layer, options);
    case RoutingKind::deepseek_v3:
    case RoutingKind::biased_scored:
      if (row.expert_kind == ExpertKind::relu2) {
        return load_moe_layer<typename Any::template Alternative<5>>(m, layer, options);
      }
      return load_moe_layer<typename Any::template Alternative<2>>(m, layer, options);
    case RoutingKind::capacity_top_1:
      return load_moe_layer<typename Any::template Alternative<3>>(m, layer, options);
    case RoutingKind::scored:
      return load_moe_layer<typename Any::template Alternative<4>>(m, layer, options);
    case RoutingKind::sparsemixer:
      return load_moe_layer<typename Any::template Alternative<7>>(m, layer, options);
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
