// moe/io: what a GGUF file's metadata says about its MoE layers, in our vocabulary (GgufMoeSpec).
//
// llama.cpp writes the sizes under "<arch>." keys (general.architecture names the arch):
//   block_count, embedding_length (d_model), expert_feed_forward_length (d_ff; Mixtral files,
//   arch "llama", have only feed_forward_length), expert_count, expert_used_count (top_k),
//   expert_shared_count, expert_weights_norm, expert_weights_scale, expert_gating_func (1 softmax,
//   2 sigmoid), expert_group_count, expert_group_used_count, leading_dense_block_count,
//   interleave_moe_layer_step (llama4: layer N is sparse when (N + 1) % step == 0).
// What llama.cpp hardcodes per arch (whether top-k weights are renormalised when
// expert_weights_norm is absent, whether the shared expert has a sigmoid gate) is the arch's row
// of kGgufMoeArchs below: adding an arch is adding a row. The shared expert's width is read from
// its tensor (blk.N.ffn_up_shexp.weight), which every arch that has one writes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moe/config.hpp"
#include "moe/error.hpp"
#include "moe/gating/families.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// How an arch routes: the gating policy its blocks use.
enum class GgufRouting {
  softmax_top_k,  ///< gating::SoftmaxTopK (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
  deepseek_v2,    ///< gating::DeepSeekV2: softmax, group-limited (expert_gating_func 1 or absent)
  deepseek_v3,    ///< gating::GroupLimitedTopK: sigmoid + exp_probs_b bias (expert_gating_func 2)
  scored_top_k,   ///< gating::ScoredTopK on the chosen logits (gpt-oss softmax, Llama 4 sigmoid)
};

/// What an arch reads beyond the common keys and tensors.
enum class GgufArchKind {
  plain,     ///< softmax top-k, SwiGLU experts
  deepseek,  ///< the DeepSeek keys (gating func, groups, scale, dense lead), exp_probs_b
  gpt_oss,   ///< router and expert biases, clamped SwiGLU, softmax over the chosen logits
  llama4,    ///< sigmoid of the chosen logit scales the expert's input; interleaved dense layers
};

/// One llama.cpp architecture whose MoE layers moe reads.
struct GgufMoeArch {
  const char* arch;    ///< general.architecture
  const char* models;  ///< the Hugging Face families it carries (for messages and docs)
  bool normalize;      ///< top-k weights renormalised when expert_weights_norm is absent
  GgufArchKind kind;   ///< what the arch reads beyond the common keys
  bool shared_gate;    ///< a shared expert, when present, is scaled by a sigmoid gate
  int gating_func;     ///< expert_gating_func when absent: 1 softmax, 2 sigmoid (DeepSeek keys)
};

/// The supported architectures (llama.cpp's names; norm defaults as llama.cpp builds them, which
/// match the HF configs: Qwen2-MoE and OLMoE norm_topk_prob false, Qwen3-MoE and Mixtral true).
/// GLM-4.5 routes like DeepSeek-V3: sigmoid, exp_probs_b, shared experts, dense lead layers.
/// gpt-oss and llama4 route as llama.cpp's build_moe_ffn does for them (gating func "softmax
/// weight": softmax over the k chosen logits; sigmoid of each chosen logit, applied to the input).
inline constexpr GgufMoeArch kGgufMoeArchs[] = {
    {"llama", "Mixtral (llama with experts)", true, GgufArchKind::plain, false, 1},
    {"qwen2moe", "Qwen2-MoE", false, GgufArchKind::plain, true, 1},
    {"qwen3moe", "Qwen3-MoE", true, GgufArchKind::plain, false, 1},
    {"olmoe", "OLMoE", false, GgufArchKind::plain, false, 1},
    {"deepseek2", "DeepSeek-V2, DeepSeek-V3", false, GgufArchKind::deepseek, false, 1},
    {"glm4moe", "GLM-4.5, GLM-4.5-Air", true, GgufArchKind::deepseek, false, 2},
    {"gpt-oss", "gpt-oss", false, GgufArchKind::gpt_oss, false, 1},
    {"llama4", "Llama 4 (Scout, Maverick)", false, GgufArchKind::llama4, false, 1},
};

