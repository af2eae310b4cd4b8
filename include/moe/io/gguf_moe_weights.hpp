// moe/io: the weights of one sparse layer of a GGUF file as MoeWeights<T>.
//
// llama.cpp's tensor names for layer N, with their ggml dims (dims[0] contiguous; the row-major
// shape is the reverse, so no transpose is needed):
//   blk.N.ffn_gate_inp.weight        [n_embd, n_expert]              router [E x d_model]
//   blk.N.ffn_gate_exps.weight       [n_embd, n_ff_exp, n_expert]    gate of every expert
//   blk.N.ffn_up_exps.weight         [n_embd, n_ff_exp, n_expert]    up
//   blk.N.ffn_gate_up_exps.weight    [n_embd, 2 n_ff_exp, n_expert]  fused: gate rows, then up rows
//   blk.N.ffn_down_exps.weight       [n_ff_exp, n_embd, n_expert]    down
//   blk.N.ffn_{gate,up,down}.E.weight                               per expert (older Mixtral
//   files) blk.N.exp_probs_b.bias           [n_expert]                      DeepSeek-V3 selection
//   bias blk.N.ffn_{gate,up}_shexp.weight [n_embd, n_ff_shexp], ffn_down_shexp [n_ff_shexp, n_embd]
//   blk.N.ffn_gate_inp_shexp.weight  [n_embd]                        Qwen2-MoE shared expert gate
// Every tensor's dims are checked against the spec before anything is decoded; the weights are
// decoded to float one expert at a time (any type gguf_decode.hpp reads: F32, F16, BF16, Q8_0,
// Q4_0, MXFP4, Q4_K, Q5_K, Q6_K) and every value is checked finite.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/gguf_decode.hpp"
#include "moe/io/gguf_moe_spec.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/tensor.hpp"
#include "moe/weights.hpp"

