// A Mixtral-style decoder at toy scale, written for the example: embedding, RMSNorm, grouped-query
// attention with RoPE, the moe library's sparse MoE block, final norm and LM head. Everything but
// the MoE block is the example's own code (plain Eigen), kept short and readable.
#pragma once

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.hpp"

namespace example {

using moe::Index;
using Matrix = moe::RowMatrix<float>;
using Block = moe::SparseMoeBlock<float, moe::gating::Mixtral, moe::SwiGLU>;

/// Model hyper-parameters (Hugging Face MixtralConfig names in comments).
struct ModelConfig {
  Index vocab_size = 512;
  Index hidden_size = 256;         // d_model
  Index intermediate_size = 512;   // expert d_ff
  Index num_layers = 4;            // num_hidden_layers
  Index num_heads = 8;             // num_attention_heads
  Index num_kv_heads = 2;          // num_key_value_heads
  Index head_dim = 32;             // hidden_size / num_heads unless given
  Index num_experts = 8;           // num_local_experts
  Index top_k = 2;                 // num_experts_per_tok
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;

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
};

/// All weights of the model behind one struct: a checkpoint loader fills exactly this.
struct ModelWeights {
  ModelConfig config;
  Matrix embed_tokens;       // [vocab x hidden]
  std::vector<LayerWeights> layers;
  moe::Vector<float> final_norm;
  Matrix lm_head;            // [vocab x hidden]
};

inline Matrix random_matrix(Index rows, Index cols, std::mt19937_64& rng, double scale) {
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

/// Seeded random weights with the scales of a trained model's initialisation.
inline ModelWeights random_model(const ModelConfig& c, std::uint64_t seed) {
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
                       Block(c.moe(), std::move(mw))};
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
  apply_rope(q, c.num_heads, c.head_dim, c.rope_theta);
  apply_rope(k, c.num_kv_heads, c.head_dim, c.rope_theta);
  const Index S = x.rows(), hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Matrix ctx = Matrix::Zero(S, c.num_heads * hd);
  std::vector<float> p(static_cast<std::size_t>(S));
  for (Index h = 0; h < c.num_heads; ++h) {
    const Index kvh = h / group;
    for (Index i = 0; i < S; ++i) {
      float m = -INFINITY;
      for (Index j = 0; j <= i; ++j) {
        const float s = scale * q.row(i).segment(h * hd, hd).dot(k.row(j).segment(kvh * hd, hd));
        p[static_cast<std::size_t>(j)] = s;
        m = std::max(m, s);
      }
      float sum = 0;
      for (Index j = 0; j <= i; ++j) sum += (p[std::size_t(j)] = std::exp(p[std::size_t(j)] - m));
      for (Index j = 0; j <= i; ++j) {
        ctx.row(i).segment(h * hd, hd) += (p[std::size_t(j)] / sum) * v.row(j).segment(kvh * hd, hd);
      }
    }
  }
  return ctx * w.o_proj.transpose();
}

/// What a forward pass leaves for the caller besides the logits.
struct ForwardTrace {
  std::vector<std::vector<Index>> tokens_per_expert;  // [layer][expert]
  std::vector<Matrix> hidden_states;                  // embeddings, then after each layer
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
      throw moe::error(moe::detail::concat("example: token id ", id, " outside [0, ",
                                           c.vocab_size, ")"));
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
    }
  }
  rms_norm(h, w.final_norm, c.rms_norm_eps, normed);
  return normed * w.lm_head.transpose();
}

}  // namespace example
