// Scalar float64 reference of every MoE routing family and loss, for tests only.
//
// Plain loops over std::vector<double> (row-major), deliberately slow and obvious. It depends only
// on the C++17 standard library, never on Eigen or on the moe library, so it stays independent of
// the code it checks.
//
// Sources of the formulas (cited in the comments below as):
//   [FMT x.y]  tests/data/reference/FORMAT.md, section x.y (what Hugging Face transformers
//   computes); [CHK]      check_golden.py, the generator of the golden files (numpy statement of the same
//   formulas); [ROUT]     docs/families.md; [Shazeer]  Shazeer et al. 2017,
//   "Outrageously Large Neural Networks" (noisy top-k, eqs. 3-5, 6-10); [Zhou]     Zhou et al.
//   2022, "Mixture-of-Experts with Expert Choice Routing"; [DSV3]     DeepSeek-V3 technical report
//   (sequence-wise balance loss, auxiliary-loss-free bias).
//
// Layouts (PyTorch nn.Linear convention, y = x W^T, [FMT 2]):
//   x [T x D]; router, router_noise [E x D]; expert gate (= wi) and up [F x D]; down (= wo) [D x
//   F]; shared_gate_proj, shared_up [Fs x D]; shared_down [D x Fs]; shared_gate_weight [D].
//
// Conventions (shared with the library):
//   * top-k slots are in descending weight order; equal weights (and equal selection scores) go to
//     the LOWER expert index. Equal group scores go to the lower group index; equal expert-choice
//     token scores go to the lower token index.
//   * token-major slots: top-k families have slots = k (slot j of token t is t*k+j); expert choice
//     has slots = E, slot j of token t is expert j (topk_idx = j if expert j chose t, else -1).
//   * kept[t*slots+j] = 1 if the slot is executed (contributes to the output), 0 if not: dropped by
//     capacity (capacity_topk) or not chosen (expert_choice).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace moe::ref {

enum class Scoring { softmax, sigmoid };
enum class GroupScore { max, top2_sum };
// Gated FFN: down(act(gate x) * (up x)); plain FFN (Switch): wo(act(wi x)).
enum class Activation { silu, gelu, gelu_tanh, relu };
enum class Family { topk, group_limited, capacity_topk, noisy_topk, expert_choice };

struct Config {
  int d_model = 0, d_ff = 0, num_experts = 0, top_k = 0;
  Family family = Family::topk;
  // Renormalise the k weights (Mixtral/Qwen3 true; Qwen2/OLMoE false) [FMT 5.1-5.3].
  bool norm_topk_prob = true;
  Scoring scoring = Scoring::softmax;
  // Group-limited selection [FMT 5.4], [ROUT "Scoring and selection"].
  int n_group = 1, topk_group = 1;
  GroupScore group_score = GroupScore::top2_sum;
  double routed_scaling_factor = 1.0;
  // Older HF DeepSeek-V3 quirk: excluded groups masked with 0.0 instead of -inf [ROUT], [FMT 5.4].
  bool hf_zero_group_mask = false;
  // Capacity (Switch k=1 / GShard k=2): absolute count per expert; priority by position; with k > 1
  // all first choices before any second choice [FMT 5.5], [ROUT "Capacity"]. -1: no limit.
  long capacity = -1;
  // GShard: renormalise the kept weights after dropping (else the weights are final before
  // dropping).
  bool renormalize_after_drop = false;
  // Expert choice: c = min(T, ceil(capacity_factor * T / E)) [Zhou], [ROUT "Capacity"].
  double capacity_factor = 1.0;
  bool gated = true;
  Activation activation = Activation::silu;
  // Shared expert (same `gated` and `activation` as the routed experts): Qwen2-MoE adds
  // sigmoid(shared_gate_weight . x) * shared(x) (shared_gate = true); DeepSeek adds shared(x).
  int shared_d_ff = 0;
  bool shared_gate = false;
};

struct Weights {
  std::vector<double> router;        // [E x D]
  std::vector<double> router_bias;   // [E] or empty: selection-only bias (topk, group_limited)
  std::vector<double> router_noise;  // [E x D]: W_noise of noisy top-k
  // Per expert. For the plain (non-gated) MLP gate = wi [F x D], down = wo [D x F], up unused.
  std::vector<std::vector<double>> gate, up, down;
  std::vector<double> shared_gate_proj, shared_up, shared_down;  // [Fs x D], [Fs x D], [D x Fs]
  std::vector<double> shared_gate_weight;                        // [D]
};

struct Result {
  std::vector<double> logits;  // [T x E] clean router logits z = x W_r^T
  // [T x E]: softmax(z) or sigmoid(z) (unbiased); expert choice: S = softmax(z);
  // noisy top-k: the gate vector G(x) = softmax(KeepTopK(H, k)), zero outside the k kept experts.
  std::vector<double> scores;
  std::vector<int> topk_idx;        // [T x slots]
  std::vector<double> topk_weight;  // [T x slots]
  std::vector<int> kept;            // [T x slots] 1 executed, 0 not (dropped / not chosen)
  int slots = 0;
  std::vector<double> output;  // [T x D]
};