namespace moe::io {

namespace detail {

/// Tensor `name`, checked to have ggml dims `dims` (`meaning` spells them: "[n_embd, n_expert]")
/// and a type moe decodes. Throws io_error naming the tensor.
inline const GgufTensorInfo& gguf_expect(const GgufFile& f, const std::string& name,
                                         const std::vector<std::int64_t>& dims,
                                         const char* meaning) {
  const GgufTensorInfo& t = f.tensor(name);
  if (t.dims != dims) {
    throw io_error(moe::detail::concat("moe: ", f.path(), ": tensor '", name, "' has dims ",
                                       gguf_dims_str(t.dims), ", expected ", gguf_dims_str(dims),
                                       " ", meaning));
  }
  if (!ggml_type_decodes_to_float(t.type)) (void)gguf_to_float(f, name);  // throws the message
  return t;
}

/// Decodes rows [row0, row0 + n) of `t` (dims[0] values each) into `out`, checking every value
/// is finite. Throws io_error "moe: m.gguf: tensor 'x' has a non-finite value at row r, column c".
inline void gguf_decode_rows(const GgufFile& f, const GgufTensorInfo& t, Index row0, Index n,
                             float* out) {
  const auto traits = ggml_type_traits(t.type);
  const std::size_t row_bytes =
      static_cast<std::size_t>(t.cols()) / traits.block_size * traits.type_size;
  ggml_decode_to_float(t.type, f.data(t) + static_cast<std::size_t>(row0) * row_bytes, n * t.cols(),
                       out);
  for (Index i = 0; i < n * t.cols(); ++i) {
    if (!std::isfinite(out[i])) {
      throw io_error(moe::detail::concat("moe: ", f.path(), ": tensor '", t.name,
                                         "' has a non-finite value at row ", row0 + i / t.cols(),
                                         ", column ", i % t.cols()));
    }
  }
}

/// Rows [row0, row0 + dst.rows()) of `t` into `dst` (dst.cols() == t.cols()), via `scratch`.
template <class T>
void gguf_rows_into(const GgufFile& f, const GgufTensorInfo& t, Index row0, MutMap<T> dst,
                    std::vector<float>& scratch) {
  scratch.resize(static_cast<std::size_t>(dst.size()));
  gguf_decode_rows(f, t, row0, dst.rows(), scratch.data());
  dst = ConstMap<float>(scratch.data(), dst.rows(), dst.cols()).template cast<T>();
}

}  // namespace detail

/// The weights of sparse layer `layer` of `file` (sizes from `spec`), converted to T: router
/// [E x d_model], every expert's gate/up [d_ff x d_model] and down [d_model x d_ff] from the
/// stacked, fused or per-expert tensors, the DeepSeek-V3 selection bias, the shared expert and
/// its gate. Throws config_error for a layer out of range or dense; io_error for a missing tensor,
/// wrong dims, a type moe does not decode or a non-finite value (each naming the tensor).
template <class T>
MoeWeights<T> load_gguf_moe_weights(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  if (layer < 0 || layer >= spec.num_layers) {
    throw config_error(moe::detail::concat("moe: layer ", layer, " out of range [0, ",
                                           spec.num_layers, ") of ", file.path()));
  }
  if (!gguf_is_moe_layer(file, layer)) {
    throw config_error(moe::detail::concat("moe: ", file.path(), ": layer ", layer,
                                           " is dense (it has no ",
                                           gguf_block_tensor(layer, "ffn_gate_inp.weight"), ")"));
  }
  const MoeConfig& c = spec.moe;
  const Index D = c.d_model, F = c.d_ff, E = c.num_experts, Fs = c.shared_d_ff;
  auto name = [&](const char* suffix) { return gguf_block_tensor(layer, suffix); };
  const bool with_bias = spec.routing == GgufRouting::deepseek_v3;
  MoeWeights<T> w = MoeWeights<T>::zeros(c, /*gated=*/true, with_bias);
  std::vector<float> scratch;

  const auto& router =
      detail::gguf_expect(file, name("ffn_gate_inp.weight"), {D, E}, "[n_embd, n_expert]");
  detail::gguf_rows_into<T>(file, router, 0, MutMap<T>(w.router.data(), E, D), scratch);
  if (with_bias) {
    const auto& bias = detail::gguf_expect(file, name("exp_probs_b.bias"), {E}, "[n_expert]");
    detail::gguf_rows_into<T>(file, bias, 0, MutMap<T>(w.router_bias.data(), 1, E), scratch);
  }

  // Routed experts: stacked, fused gate+up, or one tensor per expert.
  const bool fused = file.contains(name("ffn_gate_up_exps.weight"));
  const bool stacked = file.contains(name("ffn_gate_exps.weight"));
  if (fused || stacked) {
    const auto& down = detail::gguf_expect(file, name("ffn_down_exps.weight"), {F, D, E},
                                           "[n_ff_exp, n_embd, n_expert]");
    const GgufTensorInfo* gate_up = nullptr;
    const GgufTensorInfo *gate = nullptr, *up = nullptr;
    if (fused) {
      gate_up = &detail::gguf_expect(file, name("ffn_gate_up_exps.weight"), {D, 2 * F, E},
                                     "[n_embd, 2 n_ff_exp, n_expert]");
    } else {
      gate = &detail::gguf_expect(file, name("ffn_gate_exps.weight"), {D, F, E},
                                  "[n_embd, n_ff_exp, n_expert]");
      up = &detail::gguf_expect(file, name("ffn_up_exps.weight"), {D, F, E},
                                "[n_embd, n_ff_exp, n_expert]");
    }
    for (Index e = 0; e < E; ++e) {
      if (fused) {
        detail::gguf_rows_into<T>(file, *gate_up, 2 * F * e, w.experts.gate(e), scratch);
        detail::gguf_rows_into<T>(file, *gate_up, 2 * F * e + F, w.experts.up(e), scratch);
      } else {
        detail::gguf_rows_into<T>(file, *gate, F * e, w.experts.gate(e), scratch);
        detail::gguf_rows_into<T>(file, *up, F * e, w.experts.up(e), scratch);
      }
      detail::gguf_rows_into<T>(file, down, D * e, w.experts.w_out(e), scratch);
    }
  } else {
    for (Index e = 0; e < E; ++e) {
      const std::string n = std::to_string(e);
      auto per = [&](const char* part) { return gguf_block_tensor(layer, part) + n + ".weight"; };
      const auto& gate = detail::gguf_expect(file, per("ffn_gate."), {D, F}, "[n_embd, n_ff]");
      const auto& up = detail::gguf_expect(file, per("ffn_up."), {D, F}, "[n_embd, n_ff]");
      const auto& down = detail::gguf_expect(file, per("ffn_down."), {F, D}, "[n_ff, n_embd]");
      detail::gguf_rows_into<T>(file, gate, 0, w.experts.gate(e), scratch);
      detail::gguf_rows_into<T>(file, up, 0, w.experts.up(e), scratch);
      detail::gguf_rows_into<T>(file, down, 0, w.experts.w_out(e), scratch);
    }
  }

  if (Fs > 0) {
    const auto& gate =
        detail::gguf_expect(file, name("ffn_gate_shexp.weight"), {D, Fs}, "[n_embd, n_ff_shexp]");
    const auto& up =
        detail::gguf_expect(file, name("ffn_up_shexp.weight"), {D, Fs}, "[n_embd, n_ff_shexp]");
    const auto& down =
        detail::gguf_expect(file, name("ffn_down_shexp.weight"), {Fs, D}, "[n_ff_shexp, n_embd]");
    detail::gguf_rows_into<T>(file, gate, 0, w.shared.gate(0), scratch);
    detail::gguf_rows_into<T>(file, up, 0, w.shared.up(0), scratch);
    detail::gguf_rows_into<T>(file, down, 0, w.shared.w_out(0), scratch);
    if (c.shared_expert_gate) {
      const std::string g = name("ffn_gate_inp_shexp.weight");
      const bool flat = file.contains(g) && file.tensor(g).dims.size() == 1;
      const auto& sg = flat ? detail::gguf_expect(file, g, {D}, "[n_embd]")
                            : detail::gguf_expect(file, g, {D, 1}, "[n_embd, 1]");
      detail::gguf_rows_into<T>(file, sg, 0, MutMap<T>(w.shared_gate.data(), 1, D), scratch);
    }
  }
  return w;
}

}  // namespace moe::io
