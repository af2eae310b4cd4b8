// A Mixtral-style decoder at toy scale, written for the example: embedding, RMSNorm, grouped-query
// attention with RoPE, the moe library's sparse MoE block, final norm and LM head. Everything but
// the MoE block is the example's own code (plain Eigen), kept short and readable.
//
// load_model() fills the same structs from a Hugging Face checkpoint directory (Mixtral, or
// Qwen2-MoE: q/k/v biases and the gated shared expert are the only differences that matter here).
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "moe/io/model.hpp"
#include "moe/moe.hpp"

namespace example {

using moe::Index;
using Matrix = moe::RowMatrix<float>;
/// A sparse layer of any supported family, its experts stored as chosen at load time.
using Block = moe::io::AnyMoeBlock<float>;
/// Mixtral's block (softmax top-k, renormalised; the generic policy's defaults are Mixtral's), with
/// its routed experts stored as `Storage`: AnyMoeBlock's first family alternative.
template <class Storage = moe::NativeExperts>
using MixtralBlock = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU, Storage>;

/// The arguments' stream output, concatenated (error messages).
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

/// Model hyper-parameters (Hugging Face MixtralConfig names in comments).
struct ModelConfig {
  Index vocab_size = 512;
  Index hidden_size = 256;        // d_model
  Index intermediate_size = 512;  // expert d_ff
  Index num_layers = 4;           // num_hidden_layers
  Index num_heads = 8;            // num_attention_heads
  Index num_kv_heads = 2;         // num_key_value_heads
  Index head_dim = 32;            // hidden_size / num_heads unless given
  Index num_experts = 8;          // num_local_experts
  Index top_k = 2;                // num_experts_per_tok
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;
  Index sliding_window = 0;  // sliding_window (0: full causal attention)

