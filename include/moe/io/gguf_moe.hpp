// moe/io: a sparse layer of a GGUF file (llama.cpp's model format) as a block.
//
//   const auto file = moe::io::GgufFile::open("Qwen3-30B-A3B-Q4_K_M.gguf");
//   const auto spec = moe::io::read_gguf_moe_spec(file);       // arch, sizes, routing
//   auto block = moe::io::load_gguf_moe_layer<moe::SparseMoeBlock<float>>(file, spec, 3);
//
// Architectures: llama (Mixtral), qwen2moe, qwen3moe, olmoe (gating::SoftmaxTopK), deepseek2
// (gating::DeepSeekV2 for softmax gating, gating::GroupLimitedTopK for sigmoid + exp_probs_b),
// glm4moe (gating::GroupLimitedTopK), gpt-oss and llama4 (gating::ScoredTopK; gpt-oss's clamped
// SwiGLU and biases, Llama 4's input-weighted experts are MoeConfig / MoeWeights data); all with
// SwiGLU experts. Types: whatever gguf_decode.hpp decodes (F32, F16, BF16, Q8_0, Q4_0, MXFP4,
// Q4_K, Q5_K, Q6_K), converted to the block's scalar on load; BF16 experts are viewed in place by
// a CompactExperts<Bf16> block, Q8_0 / Q4_0 / MXFP4 experts go into CompactExperts<Q8 | Q4 |
// Mxfp4> blocks without fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/activations.hpp"
#include "moe/block.hpp"
#include "moe/error.hpp"
#include "moe/experts/compact_expert_stack.hpp"
#include "moe/experts/quant_matrix.hpp"
#include "moe/gating.hpp"
#include "moe/io/gguf_moe_spec.hpp"
#include "moe/io/gguf_moe_weights.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/kernels/ggml_blocks.hpp"

