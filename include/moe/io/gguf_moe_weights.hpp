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
//   blk.N.ffn_gate_inp.bias          [n_expert]                      gpt-oss router logit bias
//   blk.N.ffn_{gate,up}_exps.bias    [n_ff_exp, n_expert]            gpt-oss expert biases (or
//   blk.N.ffn_gate_up_exps.bias      [2 n_ff_exp, n_expert]          fused: gate, then up)
//   blk.N.ffn_down_exps.bias         [n_embd, n_expert]
// Every tensor's dims are checked against the spec before anything is decoded; the weights are
// decoded to float one expert at a time (any type gguf_decode.hpp reads: F32, F16, BF16, Q8_0,
// Q4_0, MXFP4, Q4_K, Q5_K, Q6_K) and every value is checked finite.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
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
/// and a type moe decodes: a pointer into f (not a reference, which GCC 13's -Wdangling-reference
/// flags at every call binding it, because the arguments are temporaries). Throws io_error naming
/// the tensor.
inline const GgufTensorInfo* gguf_expect(const GgufFile& f, const std::string& name,
                                         const std::vector<std::int64_t>& dims,
                                         const char* meaning) {
  const GgufTensorInfo& t = f.tensor(name);
  if (t.dims != dims) {
    throw io_error(moe::detail::concat("moe: ", f.path(), ": tensor '", name, "' has dims ",
                                       gguf_dims_str(t.dims), ", expected ", gguf_dims_str(dims),
                                       " ", meaning));
  }
  if (!ggml_type_decodes_to_float(t.type)) (void)gguf_to_float(f, name);  // throws the message
  return &t;
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

/// Where one projection of one expert lives: rows [row0, row0 + rows) of `tensor`.
struct GgufRows {
  const GgufTensorInfo* tensor = nullptr;
  Index row0 = 0;
};

/// The routed-expert tensors of one layer, found and checked against the spec once: stacked
/// (ffn_{gate,up,down}_exps), fused (ffn_gate_up_exps + ffn_down_exps) or per expert
/// (ffn_{gate,up,down}.E). Throws io_error for a missing tensor, wrong dims or an undecodable type.
class GgufRoutedExperts {
 public:
  GgufRoutedExperts(const GgufFile& file, const MoeConfig& c, Index layer)
      : d_(c.d_model), f_(c.d_ff) {
    auto name = [&](const char* suffix) { return gguf_block_tensor(layer, suffix); };
    const Index D = d_, F = f_, E = c.num_experts;
    fused_ = file.contains(name("ffn_gate_up_exps.weight"));
    per_expert_ = !fused_ && !file.contains(name("ffn_gate_exps.weight"));
    if (per_expert_) {
      for (Index e = 0; e < E; ++e) {
        const std::string n = std::to_string(e);
        auto per = [&](const char* part) { return gguf_block_tensor(layer, part) + n + ".weight"; };
        gates_.push_back(gguf_expect(file, per("ffn_gate."), {D, F}, "[n_embd, n_ff]"));
        ups_.push_back(gguf_expect(file, per("ffn_up."), {D, F}, "[n_embd, n_ff]"));
        downs_.push_back(gguf_expect(file, per("ffn_down."), {F, D}, "[n_ff, n_embd]"));
      }
      return;
    }
    if (fused_) {
      gates_.push_back(gguf_expect(file, name("ffn_gate_up_exps.weight"), {D, 2 * F, E},
                                    "[n_embd, 2 n_ff_exp, n_expert]"));
    } else {
      gates_.push_back(gguf_expect(file, name("ffn_gate_exps.weight"), {D, F, E},
                                    "[n_embd, n_ff_exp, n_expert]"));
      ups_.push_back(gguf_expect(file, name("ffn_up_exps.weight"), {D, F, E},
                                  "[n_embd, n_ff_exp, n_expert]"));
    }
    downs_.push_back(gguf_expect(file, name("ffn_down_exps.weight"), {F, D, E},
                                  "[n_ff_exp, n_embd, n_expert]"));
  }

  /// Expert e's gate and up ([d_ff] rows of d_model) and down ([d_model] rows of d_ff).
  GgufRows gate(Index e) const {
    if (per_expert_) return {gates_[std::size_t(e)], 0};
    return {gates_[0], (fused_ ? 2 * f_ : f_) * e};
  }
  GgufRows up(Index e) const {
    if (per_expert_) return {ups_[std::size_t(e)], 0};
    return fused_ ? GgufRows{gates_[0], 2 * f_ * e + f_} : GgufRows{ups_[0], f_ * e};
  }
  GgufRows down(Index e) const {
    if (per_expert_) return {downs_[std::size_t(e)], 0};
    return {downs_[0], d_ * e};
  }
  /// True when every routed-expert tensor has ggml type `type`.
  bool all_of_type(GgmlType type) const {
    for (const auto* list : {&gates_, &ups_, &downs_}) {
      for (const GgufTensorInfo* t : *list) {
        if (t->type != type) return false;
      }
    }
    return true;
  }

 private:
  Index d_, f_;
  bool fused_ = false, per_expert_ = false;
  std::vector<const GgufTensorInfo*> gates_, ups_, downs_;
};

/// gpt-oss's expert biases of `layer` into `experts` (add_biases: in_bias(e) = gate entries, then
/// up; out_bias(e) = down), from ffn_{gate,up}_exps.bias or the fused ffn_gate_up_exps.bias, and
/// ffn_down_exps.bias. Stack: ExpertStack<T>, or a compact stack (fp32 biases). Throws io_error
/// for a missing tensor or wrong dims.
template <class Stack>
void gguf_expert_biases(const GgufFile& file, const MoeConfig& c, Index layer, Stack& experts,
                        std::vector<float>& scratch) {
  using T = typename std::decay_t<decltype(experts.in_biases())>::Scalar;
  auto name = [&](const char* suffix) { return gguf_block_tensor(layer, suffix); };
  const Index D = c.d_model, F = c.d_ff, E = c.num_experts;
  experts.add_biases();
  RowMatrix<T>& in = experts.in_biases();  // [E x 2F]
  if (file.contains(name("ffn_gate_up_exps.bias"))) {
    const auto& t =
        *gguf_expect(file, name("ffn_gate_up_exps.bias"), {2 * F, E}, "[2 n_ff_exp, n_expert]");
    gguf_rows_into<T>(file, t, 0, MutMap<T>(in.data(), E, 2 * F), scratch);
  } else {
    RowMatrix<T> part(E, F);
    const auto& gate =
        *gguf_expect(file, name("ffn_gate_exps.bias"), {F, E}, "[n_ff_exp, n_expert]");
    gguf_rows_into<T>(file, gate, 0, MutMap<T>(part.data(), E, F), scratch);
    in.leftCols(F) = part;
    const auto& up = *gguf_expect(file, name("ffn_up_exps.bias"), {F, E}, "[n_ff_exp, n_expert]");
    gguf_rows_into<T>(file, up, 0, MutMap<T>(part.data(), E, F), scratch);
    in.rightCols(F) = part;
  }
  const auto& down = *gguf_expect(file, name("ffn_down_exps.bias"), {D, E}, "[n_embd, n_expert]");
  gguf_rows_into<T>(file, down, 0, MutMap<T>(experts.out_biases().data(), E, D), scratch);
}

/// Throws config_error unless `layer` is a sparse layer of `file` within the spec's range.
inline void gguf_check_moe_layer(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  if (layer < 0 || layer >= spec.num_layers) {
    throw config_error(moe::detail::concat("moe: layer ", layer, " out of range [0, ",
                                           spec.num_layers, ") of ", file.path()));
  }
  if (!gguf_is_moe_layer(file, layer)) {
    throw config_error(moe::detail::concat("moe: ", file.path(), ": layer ", layer,
                                           " is dense (it has no ",
                                           gguf_block_tensor(layer, "ffn_gate_inp.weight"), ")"));
  }
}

}  // namespace detail