// ------------------------------------------------------------------------------------------------
// Small scalar helpers.
namespace detail {

[[noreturn]] inline void fail(const std::string& what) {
  throw std::invalid_argument("moe::ref: " + what);
}

inline void expect_size(const std::vector<double>& v, std::size_t n, const std::string& name) {
  if (v.size() != n) {
    fail(name + " has " + std::to_string(v.size()) + " elements, expected " + std::to_string(n));
  }
}

inline std::size_t idx2(int row, int cols, int col) {
  return static_cast<std::size_t>(row) * static_cast<std::size_t>(cols) +
         static_cast<std::size_t>(col);
}

inline std::size_t sz(int n) { return static_cast<std::size_t>(n); }

// 1 / (1 + exp(-z)), as [CHK] sigmoid.
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// log(1 + exp(z)) without overflow. (PyTorch F.softplus returns z itself for z > 20; that differs
// from the exact value by less than 2.1e-9.)
inline double softplus(double z) { return std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }

// Standard normal CDF Phi(z) = 0.5 * erfc(-z / sqrt(2)).
inline double normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

inline double activate(Activation a, double z) {
  switch (a) {
    case Activation::silu:  // z * sigmoid(z), as [CHK] silu = z / (1 + exp(-z))
      return z / (1.0 + std::exp(-z));
    case Activation::gelu:  // exact GELU: 0.5 z (1 + erf(z / sqrt 2))
      return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::gelu_tanh: {  // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
      const double pi = 3.14159265358979323846;
      return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (z + 0.044715 * z * z * z)));
    }
    case Activation::relu:
      return z > 0.0 ? z : 0.0;
  }
  return 0.0;
}

// softmax of one row: exp(z_e - max z) / sum_j exp(z_j - max z), as [CHK] softmax.
inline std::vector<double> softmax(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : z) m = std::max(m, v);
  std::vector<double> p(z.size());
  double s = 0.0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    p[i] = std::exp(z[i] - m);
    s += p[i];
  }
  for (double& v : p) v /= s;
  return p;
}

// log(sum_e exp(z_e)), computed as max + log(sum exp(z - max)).
inline double logsumexp(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : z) m = std::max(m, v);
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// Indices of the k largest values, largest first; equal values: lower index first. Selection by
// repeated scans with a strict '>' so that the first (lowest) index of a maximum wins.
inline std::vector<int> topk_desc(const std::vector<double>& v, int k) {
  const int n = static_cast<int>(v.size());
  if (k < 0 || k > n) fail("topk_desc: k out of range");
  std::vector<char> taken(v.size(), 0);
  std::vector<int> out;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      if (taken[sz(i)]) continue;
      if (best < 0 || v[sz(i)] > v[sz(best)]) best = i;
    }
    taken[sz(best)] = 1;
    out.push_back(best);
  }
  return out;
}

// One row of y = x W^T: y[o] = sum_i W[o, i] * x[i], W is [out x in].
inline std::vector<double> linear(const std::vector<double>& W, const double* x, int in, int out) {
  std::vector<double> y(sz(out), 0.0);
  for (int o = 0; o < out; ++o) {
    double s = 0.0;
    for (int i = 0; i < in; ++i) s += W[idx2(o, in, i)] * x[i];
    y[sz(o)] = s;
  }
  return y;
}

// One FFN row. Gated: down (act(gate x) * (up x)); plain: down (act(gate x)) with gate = wi,
// down = wo. [FMT 5] expert_e(x) = down_e(silu(gate_e x) * (up_e x)); Switch wo(relu(wi x))
// [FMT 5.5].
inline std::vector<double> ffn(bool gated, Activation act, const std::vector<double>& gate,
                               const std::vector<double>& up, const std::vector<double>& down,
                               const double* x, int D, int F) {
  std::vector<double> h = linear(gate, x, D, F);
  std::vector<double> a(sz(F));
  if (gated) {
    std::vector<double> u = linear(up, x, D, F);
    for (int f = 0; f < F; ++f) a[sz(f)] = activate(act, h[sz(f)]) * u[sz(f)];
  } else {
    for (int f = 0; f < F; ++f) a[sz(f)] = activate(act, h[sz(f)]);
  }
  return linear(down, a.data(), F, D);
}

inline void check_dims(const Config& c, int T) {
  if (c.d_model <= 0 || c.d_ff <= 0 || c.num_experts <= 0) fail("dimensions must be positive");
  if (T < 0) fail("T must be >= 0");
}