namespace moe::io {

namespace detail {

inline const char* gguf_routing_policy(GgufRouting r) {
  switch (r) {
    case GgufRouting::softmax_top_k:
      return "gating::SoftmaxTopK";
    case GgufRouting::deepseek_v2:
      return "gating::DeepSeekV2";
    case GgufRouting::deepseek_v3:
      return "gating::GroupLimitedTopK";
    case GgufRouting::scored_top_k:
      return "gating::ScoredTopK";
  }
  return "?";
}

template <class>
inline constexpr bool gguf_no_arch_routes_with_v = false;

}  // namespace detail

/// The options of gating policy G that `spec` implies. DeepSeek-V2 follows Hugging Face: with
/// expert_weights_norm the weights are renormalised and not scaled. Throws config_error when G is
/// not the policy the arch routes with ("moe: m.gguf: qwen3moe routes with gating::SoftmaxTopK;
/// the block type uses gating::GroupLimitedTopK").
template <class G>
typename G::Options gguf_gating_options(const GgufMoeSpec& spec, const std::string& path) {
  auto require = [&](GgufRouting want, const char* have) {
    if (spec.routing != want) {
      throw config_error(moe::detail::concat("moe: ", path, ": ", spec.arch, " routes with ",
                                             detail::gguf_routing_policy(spec.routing),
                                             "; the block type uses ", have));
    }
  };
  if constexpr (std::is_same_v<G, gating::SoftmaxTopK>) {
    require(GgufRouting::softmax_top_k, "gating::SoftmaxTopK");
    typename G::Options o{};
    o.normalize = spec.normalize;
    return o;
  } else if constexpr (std::is_same_v<G, gating::GroupLimitedTopK>) {
    require(GgufRouting::deepseek_v3, "gating::GroupLimitedTopK");
    return G::Options::deepseek_v3(spec.n_group, spec.topk_group, spec.scale, spec.normalize);
  } else if constexpr (std::is_same_v<G, gating::DeepSeekV2>) {
    require(GgufRouting::deepseek_v2, "gating::DeepSeekV2");
    auto o =
        G::Options::deepseek_v2(spec.n_group, spec.topk_group, spec.normalize ? 1.0 : spec.scale);
    o.normalize = spec.normalize;
    return o;
  } else if constexpr (std::is_same_v<G, gating::ScoredTopK>) {
    require(GgufRouting::scored_top_k, "gating::ScoredTopK");
    return spec.scored;
  } else {
    static_assert(detail::gguf_no_arch_routes_with_v<G>,
                  "moe::io: no GGUF architecture routes with this gating policy");
  }
}

/// True when every routed-expert tensor of `layer` has ggml type `type`.
inline bool gguf_experts_are(const GgufFile& file, const GgufMoeSpec& spec, Index layer,
                             GgmlType type) {
  detail::gguf_check_moe_layer(file, spec, layer);
  return detail::GgufRoutedExperts(file, spec.moe, layer).all_of_type(type);
}

/// True when every routed-expert tensor of `layer` is BF16 (then view_gguf_bf16_experts works).
inline bool gguf_experts_are_bf16(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  return gguf_experts_are(file, spec, layer, GgmlType::BF16);
}

/// Zero-copy Bf16 views of layer `layer`'s routed experts (BF16 tensors, stacked, fused or per
/// expert): no weight is copied, so the stack (and a block holding it) must not outlive `file`.
/// Every value is scanned once for NaN / infinity. Throws io_error when a routed-expert tensor is
/// not BF16 or holds a non-finite value, plus the errors of load_gguf_moe_weights.
inline CompactExpertStack<Bf16> view_gguf_bf16_experts(const GgufFile& file,
                                                       const GgufMoeSpec& spec, Index layer) {
  detail::gguf_check_moe_layer(file, spec, layer);
  const detail::GgufRoutedExperts experts(file, spec.moe, layer);
  if (!experts.all_of_type(GgmlType::BF16)) {
    throw io_error(moe::detail::concat("moe: ", file.path(), ": layer ", layer,
                                       ": the routed experts are not all BF16, cannot view them"));
  }
  const Index D = spec.moe.d_model, F = spec.moe.d_ff;
  auto view = [&](detail::GgufRows r, Index rows, Index cols) {
    // Tensor data start at a multiple of the alignment and BF16 rows are whole 2-byte codes.
    const auto* codes =
        reinterpret_cast<const std::uint16_t*>(file.data(*r.tensor)) + r.row0 * cols;
    for (Index i = 0; i < rows * cols; ++i) {
      if ((codes[i] & 0x7F80u) == 0x7F80u) {  // exponent all ones: infinity or NaN
        throw io_error(moe::detail::concat("moe: ", file.path(), ": tensor '", r.tensor->name,
                                           "' has a non-finite value at row ", r.row0 + i / cols,
                                           ", column ", i % cols));
      }
    }
    return CompactMatrix<Bf16>::view(codes, rows, cols);
  };
  CompactExpertStack<Bf16> stack(spec.moe.num_experts, D, F, /*gated=*/true);
  for (Index e = 0; e < spec.moe.num_experts; ++e) {
    stack.set_gated(e, view(experts.gate(e), F, D), view(experts.up(e), F, D),
                    view(experts.down(e), D, F));
  }
  return stack;
}

/// The ggml type of Format's blocks: Q8_0 for Q8, Q4_0 for Q4 (the same bytes), MXFP4 for Mxfp4
/// (the same codes and scales, ordered differently within a block).
template <class Format>
constexpr GgmlType gguf_type_of_quant() {
  static_assert(
      std::is_same_v<Format, Q8> || std::is_same_v<Format, Q4> || std::is_same_v<Format, Mxfp4>,
      "moe::io: only Q8, Q4 and Mxfp4 have a ggml type (Q8_0, Q4_0, MXFP4)");
  return std::is_same_v<Format, Q8>   ? GgmlType::Q8_0
         : std::is_same_v<Format, Q4> ? GgmlType::Q4_0
                                      : GgmlType::MXFP4;
}

namespace detail {

/// Rows [r.row0, r.row0 + rows) of a Q8_0 / Q4_0 / MXFP4 tensor as a QuantMatrix<Format> in the
/// stored layout, never through fp32: Q8_0 / Q4_0 are viewed in the file (zero-copy), MXFP4
/// blocks are repacked into Mxfp4's split codes/scales (a byte shuffle into owned storage).
/// Throws io_error naming the tensor for a non-finite scale or (Q8_0 / Q4_0) data not 2-byte
/// aligned in memory.
template <class Format>
QuantMatrix<Format> gguf_quant_matrix(const GgufFile& file, GgufRows r, Index rows, Index cols) {
  const std::size_t blocks = std::size_t(rows) * std::size_t(cols / 32);
  auto bad_scale = [&](std::size_t b) {
    return io_error(moe::detail::concat("moe: ", file.path(), ": tensor '", r.tensor->name,
                                        "' has a non-finite scale in row ",
                                        r.row0 + Index(b) / (cols / 32)));
  };
  if constexpr (std::is_same_v<Format, Mxfp4>) {
    const unsigned char* p = file.data(*r.tensor) + std::size_t(r.row0) * std::size_t(cols / 32) *
                                                        kernels::ggml_mxfp4_bytes;
    for (std::size_t b = 0; b < blocks; ++b) {
      if (p[b * kernels::ggml_mxfp4_bytes] == 0xFF) throw bad_scale(b);  // E8M0 NaN
    }
    std::vector<std::uint8_t> codes(blocks * 16), scales(blocks);
    kernels::repack_mxfp4_to_split(p, rows * cols, codes.data(), scales.data());
    return QuantMatrix<Mxfp4>::own_stored(std::move(codes), std::move(scales), rows, cols);
  } else {
    using Block =
        std::conditional_t<std::is_same_v<Format, Q8>, kernels::BlockQ8, kernels::BlockQ4>;
    const unsigned char* p =
        file.data(*r.tensor) + std::size_t(r.row0) * std::size_t(cols / 32) * sizeof(Block);
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(Block) != 0) {
      throw io_error(moe::detail::concat("moe: ", file.path(), ": tensor '", r.tensor->name,
                                         "' is not 2-byte aligned in memory"));
    }
    const auto* q = reinterpret_cast<const Block*>(p);
    for (std::size_t b = 0; b < blocks; ++b) {
      if ((q[b].d & 0x7C00u) == 0x7C00u) throw bad_scale(b);  // f16 exponent all ones
    }
    return QuantMatrix<Format>::view(kernels::QuantView<Format>{q, rows, cols});
  }
}

}  // namespace detail

