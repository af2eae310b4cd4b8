// The family numbers of issue 12 in a block (clamped GLU forms, expert biases, relu^2 and
// gelu-tanh kinds, the weight on the expert input, routed scale and bias, shared average and
// float32 combine, the norms around the experts, router extras), each against a plain per-token
// double loop written from FORMAT.md section 6, on awkward token counts. The v2 golden cases
// (reference runner, IoHfConfig) check the same pieces against Hugging Face.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

namespace moe {
namespace {

RowMatrix<double> random_matrix(std::mt19937& rng, Index r, Index c, double scale = 0.3) {
  std::normal_distribution<double> n(0.0, scale);
  RowMatrix<double> m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

/// What the plain loop needs to know beyond the weights.
struct Plain {
  bool gated = true;
  double (*act)(double) = [](double g) { return g / (1 + std::exp(-g)); };
};

double glu(double g, double u, const GluOptions& o, double (*act)(double)) {
  u = std::min(std::max(u, -o.limit), o.limit) + o.up_offset;
  if (o.clamp_after_activation) return std::min(act(g), o.limit) * u;
  g = std::min(g, o.limit);
  const double a = o.alpha == 1.0 ? act(g) : g / (1 + std::exp(-o.alpha * g));
  return a * u;
}

/// One expert e of a stack on one input row, written out: biases, GLU numbers, activation.
std::vector<double> expert(const ExpertStack<double>& s, Index e, const std::vector<double>& x,
                           const GluOptions& o, const Plain& p) {
  const Index d = s.d_model(), f = s.d_ff();
  std::vector<double> h(static_cast<std::size_t>(f)), y(static_cast<std::size_t>(d));
  for (Index i = 0; i < f; ++i) {
    double g = 0, u = 0;
    for (Index c = 0; c < d; ++c) {
      g += s.gate(e)(i, c) * x[static_cast<std::size_t>(c)];
      if (p.gated) u += s.up(e)(i, c) * x[static_cast<std::size_t>(c)];
    }
    if (s.in_bias(e)) {
      g += s.in_bias(e)[i];
      if (p.gated) u += s.in_bias(e)[f + i];
    }
    h[static_cast<std::size_t>(i)] = p.gated ? glu(g, u, o, p.act) : p.act(g);
  }
  for (Index c = 0; c < d; ++c) {
    double v = s.out_bias(e) ? s.out_bias(e)[c] : 0.0;
    for (Index i = 0; i < f; ++i) v += s.w_out(e)(c, i) * h[static_cast<std::size_t>(i)];
    y[static_cast<std::size_t>(c)] = v;
  }
  return y;
}

std::vector<double> rms_norm_f32(const std::vector<double>& v, const Vector<double>& w,
                                 double eps) {
  float ms = 0;
  for (double a : v) ms += static_cast<float>(a) * static_cast<float>(a);
  const float inv = 1.0f / std::sqrt(ms / static_cast<float>(v.size()) + static_cast<float>(eps));
  std::vector<double> out(v.size());
  for (std::size_t c = 0; c < v.size(); ++c) {
    out[c] = static_cast<double>(static_cast<float>(v[c]) * inv *
                                 static_cast<float>(w[static_cast<Index>(c)]));
  }
  return out;
}

/// The block's output written per token from the routing it chose (its weights and experts are
/// read back from the workspace: routing itself is the gating tests' business).
template <class Block>
RowMatrix<double> plain_forward(const Block& b, const RowMatrix<double>& x,
                                const Routing<double>& routing, const Plain& p,
                                const Plain& shared_p) {
  const MoeConfig& c = b.config();
  const MoeWeights<double>& w = b.weights();
  const double scale = gating::routed_output_scale(b.gating());
  RowMatrix<double> y(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> xt(x.row(t).data(), x.row(t).data() + x.cols());
    std::vector<double> xe = xt;
    if (w.expert_input_norm.size()) xe = rms_norm_f32(xt, w.expert_input_norm, c.router_norm_eps);
    std::vector<double> acc(static_cast<std::size_t>(x.cols()), 0.0);
    for (Index j = 0; j < routing.slots(); ++j) {
      if (!routing.kept()(t, j)) continue;
      const Index e = routing.experts()(t, j);
      const double wt = routing.weights()(t, j);
      std::vector<double> in = xe;
      if (c.weight_expert_input)
        for (double& v : in) v *= wt;
      const std::vector<double> out = expert(w.experts, e, in, c.expert_glu, p);
      for (std::size_t k = 0; k < acc.size(); ++k)
        acc[k] += (c.weight_expert_input ? 1.0 : wt) * out[k];
    }
    for (std::size_t k = 0; k < acc.size(); ++k) {
      acc[k] *= scale;
      if (w.output_bias.size()) acc[k] += w.output_bias[static_cast<Index>(k)];
    }
    if (c.shared_d_ff > 0) {
      const std::vector<double> s = expert(w.shared, 0, xt, c.shared_glu, shared_p);
      for (std::size_t k = 0; k < acc.size(); ++k) {
        acc[k] = c.combine_in_float32
                     ? static_cast<double>(static_cast<float>(acc[k]) + static_cast<float>(s[k]))
                     : acc[k] + s[k];
        if (c.shared_combine == SharedCombine::average) acc[k] *= 0.5;
      }
    }
    if (w.expert_output_norm.size())
      acc = rms_norm_f32(acc, w.expert_output_norm, c.router_norm_eps);
    for (Index k = 0; k < x.cols(); ++k) y(t, k) = acc[static_cast<std::size_t>(k)];
  }
  return y;
}

MoeConfig small_config(Index shared) {
  MoeConfig c;
  c.d_model = 12;
  c.d_ff = 7;
  c.num_experts = 5;
  c.top_k = 2;
  c.shared_d_ff = shared;
  return c;
}

template <class Ffn, class G = gating::SoftmaxTopK>
void expect_block_matches_plain(const MoeConfig& c, MoeWeights<double> w, const Plain& p,
                                typename G::Options o = {}, unsigned seed = 7) {
  const SparseMoeBlock<double, G, Ffn> block(c, std::move(w), o);
  std::mt19937 rng(seed);
  for (Index tokens : {1, 7, 31}) {
    const RowMatrix<double> x = random_matrix(rng, tokens, c.d_model, 1.0);
    RowMatrix<double> y(tokens, c.d_model);
    Workspace<double> ws;
    block.forward(x, y, ws);
    const RowMatrix<double> want = plain_forward(block, x, ws.routing(), p, p);
    for (Index i = 0; i < y.size(); ++i) {
      ASSERT_NEAR(y.data()[i], want.data()[i], 1e-12 * (1 + std::abs(want.data()[i])))
          << "tokens " << tokens << " element " << i;
    }
  }
}

MoeWeights<double> random_weights(const MoeConfig& c, bool gated, unsigned seed,
                                  bool biases = false) {
  std::mt19937 rng(seed);
  MoeWeights<double> w = MoeWeights<double>::zeros(c, gated);
  w.router = random_matrix(rng, c.num_experts, c.d_model);
  w.experts.stacked_in() = random_matrix(rng, w.experts.stacked_in().rows(), c.d_model);
  w.experts.stacked_out() = random_matrix(rng, w.experts.stacked_out().rows(), c.d_ff);
  if (biases) {
    w.experts.add_biases();
    w.experts.in_biases() = random_matrix(rng, c.num_experts, w.experts.in_rows(), 0.1);
    w.experts.out_biases() = random_matrix(rng, c.num_experts, c.d_model, 0.1);
  }
  if (c.shared_d_ff > 0) {
    w.shared.stacked_in() = random_matrix(rng, w.shared.stacked_in().rows(), c.d_model);
    w.shared.stacked_out() = random_matrix(rng, c.d_model, c.shared_d_ff);
  }
  return w;
}

TEST(FamilyBlock, GptOssClampedGluWithBiases) {
  MoeConfig c = small_config(0);
  c.expert_glu.limit = 0.4;  // small enough that the clamps bite on this data
  c.expert_glu.up_offset = 1.0;
  c.expert_glu.alpha = 1.702;
  expect_block_matches_plain<SwiGLU>(c, random_weights(c, true, 1, true), Plain{});
}

TEST(FamilyBlock, DeepSeekV4ClampBeforeSiluSharedToo) {
  MoeConfig c = small_config(9);
  c.expert_glu.limit = 0.3;
  c.shared_glu = c.expert_glu;
  expect_block_matches_plain<SwiGLU>(c, random_weights(c, true, 2), Plain{});
}

TEST(FamilyBlock, StepClampAfterSiluRoutedScaleAndSharedLimit) {
  MoeConfig c = small_config(9);
  c.expert_glu.limit = 0.05;
  c.expert_glu.clamp_after_activation = true;
  c.shared_glu.limit = 0.1;
  c.shared_glu.clamp_after_activation = true;
  gating::BiasedScoredTopK::Options o = gating::Step3p7::defaults();
  MoeWeights<double> w = random_weights(c, true, 3);
  w.router_bias = Vector<double>::Constant(c.num_experts, 0.01);
  expect_block_matches_plain<SwiGLU, gating::BiasedScoredTopK>(c, std::move(w), Plain{}, o);
}

TEST(FamilyBlock, Relu2PlainExpertsAndGeluTanhGated) {
  MoeConfig c = small_config(0);
  Plain relu2{false, [](double g) { return g > 0 ? g * g : 0.0; }};
  expect_block_matches_plain<Relu2Mlp>(c, random_weights(c, false, 4), relu2);
  Plain gelu_tanh{true, [](double g) {
                    return 0.5 * g *
                           (1 + std::tanh(0.79788456080286535588 * (g + 0.044715 * g * g * g)));
                  }};
  expect_block_matches_plain<GeGLUTanh>(c, random_weights(c, true, 5), gelu_tanh);
}

TEST(FamilyBlock, Llama4WeightOnTheExpertInput) {
  MoeConfig c = small_config(7);
  c.weight_expert_input = true;
  expect_block_matches_plain<SwiGLU, gating::ScoredTopK>(c, random_weights(c, true, 6), Plain{},
                                                         gating::Llama4::defaults());
}

TEST(FamilyBlock, JetMoeOutputBiasCohereAverageHyV3Float32) {
  MoeConfig c = small_config(0);
  MoeWeights<double> w = random_weights(c, true, 7, true);
  w.output_bias = Vector<double>::Constant(c.d_model, 0.25);
  expect_block_matches_plain<SwiGLU>(c, std::move(w), Plain{});
  MoeConfig avg = small_config(6);
  avg.shared_combine = SharedCombine::average;
  expect_block_matches_plain<SwiGLU>(avg, random_weights(avg, true, 8), Plain{});
  MoeConfig f32 = small_config(6);
  f32.combine_in_float32 = true;
  expect_block_matches_plain<SwiGLU>(f32, random_weights(f32, true, 9), Plain{});
}

TEST(FamilyBlock, Gemma4NormsAroundTheExperts) {
  MoeConfig c = small_config(0);
  MoeWeights<double> w = random_weights(c, true, 10);
  std::mt19937 rng(11);
  w.expert_input_norm = random_matrix(rng, c.d_model, 1, 1.0);
  w.expert_output_norm = random_matrix(rng, c.d_model, 1, 1.0);
  expect_block_matches_plain<SwiGLU>(c, std::move(w), Plain{});
}

// Router extras: the logits the gating sees, written out.
TEST(FamilyBlock, RouterExtrasGiveTheWrittenOutLogitsAndWeights) {
  MoeConfig c = small_config(0);
  c.router_logit_softcap = 0.5;
  c.router_norm_eps = 1e-5;
  std::mt19937 rng(12);
  MoeWeights<double> w = random_weights(c, true, 12);
  w.router_logit_bias = random_matrix(rng, c.num_experts, 1, 0.2);
  w.router_input_scale = random_matrix(rng, c.d_model, 1, 1.0);
  w.expert_weight_scale = random_matrix(rng, c.num_experts, 1, 1.0);
  const RowMatrix<double> router = w.router;
  const Vector<double> bias = w.router_logit_bias, scale = w.router_input_scale,
                       per_expert = w.expert_weight_scale;
  const SparseMoeBlock<double> block(c, std::move(w));
  const RowMatrix<double> x = random_matrix(rng, 7, c.d_model, 1.0);
  RowMatrix<double> y(7, c.d_model);
  Workspace<double> ws;
  block.forward(x, y, ws);
  for (Index t = 0; t < x.rows(); ++t) {
    const double inv = 1 / std::sqrt(x.row(t).squaredNorm() / c.d_model + c.router_norm_eps);
    std::vector<double> z(static_cast<std::size_t>(c.num_experts));
    for (Index e = 0; e < c.num_experts; ++e) {
      double v = 0;
      for (Index k = 0; k < c.d_model; ++k) {
        v += x(t, k) * inv * scale[k] / std::sqrt(double(c.d_model)) * router(e, k);
      }
      v += bias[e];
      z[static_cast<std::size_t>(e)] = 0.5 * std::tanh(v / 0.5);
      EXPECT_NEAR(ws.routing().logits()(t, e), z[static_cast<std::size_t>(e)], 1e-13);
    }
    // softmax top-2, renormalised, then x per_expert_scale
    double m = *std::max_element(z.begin(), z.end()), sum = 0;
    for (Index j = 0; j < 2; ++j)
      sum += std::exp(z[static_cast<std::size_t>(ws.routing().experts()(t, j))] - m);
    for (Index j = 0; j < 2; ++j) {
      const Index e = ws.routing().experts()(t, j);
      EXPECT_NEAR(ws.routing().weights()(t, j),
                  std::exp(z[static_cast<std::size_t>(e)] - m) / sum * per_expert[e], 1e-12);
    }
  }
}

TEST(FamilyBlock, BadNumbersAreTypedErrors) {
  MoeConfig c = small_config(0);
  c.expert_glu.limit = -1;
  EXPECT_THROW(c.validate(), config_error);
  try {
    c.validate();
  } catch (const config_error& e) {
    EXPECT_STREQ(e.what(), "moe: expert_glu.limit = -1 must be positive");
  }
  MoeConfig a = small_config(0);
  a.expert_glu.alpha = 1.702;
  try {
    SparseMoeBlock<double, gating::SoftmaxTopK, GeGLUTanh> b(a, random_weights(a, true, 1));
    ADD_FAILURE() << "alpha on gelu experts was accepted";
  } catch (const config_error& e) {
    EXPECT_STREQ(e.what(), "moe: glu alpha = 1.702 needs Silu experts (gpt-oss)");
  }
  MoeConfig p = small_config(0);
  p.expert_glu.limit = 1;
  try {
    SparseMoeBlock<double, gating::SoftmaxTopK, ReluMlp> b(p, random_weights(p, false, 1));
    ADD_FAILURE() << "a clamp on plain experts was accepted";
  } catch (const config_error& e) {
    EXPECT_STREQ(e.what(), "moe: expert_glu / shared_glu clamps need a gated Ffn kind");
  }
  // Expert biases on packed storage (no bias term in its fused epilogue) are refused, not
  // dropped; compact storage keeps them (tests/compact_bias_test.cpp).
  MoeConfig q = small_config(0);
  MoeWeights<float> biased = MoeWeights<float>::zeros(q);
  biased.experts.add_biases();
  try {
    SparseMoeBlock<float, gating::SoftmaxTopK, SwiGLU, PackedExperts> b(q, biased);
    ADD_FAILURE() << "expert biases on packed experts were accepted";
  } catch (const config_error& e) {
    EXPECT_STREQ(e.what(),
                 "moe: packed experts do not apply expert biases (gpt-oss, JetMoE): use "
                 "NativeExperts or CompactExperts");
  }
}

}  // namespace
}  // namespace moe