inline void check_weights(const Config& c, const Weights& w) {
  const int D = c.d_model, F = c.d_ff, E = c.num_experts;
  expect_size(w.router, sz(E) * sz(D), "router");
  if (w.gate.size() != sz(E) || w.down.size() != sz(E) || (c.gated && w.up.size() != sz(E))) {
    fail("need one gate/up/down matrix per expert");
  }
  for (int e = 0; e < E; ++e) {
    expect_size(w.gate[sz(e)], sz(F) * sz(D), "gate[" + std::to_string(e) + "]");
    if (c.gated) expect_size(w.up[sz(e)], sz(F) * sz(D), "up[" + std::to_string(e) + "]");
    expect_size(w.down[sz(e)], sz(D) * sz(F), "down[" + std::to_string(e) + "]");
  }
  if (!w.router_bias.empty()) {
    expect_size(w.router_bias, sz(E), "router_bias");
    if (c.family != Family::topk && c.family != Family::group_limited) {
      fail("router_bias is only used by the topk and group_limited families");
    }
  }
  if (c.shared_d_ff < 0) fail("shared_d_ff must be >= 0");
  if (c.shared_d_ff > 0) {
    const int Fs = c.shared_d_ff;
    expect_size(w.shared_gate_proj, sz(Fs) * sz(D), "shared_gate_proj");
    if (c.gated) expect_size(w.shared_up, sz(Fs) * sz(D), "shared_up");
    expect_size(w.shared_down, sz(D) * sz(Fs), "shared_down");
    if (c.shared_gate) expect_size(w.shared_gate_weight, sz(D), "shared_gate_weight");
  } else if (c.shared_gate) {
    fail("shared_gate needs shared_d_ff > 0");
  }
}