/// gpt-oss's clamped SwiGLU, which llama.cpp hard-codes (no metadata key): silu slope 1.702,
/// limit 7, up + 1 (HF GptOssExperts alpha, limit, and the "+ 1").
inline constexpr double kGgufGptOssAlpha = 1.702, kGgufGptOssLimit = 7.0;

/// "llama, qwen2moe, qwen3moe, olmoe, deepseek2, glm4moe, gpt-oss, llama4".
inline std::string gguf_moe_arch_list() {
  std::string s;
  for (const auto& a : kGgufMoeArchs) s += (s.empty() ? "" : ", ") + std::string(a.arch);
  return s;
}

/// The MoE layers of a GGUF file, in our vocabulary.
struct GgufMoeSpec {
  std::string arch;  ///< general.architecture
  GgufRouting routing = GgufRouting::softmax_top_k;
  MoeConfig moe;            ///< d_model, d_ff, num_experts, top_k, shared_d_ff, shared gate
  Index num_layers = 0;     ///< block_count
  Index leading_dense = 0;  ///< leading_dense_block_count (DeepSeek)
  bool normalize = true;    ///< expert_weights_norm, else the arch's default
  double scale = 1.0;       ///< expert_weights_scale (DeepSeek routed_scaling_factor); 1 if absent
  Index n_group = 1;        ///< expert_group_count (1 = no group limit)
  Index topk_group = 1;     ///< expert_group_used_count
  /// ScoredTopK's options (routing scored_top_k): gating::GptOss or gating::Llama4 defaults.
  gating::ScoredTopK::Options scored{};
  bool expert_biases = false;  ///< gpt-oss: ffn_gate_inp.bias, ffn_{gate,up,down}_exps.bias
  Index moe_layer_step = 1;    ///< interleave_moe_layer_step (llama4); 1: every layer sparse
};

/// "blk.<layer>.<suffix>", llama.cpp's tensor name.
inline std::string gguf_block_tensor(Index layer, const char* suffix) {
  return "blk." + std::to_string(layer) + "." + suffix;
}

/// Whether layer `layer` of `file` is sparse: it has a router (blk.N.ffn_gate_inp.weight). (A
/// llama4 file's interleave_moe_layer_step is checked against the routers by read_gguf_moe_spec.)
inline bool gguf_is_moe_layer(const GgufFile& file, Index layer) {
  return file.contains(gguf_block_tensor(layer, "ffn_gate_inp.weight"));
}

namespace detail {

/// A count read as Index, at most 2^40 (products of two stay inside 64 bits).
inline Index gguf_count(const GgufFile& f, const std::string& key) {
  const std::uint64_t v = f.get_unsigned(key);
  if (v > (std::uint64_t{1} << 40)) {
    throw io_error(moe::detail::concat("moe: ", f.path(), ": metadata key '", key, "' = ", v,
                                       " is out of range"));
  }
  return static_cast<Index>(v);
}

inline Index gguf_count_or(const GgufFile& f, const std::string& key, Index fallback) {
  return f.contains_key(key) ? gguf_count(f, key) : fallback;
}

}  // namespace detail