/// The weights of sparse layer `layer` of `file` (sizes from `spec`), converted to T: router
/// [E x d_model], every expert's gate/up [d_ff x d_model] and down [d_model x d_ff] from the
/// stacked, fused or per-expert tensors, the DeepSeek-V3 selection bias, gpt-oss's router and
/// expert biases, the shared expert and its gate. routed_experts = false leaves w.experts empty
/// (the tensors are still checked): for a block given its experts compact. Throws config_error for
/// a layer out of range or dense; io_error for a missing tensor, wrong dims, a type moe does not
/// decode or a non-finite value (each naming the tensor).
template <class T>
MoeWeights<T> load_gguf_moe_weights(const GgufFile& file, const GgufMoeSpec& spec, Index layer,
                                    bool routed_experts = true) {
  detail::gguf_check_moe_layer(file, spec, layer);
  const MoeConfig& c = spec.moe;
  const Index D = c.d_model, E = c.num_experts, Fs = c.shared_d_ff;
  auto name = [&](const char* suffix) { return gguf_block_tensor(layer, suffix); };
  std::vector<float> scratch;
  MoeWeights<T> w;  // field by field: nothing is allocated twice or for experts not read

  const auto& router =
      *detail::gguf_expect(file, name("ffn_gate_inp.weight"), {D, E}, "[n_embd, n_expert]");
  w.router = RowMatrix<T>(E, D);
  detail::gguf_rows_into<T>(file, router, 0, MutMap<T>(w.router.data(), E, D), scratch);
  if (spec.routing == GgufRouting::deepseek_v3) {
    const auto& bias = *detail::gguf_expect(file, name("exp_probs_b.bias"), {E}, "[n_expert]");
    w.router_bias = Vector<T>(E);
    detail::gguf_rows_into<T>(file, bias, 0, MutMap<T>(w.router_bias.data(), 1, E), scratch);
  }

  if (spec.expert_biases) {
    const auto& bias = *detail::gguf_expect(file, name("ffn_gate_inp.bias"), {E}, "[n_expert]");
    w.router_logit_bias = Vector<T>(E);
    detail::gguf_rows_into<T>(file, bias, 0, MutMap<T>(w.router_logit_bias.data(), 1, E), scratch);
  }

  const detail::GgufRoutedExperts experts(file, c, layer);  // checks the tensors in any case
  if (routed_experts) {
    w.experts = ExpertStack<T>(E, D, c.d_ff, /*gated=*/true);
    for (Index e = 0; e < E; ++e) {
      const detail::GgufRows g = experts.gate(e), u = experts.up(e), d = experts.down(e);
      detail::gguf_rows_into<T>(file, *g.tensor, g.row0, w.experts.gate(e), scratch);
      detail::gguf_rows_into<T>(file, *u.tensor, u.row0, w.experts.up(e), scratch);
      detail::gguf_rows_into<T>(file, *d.tensor, d.row0, w.experts.w_out(e), scratch);
    }
    if (spec.expert_biases) detail::gguf_expert_biases(file, c, layer, w.experts, scratch);
  }

  if (Fs > 0) {
    const auto& gate =
        *detail::gguf_expect(file, name("ffn_gate_shexp.weight"), {D, Fs}, "[n_embd, n_ff_shexp]");
    const auto& up =
        *detail::gguf_expect(file, name("ffn_up_shexp.weight"), {D, Fs}, "[n_embd, n_ff_shexp]");
    const auto& down =
        *detail::gguf_expect(file, name("ffn_down_shexp.weight"), {Fs, D}, "[n_ff_shexp, n_embd]");
    w.shared = ExpertStack<T>(1, D, Fs, /*gated=*/true);
    detail::gguf_rows_into<T>(file, gate, 0, w.shared.gate(0), scratch);
    detail::gguf_rows_into<T>(file, up, 0, w.shared.up(0), scratch);
    detail::gguf_rows_into<T>(file, down, 0, w.shared.w_out(0), scratch);
    if (c.shared_expert_gate) {
      const std::string g = name("ffn_gate_inp_shexp.weight");
      const bool flat = file.contains(g) && file.tensor(g).dims.size() == 1;
      const auto& sg = flat ? *detail::gguf_expect(file, g, {D}, "[n_embd]")
                            : *detail::gguf_expect(file, g, {D, 1}, "[n_embd, 1]");
      w.shared_gate = RowMatrix<T>(1, D);
      detail::gguf_rows_into<T>(file, sg, 0, MutMap<T>(w.shared_gate.data(), 1, D), scratch);
    }
  }
  return w;
}

}  // namespace moe::io