// Order the selected slots by final weight, descending; equal weights: lower expert index first.
// (Stable insertion sort on (weight desc, index asc).)
inline void sort_slots(std::vector<int>& idx, std::vector<double>& w) {
  for (std::size_t i = 1; i < idx.size(); ++i) {
    for (std::size_t j = i; j > 0; --j) {
      const bool before = w[j] > w[j - 1] || (w[j] == w[j - 1] && idx[j] < idx[j - 1]);
      if (!before) break;
      std::swap(w[j], w[j - 1]);
      std::swap(idx[j], idx[j - 1]);
    }
  }
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Router pieces, also useful on their own (e.g. for the Shazeer load loss).

// z = x W^T for all T rows: [T x E].
inline std::vector<double> router_logits(const std::vector<double>& W, const std::vector<double>& x,
                                         int T, int E, int D) {
  detail::expect_size(W, detail::sz(E) * detail::sz(D), "router weight");
  detail::expect_size(x, detail::sz(T) * detail::sz(D), "x");
  std::vector<double> z(detail::sz(T) * detail::sz(E));
  for (int t = 0; t < T; ++t) {
    std::vector<double> row = detail::linear(W, &x[detail::idx2(t, D, 0)], D, E);
    for (int e = 0; e < E; ++e) z[detail::idx2(t, E, e)] = row[detail::sz(e)];
  }
  return z;
}

// Noise standard deviation of noisy top-k [Shazeer eq. 4]: softplus(x W_noise^T), [T x E].
inline std::vector<double> noise_stddev(const Config& c, const Weights& w,
                                        const std::vector<double>& x, int T) {
  std::vector<double> s = router_logits(w.router_noise, x, T, c.num_experts, c.d_model);
  for (double& v : s) v = detail::softplus(v);
  return s;
}

// Noisy logits H = x W_g^T + noise * softplus(x W_noise^T) [Shazeer eq. 4], [T x E]; noise is
// [T x E] standard normal draws; nullptr means no noise (H = clean logits).
inline std::vector<double> noisy_logits(const Config& c, const Weights& w,
                                        const std::vector<double>& x, int T,
                                        const std::vector<double>* noise) {
  std::vector<double> H = router_logits(w.router, x, T, c.num_experts, c.d_model);
  if (noise == nullptr) return H;
  detail::expect_size(*noise, H.size(), "noise");
  const std::vector<double> sd = noise_stddev(c, w, x, T);
  for (std::size_t i = 0; i < H.size(); ++i) H[i] += (*noise)[i] * sd[i];
  return H;
}

// Expert capacity of expert choice [Zhou]: c = ceil(capacity_factor * T / E), evaluated literally
// in double as (cf * T) / E, then clamped to [0, T].
inline int expert_choice_capacity(double capacity_factor, int T, int E) {
  if (!(capacity_factor >= 0.0)) detail::fail("capacity_factor must be >= 0");
  const double c = std::ceil(capacity_factor * static_cast<double>(T) / static_cast<double>(E));
  if (c >= static_cast<double>(T)) return T;
  return static_cast<int>(c);
}

// ------------------------------------------------------------------------------------------------
// The forward pass.

inline Result forward(const Config& c, const Weights& w, const std::vector<double>& x, int T,
                      const std::vector<double>* noise = nullptr) {
  detail::check_dims(c, T);
  detail::check_weights(c, w);
  const int D = c.d_model, F = c.d_ff, E = c.num_experts, k = c.top_k;
  detail::expect_size(x, detail::sz(T) * detail::sz(D), "x");
  const bool topk_like = c.family != Family::expert_choice;
  if (topk_like && (k < 1 || k > E)) detail::fail("top_k must be in [1, num_experts]");
  if ((c.family == Family::noisy_topk || c.family == Family::expert_choice) &&
      c.scoring != Scoring::softmax) {
    detail::fail("noisy_topk and expert_choice use softmax scoring");
  }
  if (noise != nullptr && c.family != Family::noisy_topk) {
    detail::fail("noise is only used by noisy_topk");
  }
  if (c.family == Family::noisy_topk && noise != nullptr) {
    detail::expect_size(w.router_noise, detail::sz(E) * detail::sz(D), "router_noise");
  }
  if (c.family == Family::group_limited) {
    if (c.n_group < 1 || E % c.n_group != 0) detail::fail("n_group must divide num_experts");
    if (c.topk_group < 1 || c.topk_group > c.n_group) detail::fail("topk_group out of range");
    if (c.group_score == GroupScore::top2_sum && E / c.n_group < 2) {
      detail::fail("top2_sum group score needs at least 2 experts per group");
    }
    if (!c.hf_zero_group_mask && k > c.topk_group * (E / c.n_group)) {
      detail::fail("top_k exceeds the experts of the kept groups");
    }
  }

  Result r;
  r.logits = router_logits(w.router, x, T, E, D);
  r.scores.assign(detail::sz(T) * detail::sz(E), 0.0);
  r.output.assign(detail::sz(T) * detail::sz(D), 0.0);

  // Unbiased scores: softmax(z) or sigmoid(z) per token [FMT 5.1, 5.4].
  for (int t = 0; t < T; ++t) {
    std::vector<double> z(
        r.logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t, E, 0)),
        r.logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t + 1, E, 0)));
    std::vector<double> s(detail::sz(E));
    if (c.scoring == Scoring::softmax) {
      s = detail::softmax(z);
    } else {
      for (int e = 0; e < E; ++e) s[detail::sz(e)] = detail::sigmoid(z[detail::sz(e)]);
    }
    for (int e = 0; e < E; ++e) r.scores[detail::idx2(t, E, e)] = s[detail::sz(e)];
  }

  if (c.family == Family::expert_choice) {
    // [Zhou], [ROUT "Capacity"]: S = softmax(z) [T x E]; each expert e takes its top-c tokens by
    // S[:, e] (equal scores: lower token index); output_t = sum over the experts that chose t, in
    // expert order, of S[t, e] * FFN_e(x_t).
    r.slots = E;
    r.topk_idx.assign(detail::sz(T) * detail::sz(E), -1);
    r.topk_weight.assign(detail::sz(T) * detail::sz(E), 0.0);
    r.kept.assign(detail::sz(T) * detail::sz(E), 0);
    const int cap = expert_choice_capacity(c.capacity_factor, T, E);
    for (int e = 0; e < E; ++e) {
      std::vector<double> column(detail::sz(T));
      for (int t = 0; t < T; ++t) column[detail::sz(t)] = r.scores[detail::idx2(t, E, e)];
      for (int t : detail::topk_desc(column, cap)) {
        r.topk_idx[detail::idx2(t, E, e)] = e;
        r.topk_weight[detail::idx2(t, E, e)] = r.scores[detail::idx2(t, E, e)];
        r.kept[detail::idx2(t, E, e)] = 1;
      }
    }
  } else {
    r.slots = k;
    r.topk_idx.assign(detail::sz(T) * detail::sz(k), -1);
    r.topk_weight.assign(detail::sz(T) * detail::sz(k), 0.0);
    r.kept.assign(detail::sz(T) * detail::sz(k), 1);
    std::vector<double> H;
    if (c.family == Family::noisy_topk) {
      H = noisy_logits(c, w, x, T, noise);
      // scores become the gate vector G(x), filled below.
      std::fill(r.scores.begin(), r.scores.end(), 0.0);
    }
    for (int t = 0; t < T; ++t) {
      std::vector<double> s(detail::sz(E));
      for (int e = 0; e < E; ++e) s[detail::sz(e)] = r.scores[detail::idx2(t, E, e)];
      std::vector<int> idx;
      std::vector<double> wt(detail::sz(k));

      if (c.family == Family::noisy_topk) {
        // [Shazeer eqs. 3-5]: G(x) = softmax(KeepTopK(H(x), k)): the k largest H keep their
        // value, the others are -inf, so the weights are the softmax over the k kept values of H.
        std::vector<double> h(detail::sz(E));
        for (int e = 0; e < E; ++e) h[detail::sz(e)] = H[detail::idx2(t, E, e)];
        idx = detail::topk_desc(h, k);
        std::vector<double> kept_h(detail::sz(k));
        for (int j = 0; j < k; ++j) kept_h[detail::sz(j)] = h[detail::sz(idx[detail::sz(j)])];
        wt = detail::softmax(kept_h);
        for (int j = 0; j < k; ++j) {
          r.scores[detail::idx2(t, E, idx[detail::sz(j)])] = wt[detail::sz(j)];
        }
      } else if (c.family == Family::group_limited) {
        // [FMT 5.4], [CHK deepseek_v3]: choice c = s + bias (selection only); group g = experts
        // g*E/G .. (g+1)*E/G - 1; group score = max, or the sum of the two largest c in the group;
        // keep the topk_group best groups (equal: lower group index); other experts get -inf (or
        // 0.0 with the HF zero-mask quirk); idx = top-k of the masked c; w = s[idx] (unbiased).
        std::vector<double> choice = s;
        if (!w.router_bias.empty()) {
          for (int e = 0; e < E; ++e) choice[detail::sz(e)] += w.router_bias[detail::sz(e)];
        }
        const int G = c.n_group, per = E / c.n_group;
        std::vector<double> gscore(detail::sz(G));
        for (int g = 0; g < G; ++g) {
          std::vector<double> members(choice.begin() + g * per, choice.begin() + (g + 1) * per);
          std::vector<int> order = detail::topk_desc(members, per);
          if (c.group_score == GroupScore::max) {
            gscore[detail::sz(g)] = members[detail::sz(order[0])];
          } else {
            gscore[detail::sz(g)] = members[detail::sz(order[0])] + members[detail::sz(order[1])];
          }
        }
        std::vector<char> group_kept(detail::sz(G), 0);
        for (int g : detail::topk_desc(gscore, c.topk_group)) group_kept[detail::sz(g)] = 1;
        const double excluded =
            c.hf_zero_group_mask ? 0.0 : -std::numeric_limits<double>::infinity();
        std::vector<double> masked = choice;
        for (int e = 0; e < E; ++e) {
          if (!group_kept[detail::sz(e / per)]) masked[detail::sz(e)] = excluded;
        }
        idx = detail::topk_desc(masked, k);
        double sum = 0.0;
        for (int j = 0; j < k; ++j) {
          wt[detail::sz(j)] = s[detail::sz(idx[detail::sz(j)])];
          sum += wt[detail::sz(j)];
        }
        // if norm_topk_prob: w / (sum w + 1e-20); then * routed_scaling_factor [FMT 5.4 step 5].
        for (int j = 0; j < k; ++j) {
          if (c.norm_topk_prob) wt[detail::sz(j)] = wt[detail::sz(j)] / (sum + 1e-20);
          wt[detail::sz(j)] *= c.routed_scaling_factor;
        }
      } else {
        // topk and capacity_topk [FMT 5.1-5.3, 5.5], [CHK]: top-k of s (+ bias, selection only,
        // topk family), w = s[idx]; if norm_topk_prob: w / sum w (no epsilon, as HF Mixtral and
        // Qwen); then * routed_scaling_factor (1 for all HF top-k families).
        std::vector<double> choice = s;
        if (!w.router_bias.empty()) {
          for (int e = 0; e < E; ++e) choice[detail::sz(e)] += w.router_bias[detail::sz(e)];
        }
        idx = detail::topk_desc(choice, k);
        double sum = 0.0;
        for (int j = 0; j < k; ++j) {
          wt[detail::sz(j)] = s[detail::sz(idx[detail::sz(j)])];
          sum += wt[detail::sz(j)];
        }
        for (int j = 0; j < k; ++j) {
          if (c.norm_topk_prob) wt[detail::sz(j)] = wt[detail::sz(j)] / sum;
          wt[detail::sz(j)] *= c.routed_scaling_factor;
        }
      }
      detail::sort_slots(idx, wt);
      for (int j = 0; j < k; ++j) {
        r.topk_idx[detail::idx2(t, k, j)] = idx[detail::sz(j)];
        r.topk_weight[detail::idx2(t, k, j)] = wt[detail::sz(j)];
      }
    }

    if (c.family == Family::capacity_topk && c.capacity >= 0) {
      // [FMT 5.5 step 3], [ROUT "Capacity"]: walk slot j = 0 (all first choices), then j = 1, ...;
      // within a slot the tokens in order t = 0..T-1; an assignment whose expert already holds
      // `capacity` assignments is dropped (kept = 0, idx and weight stay).
      std::vector<long> load(detail::sz(E), 0);
      for (int j = 0; j < k; ++j) {
        for (int t = 0; t < T; ++t) {
          const int e = r.topk_idx[detail::idx2(t, k, j)];
          if (load[detail::sz(e)] < c.capacity) {
            ++load[detail::sz(e)];
          } else {
            r.kept[detail::idx2(t, k, j)] = 0;
          }
        }
      }
      if (c.renormalize_after_drop) {
        // GShard: the kept weights of a token divided by their sum (tokens with nothing kept keep
        // their weights, which contribute nothing anyway); dropped slots keep their weight.
        for (int t = 0; t < T; ++t) {
          double sum = 0.0;
          for (int j = 0; j < k; ++j) {
            if (r.kept[detail::idx2(t, k, j)]) sum += r.topk_weight[detail::idx2(t, k, j)];
          }
          if (sum == 0.0) continue;
          for (int j = 0; j < k; ++j) {
            if (r.kept[detail::idx2(t, k, j)]) {
              r.topk_weight[detail::idx2(t, k, j)] =
                  r.topk_weight[detail::idx2(t, k, j)] / sum * c.routed_scaling_factor;
            }
          }
        }
      }
    }
  }

  // Expert outputs: output_t = sum over executed slots j (slot order) of w_j * FFN_{idx_j}(x_t);
  // a token with no executed slot keeps a zero row [FMT 5.5 step 5].
  const int S = r.slots;
  for (int t = 0; t < T; ++t) {
    const double* xt = &x[detail::idx2(t, D, 0)];
    for (int j = 0; j < S; ++j) {
      if (!r.kept[detail::idx2(t, S, j)]) continue;
      const int e = r.topk_idx[detail::idx2(t, S, j)];
      const double wj = r.topk_weight[detail::idx2(t, S, j)];
      static const std::vector<double> none;
      const std::vector<double>& up = c.gated ? w.up[detail::sz(e)] : none;
      std::vector<double> y = detail::ffn(c.gated, c.activation, w.gate[detail::sz(e)], up,
                                          w.down[detail::sz(e)], xt, D, F);
      for (int d = 0; d < D; ++d) r.output[detail::idx2(t, D, d)] += wj * y[detail::sz(d)];
    }
    if (c.shared_d_ff > 0) {
      // [FMT 5.3] Qwen2-MoE: + sigmoid(x . shared_gate) * shared(x); [FMT 5.4] DeepSeek: +
      // shared(x).
      std::vector<double> y = detail::ffn(c.gated, c.activation, w.shared_gate_proj, w.shared_up,
                                          w.shared_down, xt, D, c.shared_d_ff);
      double g = 1.0;
      if (c.shared_gate) {
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += w.shared_gate_weight[detail::sz(d)] * xt[d];
        g = detail::sigmoid(dot);
      }
      for (int d = 0; d < D; ++d) r.output[detail::idx2(t, D, d)] += g * y[detail::sz(d)];
    }
  }
  return r;
}