  moe::MoeConfig moe() const {
    moe::MoeConfig c;
    c.d_model = hidden_size;
    c.d_ff = intermediate_size;
    c.num_experts = num_experts;
    c.top_k = top_k;
    return c;
  }
};

/// One decoder layer's weights, nn.Linear [out x in] layout as in the checkpoint.
struct LayerWeights {
  moe::Vector<float> input_norm, post_attention_norm;  // [hidden]
  Matrix q_proj, k_proj, v_proj, o_proj;               // [H*hd x d], [KV*hd x d] x2, [d x H*hd]
  Block moe;                                           // block_sparse_moe
  moe::Vector<float> q_bias, k_bias, v_bias;           // Qwen2-MoE q/k/v_proj.bias, else empty
};

/// All weights of the model behind one struct: a checkpoint loader fills exactly this.
struct ModelWeights {
  ModelConfig config;
  Matrix embed_tokens;  // [vocab x hidden]
  std::vector<LayerWeights> layers;
  moe::Vector<float> final_norm;
  Matrix lm_head;  // [vocab x hidden]
};

inline Matrix random_matrix(Index rows, Index cols, std::mt19937_64& rng, double scale) {
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

/// An fp32 block's weights with the routed experts stored as `format` (quantised expert by
/// expert; as_stored and fp32 keep fp32); exact: the exact products of q8 / q4 / mxfp4.
inline Block make_block(const moe::MoeConfig& c, moe::MoeWeights<float> w,
                        moe::io::WeightFormat format, bool exact = false) {
  constexpr moe::CompactMode x = moe::CompactMode::exact;
  switch (format) {
    case moe::io::WeightFormat::q8:
      if (exact) return MixtralBlock<moe::CompactExperts<moe::Q8, x>>(c, std::move(w));
      return MixtralBlock<moe::CompactExperts<moe::Q8>>(c, std::move(w));
    case moe::io::WeightFormat::q4:
      if (exact) return MixtralBlock<moe::CompactExperts<moe::Q4, x>>(c, std::move(w));
      return MixtralBlock<moe::CompactExperts<moe::Q4>>(c, std::move(w));
    case moe::io::WeightFormat::mxfp4:
      if (exact) return MixtralBlock<moe::CompactExperts<moe::Mxfp4, x>>(c, std::move(w));
      return MixtralBlock<moe::CompactExperts<moe::Mxfp4>>(c, std::move(w));
    case moe::io::WeightFormat::bf16:
      return MixtralBlock<moe::CompactExperts<moe::Bf16>>(c, std::move(w));
    case moe::io::WeightFormat::int8:
      return MixtralBlock<moe::CompactExperts<moe::Int8>>(c, std::move(w));
    case moe::io::WeightFormat::fp8:
      return MixtralBlock<moe::CompactExperts<moe::Fp8E4M3>>(c, std::move(w));
    default:
      return MixtralBlock<>(c, std::move(w));
  }
}

/// Seeded random weights with the scales of a trained model's initialisation; the routed
/// experts stored as `format` (exact: see make_block).
inline ModelWeights random_model(const ModelConfig& c, std::uint64_t seed,
                                 moe::io::WeightFormat format = moe::io::WeightFormat::fp32,
                                 bool exact = false) {
  std::mt19937_64 rng(seed);
  ModelWeights w;
  w.config = c;
  const double s = 1.0 / std::sqrt(static_cast<double>(c.hidden_size));
  w.embed_tokens = random_matrix(c.vocab_size, c.hidden_size, rng, 1.0);
  for (Index l = 0; l < c.num_layers; ++l) {
    auto mw = moe::MoeWeights<float>::zeros(c.moe());
    mw.router = random_matrix(c.num_experts, c.hidden_size, rng, s);
    mw.experts.stacked_in() = random_matrix(mw.experts.stacked_in().rows(), c.hidden_size, rng, s);
    mw.experts.stacked_out() = random_matrix(mw.experts.stacked_out().rows(), c.intermediate_size,
                                             rng, 1.0 / std::sqrt(double(c.intermediate_size)));
    LayerWeights layer{moe::Vector<float>::Ones(c.hidden_size),
                       moe::Vector<float>::Ones(c.hidden_size),
                       random_matrix(c.num_heads * c.head_dim, c.hidden_size, rng, s),
                       random_matrix(c.num_kv_heads * c.head_dim, c.hidden_size, rng, s),
                       random_matrix(c.num_kv_heads * c.head_dim, c.hidden_size, rng, s),
                       random_matrix(c.hidden_size, c.num_heads * c.head_dim, rng, s),
                       make_block(c.moe(), std::move(mw), format, exact),
                       {},
                       {},
                       {}};
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = moe::Vector<float>::Ones(c.hidden_size);
  w.lm_head = random_matrix(c.vocab_size, c.hidden_size, rng, s);
  return w;
}

/// out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps).
inline void rms_norm(const Matrix& x, const moe::Vector<float>& w, double eps, Matrix& out) {
  out.resize(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    const double ms = x.row(t).cast<double>().squaredNorm() / static_cast<double>(x.cols());
    const float inv = static_cast<float>(1.0 / std::sqrt(ms + eps));
    out.row(t) = x.row(t).cwiseProduct(w.transpose()) * inv;
  }
}

/// Rotary embedding in the Hugging Face layout: the two halves of each head are the pair.
inline void apply_rope(Matrix& m, Index num_heads, Index head_dim, double theta) {
  const Index half = head_dim / 2;
  for (Index t = 0; t < m.rows(); ++t) {
    for (Index i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / double(head_dim));
      const double angle = static_cast<double>(t) * inv_freq;
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      for (Index h = 0; h < num_heads; ++h) {
        float* q = m.data() + t * m.cols() + h * head_dim;
        const float a = q[i], b = q[i + half];
        q[i] = a * c - b * s;
        q[i + half] = b * c + a * s;
      }
    }
  }
}

/// Causal grouped-query self-attention over the whole sequence (prefill).
inline Matrix attention(const Matrix& x, const LayerWeights& w, const ModelConfig& c) {
  Matrix q = x * w.q_proj.transpose();
  Matrix k = x * w.k_proj.transpose();
  Matrix v = x * w.v_proj.transpose();
  if (w.q_bias.size() != 0) q.rowwise() += w.q_bias.transpose();
  if (w.k_bias.size() != 0) k.rowwise() += w.k_bias.transpose();
  if (w.v_bias.size() != 0) v.rowwise() += w.v_bias.transpose();
  apply_rope(q, c.num_heads, c.head_dim, c.rope_theta);
  apply_rope(k, c.num_kv_heads, c.head_dim, c.rope_theta);
  const Index S = x.rows(), hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Matrix ctx = Matrix::Zero(S, c.num_heads * hd);
  std::vector<float> p(static_cast<std::size_t>(S));
  for (Index h = 0; h < c.num_heads; ++h) {
    const Index kvh = h / group;
    for (Index i = 0; i < S; ++i) {
      // Causal; with a sliding window key j is visible while i - j < window (HF's mask).
      const Index j0 = c.sliding_window > 0 ? std::max<Index>(0, i - c.sliding_window + 1) : 0;
      float m = -INFINITY;
      for (Index j = j0; j <= i; ++j) {
        const float s = scale * q.row(i).segment(h * hd, hd).dot(k.row(j).segment(kvh * hd, hd));
        p[static_cast<std::size_t>(j)] = s;
        m = std::max(m, s);
      }
      float sum = 0;
      for (Index j = j0; j <= i; ++j) sum += (p[std::size_t(j)] = std::exp(p[std::size_t(j)] - m));
      for (Index j = j0; j <= i; ++j) {
        ctx.row(i).segment(h * hd, hd) +=
            (p[std::size_t(j)] / sum) * v.row(j).segment(kvh * hd, hd);
      }
    }
  }
  return ctx * w.o_proj.transpose();
}

/// What a forward pass leaves for the caller besides the logits.
struct ForwardTrace {
  std::vector<std::vector<Index>> tokens_per_expert;  // [layer][expert]
  std::vector<Matrix> hidden_states;                  // embeddings, then after each layer
  std::vector<moe::RowMatrix<float>> router_logits;   // [layer] [S x num_experts]
};

/// Runs the model on token ids and returns the logits [S x vocab].
inline Matrix forward(const ModelWeights& w, const std::vector<Index>& ids,
                      moe::Workspace<float>& ws, const moe::Executor& executor,
                      ForwardTrace* trace = nullptr) {
  const ModelConfig& c = w.config;
  const Index S = static_cast<Index>(ids.size());
  Matrix h(S, c.hidden_size);
  for (Index t = 0; t < S; ++t) {
    const Index id = ids[static_cast<std::size_t>(t)];
    if (id < 0 || id >= c.vocab_size) {
      throw moe::error(cat("example: token id ", id, " outside [0, ", c.vocab_size, ")"));
    }
    h.row(t) = w.embed_tokens.row(id);
  }
  if (trace) trace->hidden_states.push_back(h);
  Matrix normed, moe_out(S, c.hidden_size);
  for (const LayerWeights& layer : w.layers) {
    rms_norm(h, layer.input_norm, c.rms_norm_eps, normed);
    h += attention(normed, layer, c);
    rms_norm(h, layer.post_attention_norm, c.rms_norm_eps, normed);
    layer.moe.forward(normed, moe_out, ws, executor);
    h += moe_out;
    if (trace) {
      trace->tokens_per_expert.push_back(ws.stats().tokens_per_expert);
      trace->hidden_states.push_back(h);
      trace->router_logits.push_back(ws.routing().logits());
    }
  }
  rms_norm(h, w.final_norm, c.rms_norm_eps, normed);
  return normed * w.lm_head.transpose();
}

/// rope_theta of a config.json: top-level "rope_theta" (transformers 4.x) or
/// "rope_parameters": {"rope_theta": ...} (5.x). Only the default (unscaled) RoPE is implemented.
inline double read_rope_theta(const moe::io::ModelSpec& spec, double fallback) {
  const nlohmann::json& j = spec.json;
  const auto params = j.find("rope_parameters");
  if (params != j.end() && params->is_object()) {
    const std::string type = params->value("rope_type", std::string("default"));
    if (type != "default") {
      throw moe::config_error("example: " + spec.source + ": rope_type '" + type +
                              "' is not implemented by this example");
    }
    const auto theta = params->find("rope_theta");
    if (theta != params->end() && theta->is_number()) return theta->get<double>();
  }
  const auto scaling = j.find("rope_scaling");
  if (scaling != j.end() && !scaling->is_null()) {
    throw moe::config_error("example: " + spec.source + ": rope_scaling is not implemented");
  }
  return spec.get_double("rope_theta", fallback);
}

/// Loads a whole Hugging Face Mixtral or Qwen2-MoE checkpoint directory (config.json +
/// model.safetensors or a sharded index) into ModelWeights: embeddings, norms, attention (with
/// q/k/v biases when the checkpoint has them), every MoE layer through
/// moe::io::load_any_moe_layer with `options` (options.weights: what the routed experts are kept
/// as; as_stored keeps BF16 / F8_E4M3 experts as views of the mapped file), final norm, lm_head
/// (or the tied embeddings). Every other bf16/f16 weight converts to float.
/// Throws moe::io_error / shape_error / config_error naming the tensor or key.
inline ModelWeights load_model(const std::string& dir,
                               const moe::io::LoadOptions& options = {}) {
  const moe::io::ModelCheckpoint ckpt = moe::io::ModelCheckpoint::open(dir);
  const moe::io::ModelSpec& spec = ckpt.spec();
  const moe::io::Family family = spec.family;
  if (family != moe::io::Family::mixtral && family != moe::io::Family::qwen2_moe) {
    throw moe::config_error(std::string("example: ") + spec.source + ": model_type '" +
                            moe::io::family_name(family) +
                            "' is not supported by this example (mixtral, qwen2_moe)");
  }
  ModelWeights w;
  ModelConfig& c = w.config;
  c.vocab_size = spec.get_int("vocab_size");
  c.hidden_size = spec.moe.d_model;
  c.intermediate_size = spec.moe.d_ff;
  c.num_layers = spec.num_layers;
  c.num_heads = spec.get_int("num_attention_heads");
  c.num_kv_heads = spec.get_int("num_key_value_heads", c.num_heads);
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    throw moe::config_error(cat("example: ", spec.source, ": num_attention_heads ", c.num_heads,
                                " is not a multiple of ", "num_key_value_heads ", c.num_kv_heads));
  }
  c.head_dim = spec.get_int("head_dim", c.hidden_size / c.num_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    throw moe::config_error(
        cat("example: ", spec.source, ": head_dim ", c.head_dim, " must be positive and even"));
  }
  c.num_experts = spec.moe.num_experts;
  c.top_k = spec.moe.top_k;
  c.rms_norm_eps =
      spec.get_double("rms_norm_eps", family == moe::io::Family::mixtral ? 1e-5 : 1e-6);
  c.rope_theta = read_rope_theta(spec, family == moe::io::Family::mixtral ? 1e6 : 1e4);
  if (family == moe::io::Family::qwen2_moe && spec.get_bool("use_sliding_window", false)) {
    throw moe::config_error("example: " + spec.source +
                            ": use_sliding_window (per-layer windows) is not implemented");
  }
  c.sliding_window = family == moe::io::Family::mixtral ? spec.get_int("sliding_window", 0) : 0;

  const moe::io::Checkpoint& t = ckpt.tensors();
  const Index H = c.hidden_size;
  auto matrix = [&](const std::string& name, Index rows, Index cols) {
    if (!t.contains(name))
      throw moe::io_error("example: " + dir + ": missing tensor '" + name + "'");
    Matrix m = t.read_matrix<float>(name);
    const auto& shape = t.info(name).shape;
    if (shape.size() != 2 || m.rows() != rows || m.cols() != cols) {
      throw moe::shape_error("example: " + dir + ": tensor '" + name + "' has shape " +
                             moe::io::shape_str(shape) + ", config.json implies " +
                             cat('[', rows, " x ", cols, ']'));
    }
    return m;
  };
  auto vector = [&](const std::string& name, Index n) -> moe::Vector<float> {
    if (!t.contains(name))
      throw moe::io_error("example: " + dir + ": missing tensor '" + name + "'");
    const auto& shape = t.info(name).shape;
    if (shape.size() != 1 || shape[0] != n) {
      throw moe::shape_error(cat("example: ", dir, ": tensor '", name, "' has shape ",
                                 moe::io::shape_str(shape), ", config.json implies [", n, "]"));
    }
    return t.read_matrix<float>(name).transpose();
  };
  auto optional_vector = [&](const std::string& name, Index n) {
    return t.contains(name) ? vector(name, n) : moe::Vector<float>();
  };

  w.embed_tokens = matrix("model.embed_tokens.weight", c.vocab_size, H);
  const Index q_rows = c.num_heads * c.head_dim, kv_rows = c.num_kv_heads * c.head_dim;
  for (Index l = 0; l < c.num_layers; ++l) {
    if (!spec.is_moe_layer(l)) {
      throw moe::config_error(cat("example: ", spec.source, ": layer ", l,
                                  " is dense; this example runs MoE layers only"));
    }
    const std::string p = cat("model.layers.", l, ".");
    LayerWeights layer{vector(p + "input_layernorm.weight", H),
                       vector(p + "post_attention_layernorm.weight", H),
                       matrix(p + "self_attn.q_proj.weight", q_rows, H),
                       matrix(p + "self_attn.k_proj.weight", kv_rows, H),
                       matrix(p + "self_attn.v_proj.weight", kv_rows, H),
                       matrix(p + "self_attn.o_proj.weight", H, q_rows),
                       moe::io::load_any_moe_layer<float>(ckpt, l, options),
                       optional_vector(p + "self_attn.q_proj.bias", q_rows),
                       optional_vector(p + "self_attn.k_proj.bias", kv_rows),
                       optional_vector(p + "self_attn.v_proj.bias", kv_rows)};
    w.layers.push_back(std::move(layer));
  }
  w.final_norm = vector("model.norm.weight", H);
  w.lm_head = spec.get_bool("tie_word_embeddings", false)
                  ? w.embed_tokens
                  : matrix("lm_head.weight", c.vocab_size, H);
  return w;
}

}  // namespace example
