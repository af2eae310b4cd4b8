// moe/io: AnyMoeBlock, a sparse block whose family and expert storage are chosen at run time
// (what load_any_moe_layer returns), without virtual calls on the hot path: one std::visit per
// forward call.
//
// Compile time: AnyMoeBlock<float> holds 80 block types (8 families x 10 storages), and a
// translation unit that instantiates its forward and load_any_moe_layer<float> compiles all of
// them: about 110 s of g++ 12 -O3 on this project's CI machine. A program with several such
// translation units compiles them once: define MOE_EXTERN_ANY_BLOCK in every translation unit
// (the headers then declare the float and double instantiations extern) and include
// "moe/io/any_block_instances.hpp" in exactly one (it defines them). CMake users get this from
// the target moe::io_instances (a static library built with their compile options).
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>
#include <variant>

#include <Eigen/Core>

#include "moe/block.hpp"
#include "moe/config.hpp"
#include "moe/experts/residency.hpp"
#include "moe/experts/storage.hpp"
#include "moe/gating.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/workspace.hpp"

namespace moe::io {

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
  // Declared here, defined below the class (not inline): MOE_EXTERN_ANY_BLOCK can then keep
  // their 80-way instantiations out of a translation unit (file comment).
  AnyMoeBlock(const AnyMoeBlock& other);
  AnyMoeBlock(AnyMoeBlock&& other) noexcept;
  AnyMoeBlock& operator=(const AnyMoeBlock& other);
  AnyMoeBlock& operator=(AnyMoeBlock&& other) noexcept;
  ~AnyMoeBlock();

  /// y = block(x). x: [num_tokens x d_model] row-major (a column-major x does not compile, as
  /// for the blocks: it would be copied silently); y: caller-owned [num_tokens x d_model]. The
  /// routing of the call is left in ws. Throws shape_error on a shape mismatch, before any work.
  template <class XDerived>
  void forward(const Eigen::DenseBase<XDerived>& x, MatrixMut<T> y, Workspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>,
                  "moe: x must be row-major [num_tokens x d_model] (moe::RowMatrix<T>)");
    static_assert(std::is_same_v<typename XDerived::Scalar, T>, "moe: x has the wrong scalar");
    forward_rows(MatrixRef<T>(x.derived()), y, ws, executor);
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
  const MoeConfig& config() const;
  /// Which alternative is held (0..7 for fp32 experts, see the class comment; compact storages
  /// follow: see Variant).
  std::size_t index() const { return block_.index(); }
  /// Which family alternative is held (0..7, see the class comment), whatever the storage.
  std::size_t family_index() const { return block_.index() % num_families; }
  /// What the routed experts are stored as: fp32 (the scalar T), bf16, int8, fp8, q8, q4, mxfp4.
  WeightFormat weight_format() const;
  /// Whether the expert products are exact (bitwise the fp32 block on the dequantised weights):
  /// false only for q8, q4, mxfp4 in the fast mode (LoadOptions::exact).
  bool exact() const;
  /// Resident bytes of the routed experts as stored (block.expert_bytes()).
  std::size_t expert_bytes() const;
  /// Usage counters and mapped ranges of compact experts loaded from a checkpoint (see
  /// experts/residency.hpp), nullptr for fp32 experts.
  const ExpertResidency* residency() const;
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
  // The one visit of a forward call: the held block's forward.
  void forward_rows(const MatrixRef<T>& x, MatrixMut<T> y, Workspace<T>& ws,
                    const Executor& executor) const;

  Variant block_;
};

template <class T>
AnyMoeBlock<T>::AnyMoeBlock(const AnyMoeBlock& other) = default;
template <class T>
AnyMoeBlock<T>::AnyMoeBlock(AnyMoeBlock&& other) noexcept = default;
template <class T>
AnyMoeBlock<T>& AnyMoeBlock<T>::operator=(const AnyMoeBlock& other) = default;
template <class T>
AnyMoeBlock<T>& AnyMoeBlock<T>::operator=(AnyMoeBlock&& other) noexcept = default;
template <class T>
AnyMoeBlock<T>::~AnyMoeBlock() = default;

template <class T>
void AnyMoeBlock<T>::forward_rows(const MatrixRef<T>& x, MatrixMut<T> y, Workspace<T>& ws,
                                  const Executor& executor) const {
  std::visit([&](const auto& b) { b.forward(x, y, ws, executor); }, block_);
}

template <class T>
const MoeConfig& AnyMoeBlock<T>::config() const {
  return std::visit([](const auto& b) -> const MoeConfig& { return b.config(); }, block_);
}

template <class T>
WeightFormat AnyMoeBlock<T>::weight_format() const {
  return std::visit(
      [](const auto& b) {
        return detail::format_of<typename std::decay_t<decltype(b)>::ExpertStorage>();
      },
      block_);
}

template <class T>
bool AnyMoeBlock<T>::exact() const {
  return std::visit(
      [](const auto& b) {
        return detail::exact_of<typename std::decay_t<decltype(b)>::ExpertStorage>();
      },
      block_);
}

template <class T>
std::size_t AnyMoeBlock<T>::expert_bytes() const {
  return std::visit([](const auto& b) { return b.expert_bytes(); }, block_);
}

template <class T>
const ExpertResidency* AnyMoeBlock<T>::residency() const {
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

#ifdef MOE_EXTERN_ANY_BLOCK
// Defined once, in the translation unit that includes moe/io/any_block_instances.hpp.
extern template class AnyMoeBlock<float>;
extern template class AnyMoeBlock<double>;
#endif

}  // namespace moe::io