// Executed assignments per expert (the "load" of the auxiliary-loss-free update), [E].
inline std::vector<double> expert_counts(const Result& r, int E) {
  std::vector<double> n(detail::sz(E), 0.0);
  for (std::size_t i = 0; i < r.topk_idx.size(); ++i) {
    if (r.kept[i] && r.topk_idx[i] >= 0) n[detail::sz(r.topk_idx[i])] += 1.0;
  }
  return n;
}

// ------------------------------------------------------------------------------------------------
// Losses. All return the raw value, before any coefficient (alpha, w_importance, ...).

// HF Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE load_balancing_loss_func [FMT 6.1], [CHK mixtral_aux]:
//   p = softmax(z), topk = top-k of p (equal: lower index), m_t = mask (1 without), N = sum_t m_t,
//   count_e = sum_t m_t * #{j : topk_tj = e}, P_e = sum_t m_t p_te,
//   aux = E * sum_e (count_e / N) * (P_e / N).
// Uniform probabilities give k. Several layers: HF concatenates all layers' rows (and repeats the
// mask per layer) before computing; pass the concatenated rows. logits [T x E], token_mask [T].
inline double hf_load_balancing_loss(const std::vector<double>& logits, int T, int E, int k,
                                     const std::vector<double>* token_mask = nullptr) {
  detail::expect_size(logits, detail::sz(T) * detail::sz(E), "logits");
  if (token_mask != nullptr) detail::expect_size(*token_mask, detail::sz(T), "token_mask");
  std::vector<double> count(detail::sz(E), 0.0), P(detail::sz(E), 0.0);
  double N = 0.0;
  for (int t = 0; t < T; ++t) {
    const double m = token_mask != nullptr ? (*token_mask)[detail::sz(t)] : 1.0;
    std::vector<double> z(logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t, E, 0)),
                          logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t + 1, E, 0)));
    std::vector<double> p = detail::softmax(z);
    for (int e : detail::topk_desc(p, k)) count[detail::sz(e)] += m;
    for (int e = 0; e < E; ++e) P[detail::sz(e)] += m * p[detail::sz(e)];
    N += m;
  }
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += (count[detail::sz(e)] / N) * (P[detail::sz(e)] / N);
  return static_cast<double>(E) * sum;
}