/// Layer `layer`'s routed experts as a quantised stack (Stack: QuantExpertStack<Q8 | Q4 | Mxfp4,
/// layout>) built from the file's Q8_0 / Q4_0 / MXFP4 blocks without passing through fp32:
/// Q8_0 / Q4_0 projections are zero-copy views of the file's bytes (a panels stack repacks them,
/// lossless; a stored stack keeps the view, then it must not outlive `file`); MXFP4 blocks are
/// repacked into owned Mxfp4 storage. Throws io_error when a routed-expert tensor is of another
/// type, a scale is NaN / infinite, or Q8_0 / Q4_0 data are not 2-byte aligned in memory.
template <class Format, class Stack>
Stack view_gguf_quant_experts(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  constexpr GgmlType type = gguf_type_of_quant<Format>();
  detail::gguf_check_moe_layer(file, spec, layer);
  const detail::GgufRoutedExperts experts(file, spec.moe, layer);
  if (!experts.all_of_type(type)) {
    throw io_error(moe::detail::concat("moe: ", file.path(), ": layer ", layer,
                                       ": the routed experts are not all ", ggml_type_name(type)));
  }
  const Index D = spec.moe.d_model, F = spec.moe.d_ff;
  Stack stack(spec.moe.num_experts, D, F, /*gated=*/true);
  for (Index e = 0; e < spec.moe.num_experts; ++e) {
    stack.set_gated(e, detail::gguf_quant_matrix<Format>(file, experts.gate(e), F, D),
                    detail::gguf_quant_matrix<Format>(file, experts.up(e), F, D),
                    detail::gguf_quant_matrix<Format>(file, experts.down(e), D, F));
  }
  return stack;
}

/// Sparse layer `layer` of `file` as Block: a SparseMoeBlock with SwiGLU experts and the arch's
/// gating policy, native (weights converted to T) or compact. CompactExperts<Bf16> with BF16
/// expert tensors views them in the file (zero-copy: the block must not outlive `file`);
/// CompactExperts<Q8 | Q4 | Mxfp4> with Q8_0 / Q4_0 / MXFP4 experts takes their blocks without
/// fp32 (fast mode repacks them into panels, exact mode views Q8_0 / Q4_0 in the file and holds
/// MXFP4 repacked to Mxfp4's split layout); any
/// other compact case decodes the experts to fp32 and the block quantises them (a K-quant into
/// Bf16 adds NMSE 2.7e-6, docs/gguf.md). Throws config_error when the gating policy is not the
/// arch's or the layer is out of range or dense, plus the io_errors of load_gguf_moe_weights.
template <class Block>
Block load_gguf_moe_layer(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  static_assert(std::is_same_v<typename Block::FfnKind, SwiGLU>,
                "moe::io: the GGUF architectures moe reads all use SwiGLU experts");
  using T = typename Block::Scalar;
  auto options = gguf_gating_options<typename Block::GatingPolicy>(spec, file.path());
  if constexpr (Block::compact) {
    // gpt-oss's expert biases: fp32, next to the viewed experts.
    auto with_biases = [&](auto stack) {
      std::vector<float> scratch;
      if (spec.expert_biases) detail::gguf_expert_biases(file, spec.moe, layer, stack, scratch);
      return stack;
    };
    using Format = typename Block::ExpertStorage::format;
    if constexpr (std::is_same_v<Format, Bf16>) {
      if (gguf_experts_are_bf16(file, spec, layer)) {
        return Block(spec.moe, load_gguf_moe_weights<T>(file, spec, layer, false),
                     with_biases(view_gguf_bf16_experts(file, spec, layer)), options);
      }
    } else if constexpr (std::is_same_v<Format, Q8> || std::is_same_v<Format, Q4> ||
                         std::is_same_v<Format, Mxfp4>) {
      if (gguf_experts_are(file, spec, layer, gguf_type_of_quant<Format>())) {
        return Block(spec.moe, load_gguf_moe_weights<T>(file, spec, layer, false),
                     with_biases(view_gguf_quant_experts<Format, typename Block::CompactStack>(
                         file, spec, layer)),
                     options);
      }
    }
  }
  return Block(spec.moe, load_gguf_moe_weights<T>(file, spec, layer), options);
}

/// Opens nothing: reads the spec of `file` and loads one layer (see above).
template <class Block>
Block load_gguf_moe_layer(const GgufFile& file, Index layer) {
  return load_gguf_moe_layer<Block>(file, read_gguf_moe_spec(file), layer);
}

}  // namespace moe::io