/// Reads the MoE spec of `file`. Throws io_error for an architecture without a mapping ("moe:
/// m.gguf: architecture 'gemma3' has no MoE mapping (supported: llama, qwen2moe, ...)"), a model
/// without experts, a missing or mistyped key; config_error when the sizes are inconsistent
/// (top_k > num_experts, ...).
inline GgufMoeSpec read_gguf_moe_spec(const GgufFile& file) {
  GgufMoeSpec s;
  s.arch = file.get_string("general.architecture");
  const GgufMoeArch* row = nullptr;
  for (const auto& a : kGgufMoeArchs) {
    if (s.arch == a.arch) row = &a;
  }
  const std::string where = "moe: " + file.path() + ": ";
  if (row == nullptr) {
    throw io_error(where + "architecture '" + s.arch +
                   "' has no MoE mapping (supported: " + gguf_moe_arch_list() + ")");
  }
  const std::string p = s.arch + ".";
  const Index experts = detail::gguf_count_or(file, p + "expert_count", 0);
  if (experts == 0) {
    throw io_error(where + "architecture '" + s.arch + "' without experts (" + p +
                   "expert_count is absent or 0): a dense model has no MoE layer");
  }
  s.num_layers = detail::gguf_count(file, p + "block_count");
  s.moe.d_model = detail::gguf_count(file, p + "embedding_length");
  s.moe.num_experts = experts;
  s.moe.top_k = detail::gguf_count(file, p + "expert_used_count");
  s.moe.d_ff = file.contains_key(p + "expert_feed_forward_length")
                   ? detail::gguf_count(file, p + "expert_feed_forward_length")
                   : detail::gguf_count(file, p + "feed_forward_length");
  s.normalize = file.contains_key(p + "expert_weights_norm")
                    ? file.get_bool(p + "expert_weights_norm")
                    : row->normalize;
  if (row->kind == GgufArchKind::deepseek) {
    s.leading_dense = detail::gguf_count_or(file, p + "leading_dense_block_count", 0);
    if (file.contains_key(p + "expert_weights_scale")) {
      const float scale = file.get_f32(p + "expert_weights_scale");
      s.scale = scale == 0.0f ? 1.0 : scale;  // llama.cpp: 0 means "not scaled"
    }
    s.n_group = std::max<Index>(1, detail::gguf_count_or(file, p + "expert_group_count", 1));
    s.topk_group =
        std::max<Index>(1, detail::gguf_count_or(file, p + "expert_group_used_count", 1));
    const Index func = detail::gguf_count_or(file, p + "expert_gating_func", row->gating_func);
    if (func != 1 && func != 2) {
      throw io_error(moe::detail::concat(where, "metadata key '", p, "expert_gating_func' = ", func,
                                         " is neither 1 (softmax) nor 2 (sigmoid)"));
    }
    s.routing = func == 2 ? GgufRouting::deepseek_v3 : GgufRouting::deepseek_v2;
  }
  if (row->kind == GgufArchKind::gpt_oss) {
    s.routing = GgufRouting::scored_top_k;
    s.scored = gating::GptOss::defaults();
    s.expert_biases = true;
    s.moe.expert_glu.alpha = kGgufGptOssAlpha;
    s.moe.expert_glu.limit = kGgufGptOssLimit;
    s.moe.expert_glu.up_offset = 1.0;
  } else if (row->kind == GgufArchKind::llama4) {
    s.routing = GgufRouting::scored_top_k;
    s.scored = gating::Llama4::defaults();
    s.moe.weight_expert_input = true;
    s.moe_layer_step = detail::gguf_count_or(file, p + "interleave_moe_layer_step", 1);
    if (s.moe_layer_step < 1) {
      throw io_error(where + "metadata key '" + p +
                     "interleave_moe_layer_step' = 0, expected >= 1");
    }
    for (Index layer = 0; layer < s.num_layers; ++layer) {
      const bool sparse = (layer + 1) % s.moe_layer_step == 0;
      if (sparse != gguf_is_moe_layer(file, layer)) {
        throw io_error(
            moe::detail::concat(where, "layer ", layer, (sparse ? " has no " : " has a "),
                                "router (", gguf_block_tensor(layer, "ffn_gate_inp.weight"),
                                ") but ", p, "interleave_moe_layer_step = ", s.moe_layer_step,
                                " makes it ", (sparse ? "sparse" : "dense")));
      }
    }
  }
  // The shared expert: width from the first sparse layer's tensor, gate where the arch has one.
  for (Index layer = 0; layer < s.num_layers; ++layer) {
    if (!gguf_is_moe_layer(file, layer)) continue;
    const std::string up = gguf_block_tensor(layer, "ffn_up_shexp.weight");
    if (file.contains(up)) {
      const auto& t = file.tensor(up);
      if (t.dims.size() != 2) {
        throw io_error(moe::detail::concat(where, "tensor '", up, "' has dims ",
                                           detail::gguf_dims_str(t.dims),
                                           ", expected [n_embd, n_ff_shexp]"));
      }
      s.moe.shared_d_ff = static_cast<Index>(t.dims[1]);
      s.moe.shared_expert_gate =
          row->shared_gate && file.contains(gguf_block_tensor(layer, "ffn_gate_inp_shexp.weight"));
    }
    break;
  }
  s.moe.validate();
  return s;
}

}  // namespace moe::io