// MegaBlocks normalisation [ROUT "Losses"]: f_e = count_e / (N k), P_e = mean_t p_te,
//   L = E * sum_e f_e P_e = hf_load_balancing_loss / k. Uniform probabilities give 1.
inline double megablocks_load_balancing_loss(const std::vector<double>& logits, int T, int E, int k,
                                             const std::vector<double>* token_mask = nullptr) {
  detail::expect_size(logits, detail::sz(T) * detail::sz(E), "logits");
  if (token_mask != nullptr) detail::expect_size(*token_mask, detail::sz(T), "token_mask");
  std::vector<double> count(detail::sz(E), 0.0), P(detail::sz(E), 0.0);
  double N = 0.0;
  for (int t = 0; t < T; ++t) {
    const double m = token_mask != nullptr ? (*token_mask)[detail::sz(t)] : 1.0;
    std::vector<double> z(logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t, E, 0)),
                          logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t + 1, E, 0)));
    std::vector<double> p = detail::softmax(z);
    for (int e : detail::topk_desc(p, k)) count[detail::sz(e)] += m;
    for (int e = 0; e < E; ++e) P[detail::sz(e)] += m * p[detail::sz(e)];
    N += m;
  }
  double sum = 0.0;
  for (int e = 0; e < E; ++e) {
    sum += (count[detail::sz(e)] / (N * static_cast<double>(k))) * (P[detail::sz(e)] / N);
  }
  return static_cast<double>(E) * sum;
}

// HF Switch load_balancing_loss_func [FMT 6.2], [CHK switch_aux]. Groups are batch rows:
//   p = softmax(z) per token, onehot[b,s,e] = (expert_index[b,s] == e),
//   aux = E^2 * mean_{b,e}( mean_s onehot[b,s,e] * mean_s p[b,s,e] ).
// HF's function receives the probabilities; this one takes the logits z [B*S x E] (batch-major) and
// applies the softmax. expert_index [B*S]: the chosen expert e* (aux_loss), or 0 for dropped tokens
// (aux_loss_postcap). Uniform probabilities give 1.
inline double switch_load_balancing_loss(const std::vector<double>& logits,
                                         const std::vector<int>& expert_index, int B, int S,
                                         int E) {
  const int T = B * S;
  detail::expect_size(logits, detail::sz(T) * detail::sz(E), "logits");
  if (expert_index.size() != detail::sz(T)) detail::fail("expert_index must have B*S entries");
  double total = 0.0;
  for (int b = 0; b < B; ++b) {
    std::vector<double> frac(detail::sz(E), 0.0), prob(detail::sz(E), 0.0);
    for (int s = 0; s < S; ++s) {
      const int t = b * S + s;
      std::vector<double> z(
          logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t, E, 0)),
          logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t + 1, E, 0)));
      std::vector<double> p = detail::softmax(z);
      const int chosen = expert_index[detail::sz(t)];
      if (chosen < 0 || chosen >= E) detail::fail("expert_index out of range");
      frac[detail::sz(chosen)] += 1.0;
      for (int e = 0; e < E; ++e) prob[detail::sz(e)] += p[detail::sz(e)];
    }
    for (int e = 0; e < E; ++e) {
      total += (frac[detail::sz(e)] / S) * (prob[detail::sz(e)] / S);
    }
  }
  const double mean = total / (static_cast<double>(B) * static_cast<double>(E));
  return mean * static_cast<double>(E) * static_cast<double>(E);
}

// Router z-loss (ST-MoE; HF Switch router_z_loss_func) [FMT 6.2], [ROUT "Losses"]:
//   L_z = (1/T) sum_t (logsumexp_e z_te)^2.
inline double router_z_loss(const std::vector<double>& logits, int T, int E) {
  detail::expect_size(logits, detail::sz(T) * detail::sz(E), "logits");
  double sum = 0.0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> z(logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t, E, 0)),
                          logits.begin() + static_cast<std::ptrdiff_t>(detail::idx2(t + 1, E, 0)));
    const double l = detail::logsumexp(z);
    sum += l * l;
  }
  return sum / T;
}

// DeepSeek-V3 sequence-wise balance loss [DSV3 eqs. 17-20], [ROUT "Losses"], without alpha:
//   per sequence b of S tokens: s_te = sigmoid(z_te) (unbiased affinities),
//   f_i = E / (k S) * count_i (count over all k slots of the sequence's tokens),
//   s'_ti = s_ti / sum_j s_tj, P_i = (1/S) sum_t s'_ti, L_b = sum_i f_i P_i;
//   returns the mean of L_b over the B sequences (multiply by alpha, 1e-4 in DeepSeek-V3).
// logits [B*S x E] batch-major, topk_idx [B*S x k] (the routing's selection). Uniform gives 1.
inline double deepseek_seq_balance_loss(const std::vector<double>& logits,
                                        const std::vector<int>& topk_idx, int B, int S, int E,
                                        int k) {
  const int T = B * S;
  detail::expect_size(logits, detail::sz(T) * detail::sz(E), "logits");
  if (topk_idx.size() != detail::sz(T) * detail::sz(k)) detail::fail("topk_idx must be B*S*k");
  double total = 0.0;
  for (int b = 0; b < B; ++b) {
    std::vector<double> count(detail::sz(E), 0.0), P(detail::sz(E), 0.0);
    for (int s = 0; s < S; ++s) {
      const int t = b * S + s;
      for (int j = 0; j < k; ++j) {
        const int e = topk_idx[detail::idx2(t, k, j)];
        if (e < 0 || e >= E) detail::fail("topk_idx out of range");
        count[detail::sz(e)] += 1.0;
      }
      std::vector<double> sig(detail::sz(E));
      double sum = 0.0;
      for (int e = 0; e < E; ++e) {
        sig[detail::sz(e)] = detail::sigmoid(logits[detail::idx2(t, E, e)]);
        sum += sig[detail::sz(e)];
      }
      for (int e = 0; e < E; ++e) P[detail::sz(e)] += sig[detail::sz(e)] / sum;
    }
    double L = 0.0;
    for (int e = 0; e < E; ++e) {
      const double f = static_cast<double>(E) / (static_cast<double>(k) * S) * count[detail::sz(e)];
      L += f * (P[detail::sz(e)] / S);
    }
    total += L;
  }
  return total / B;
}

// Squared coefficient of variation, CV^2 = var / mean^2, with the population variance
// (1/n) sum (v - mean)^2 and no epsilon. (tensor2tensor's cv_squared adds 1e-10 to the
// denominator; PyTorch ports using Tensor.var() use the sample variance 1/(n-1).)
inline double cv_squared(const std::vector<double>& v) {
  if (v.empty()) detail::fail("cv_squared of an empty vector");
  double mean = 0.0;
  for (double a : v) mean += a;
  mean /= static_cast<double>(v.size());
  double var = 0.0;
  for (double a : v) var += (a - mean) * (a - mean);
  var /= static_cast<double>(v.size());
  return var / (mean * mean);
}

// Shazeer importance loss [Shazeer eqs. 6-7], without w_importance:
//   Importance_e = sum_t G(x_t)_e, L = CV(Importance)^2. gates [T x E] (Result::scores of
//   noisy_topk).
inline double shazeer_importance_loss(const std::vector<double>& gates, int T, int E) {
  detail::expect_size(gates, detail::sz(T) * detail::sz(E), "gates");
  std::vector<double> importance(detail::sz(E), 0.0);
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) importance[detail::sz(e)] += gates[detail::idx2(t, E, e)];
  }
  return cv_squared(importance);
}

// Shazeer smooth load loss [Shazeer appendix A, eqs. 8-10], without w_load:
//   P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i), where clean = x W_g^T,
//   H the noisy logits, noise_std = softplus(x W_noise^T), kth_excluding(H, k, i) the k-th largest
//   component of H with component i left out; Load_i = sum_t P(x_t, i); L = CV(Load)^2.
// All inputs [T x E]; needs k < E.
inline double shazeer_load_loss(const std::vector<double>& clean_logits,
                                const std::vector<double>& noisy_logits_,
                                const std::vector<double>& noise_std, int T, int E, int k) {
  detail::expect_size(clean_logits, detail::sz(T) * detail::sz(E), "clean_logits");
  detail::expect_size(noisy_logits_, detail::sz(T) * detail::sz(E), "noisy_logits");
  detail::expect_size(noise_std, detail::sz(T) * detail::sz(E), "noise_std");
  if (k < 1 || k >= E) detail::fail("shazeer_load_loss needs 1 <= k < E");
  std::vector<double> load(detail::sz(E), 0.0);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < E; ++i) {
      std::vector<double> others;
      for (int e = 0; e < E; ++e) {
        if (e != i) others.push_back(noisy_logits_[detail::idx2(t, E, e)]);
      }
      std::sort(others.begin(), others.end(), [](double a, double b) { return a > b; });
      const double kth = others[detail::sz(k - 1)];
      load[detail::sz(i)] += detail::normal_cdf((clean_logits[detail::idx2(t, E, i)] - kth) /
                                                noise_std[detail::idx2(t, E, i)]);
    }
  }
  return cv_squared(load);
}

// DeepSeek-V3 auxiliary-loss-free balancing [DSV3 section 2.1.2], [ROUT "Losses"]:
//   b_i += gamma * sign(mean_j load_j - load_i), sign(0) = 0: overloaded experts go down,
//   underloaded up. counts [E] = the load of each expert (e.g. expert_counts()).
inline std::vector<double> aux_free_bias_update(const std::vector<double>& bias,
                                                const std::vector<double>& counts, double gamma) {
  detail::expect_size(counts, bias.size(), "counts");
  double mean = 0.0;
  for (double c : counts) mean += c;
  if (!counts.empty()) mean /= static_cast<double>(counts.size());
  std::vector<double> out = bias;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double diff = mean - counts[i];
    const double sign = diff > 0.0 ? 1.0 : (diff < 0.0 ? -1.0 : 0.0);
    out[i] += gamma * sign;
  }
  return out;
}

}  // namespace moe::ref
