// The dense-vs-sparse benchmark of the MoE block (issue 5), with the machine's own ceilings.
//
// Names: <kind>/<config>/tokens:<T>/threads:<n>, kind one of
//   sparse        SparseMoeBlock<float> (Mixtral softmax top-k gating, SwiGLU experts);
//   dense_active  one SwiGLU FFN of width d_ff * k (+ the shared experts' width): the same active
//                 parameters and FLOPs as the sparse block, no router;
//   dense_total   one SwiGLU FFN of width d_ff * E (+ shared): the same parameters;
// and peak/gemm/threads:<n> (Eigen GEMM, 2048^3, split into n column blocks on our executor).
// peak/read (streaming read of 1 GiB) lives in kernels_bench.cpp. Both dense kinds run on the same
// kernels and (column-block) task decomposition as the block's experts (detail::run_ffn_jobs), so
// sparse / dense_active measures what routing and grouping cost.
//
// Counters: tokens/s; GFLOP/s = (2 * 3 * d_model * width * T [+ router 2 * d_model * E * T]) / s,
// width = d_ff * k + shared d_ff for sparse and dense_active; GB/s of expert weights touched (for
// T <= 16; the weights of the experts the routing selected, averaged over the rotated inputs);
// imbalance = max / mean rows per expert (sparse).
//
// Decode measurements rotate among 8 input batches (different routings) and, when a model is
// smaller than 256 MiB, among several copies of its weights, so the weights come from DRAM as in
// a real decode step. Data are seeded pseudo-random values, never zeros. Models are built lazily,
// one at a time (the previous one is freed), only when the filter selects one of their benchmarks.
//
// Serial parts (issue 16): serial/<config>/part:<route|plan|gather|combine|all>/tokens:<T>/
// threads:<n> for mixtral_quarter, olmoe and qwen3: the forward's parts other than the expert
// products, alone on the same shapes (all: the four in sequence), GB/s of the rows they move.
//
// Dtypes (issues 6, 13): sparse/<config>/dtype:<fp32|bf16|int8|fp8|q8|q4|mxfp4|bf16_exact|q8_exact|
// q4_exact|mxfp4_exact>/tokens:<T>/threads:<n>, the same block with its routed experts stored as
// SparseMoeBlock<float, Mixtral, SwiGLU, CompactExperts<Format, Mode>> (the router stays fp32),
// for mixtral_quarter, olmoe and qwen3 (1, 8, 64, 512 tokens) and mixtral_8x7b (1, 8, 16, 32);
// fp32_packed: the fp32 block with PackedExperts (issue 16), also at 2048 tokens with fp32.
// Compact weights are generated expert by expert (fp32 one matrix at a
// time, quantised, freed), never as a whole fp32 layer. Counters as above, GB/s counting the
// experts' bytes as stored (codes + scales), plus weights_MiB (resident routed-expert bytes of one
// weight set, CompactExpertStack::bytes / ExpertStack::bytes) and bytes/weight.
//
// Threads: 1 = the serial executor, 2 = moe::ThreadPool(2). Built with EIGEN_DONT_PARALLELIZE: the
// only parallelism is ours (no OpenMP, no nesting).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "moe/moe.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;

struct Config {
  std::string name;
  Index d_model, d_ff, num_experts, top_k, shared_d_ff;
  std::vector<Index> tokens;
  std::vector<std::string> kinds;
};

const std::vector<Config>& configs() {
  static const std::vector<Config> all = [] {
    const std::vector<std::string> every = {"dense_total", "dense_active", "sparse"};
    std::vector<Config> c = {
        {"mixtral_quarter", 1024, 3584, 8, 2, 0, {1, 8, 64, 512, 2048}, every},
        {"olmoe", 2048, 1024, 64, 8, 0, {1, 8, 64, 512}, every},
        {"deepseek_lite", 2048, 1408, 64, 6, 2 * 1408, {1, 8, 64, 512}, every},
        {"mixtral_8x7b", 4096, 14336, 8, 2, 0, {1, 16}, every},
        {"qwen3", 2048, 768, 128, 8, 0, {1, 8, 64, 512}, every},
    };
    // The expert-count series: the cost should stay flat as experts are added at fixed top-2.
    for (Index e : {8, 16, 32, 64, 128}) {
      c.push_back({"experts_" + std::to_string(e),
                   1024,
                   1024,
                   e,
                   2,
                   0,
                   {512},
                   e == 8 ? std::vector<std::string>{"dense_active", "sparse"}
                          : std::vector<std::string>{"sparse"}});
    }
    return c;
  }();
  return all;
}

// Seeded pseudo-random values in [-scale, scale) (splitmix64 of the index): fast enough for
// gigabytes of weights, never zero-filled, reproducible.
void fill(float* data, std::size_t count, std::uint64_t seed, float scale) {
  for (std::size_t i = 0; i < count; ++i) {
    std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + i;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / float(1 << 24));  // [0, 1)
    data[i] = scale * (2.0f * u - 1.0f);
  }
}

void fill(RowMatrix<float>& m, std::uint64_t seed, float scale) {
  fill(m.data(), std::size_t(m.size()), seed, scale);
}

// Uniform scales with the variance of a Kaiming-style init: activations stay O(1) through the FFN.
void fill_ffn(moe::ExpertStack<float>& s, std::uint64_t seed) {
  fill(s.stacked_in(), seed, std::sqrt(3.0f / float(s.d_model())));
  fill(s.stacked_out(), seed + 1, std::sqrt(3.0f / float(s.d_ff())));
}

constexpr std::size_t kRotationBytes = std::size_t(256) << 20;  // 8x the last-level cache.
constexpr Index kInputSets = 8;

// Everything one (config, kind) needs: weight sets, inputs, outputs, workspace. One at a time.
struct Model {
  std::string key;
  const Config* config = nullptr;
  std::vector<std::unique_ptr<moe::SparseMoeBlock<float>>> sparse;
  std::vector<moe::ExpertStack<float>> dense;
  std::size_t model_bytes = 0;  // expert (+ shared) weights of one set
};

Model& current_model() {
  static Model m;
  return m;
}

Model& model_for(const Config& c, const std::string& kind) {
  Model& m = current_model();
  const std::string key = c.name + "/" + kind;
  if (m.key == key) return m;
  m = Model{};  // Free the previous model first: the largest ones do not fit twice.
  m.key = key;
  m.config = &c;
  moe::MoeConfig mc;
  mc.d_model = c.d_model;
  mc.d_ff = c.d_ff;
  mc.num_experts = c.num_experts;
  mc.top_k = c.top_k;
  mc.shared_d_ff = c.shared_d_ff;
  const Index width = kind == "sparse"         ? 0
                      : kind == "dense_active" ? c.d_ff * c.top_k + c.shared_d_ff
                                               : c.d_ff * c.num_experts + c.shared_d_ff;
  m.model_bytes = std::size_t(3 * c.d_model) * sizeof(float) *
                  std::size_t(kind == "sparse" ? c.d_ff * c.num_experts + c.shared_d_ff : width);
  const Index sets =
      std::max<Index>(1, Index((kRotationBytes + m.model_bytes - 1) / m.model_bytes));
  for (Index s = 0; s < sets; ++s) {
    const std::uint64_t seed = 1000 * std::uint64_t(s + 1);
    if (kind == "sparse") {
      auto w = moe::MoeWeights<float>::zeros(mc);
      // Router logits with a standard deviation of about 1 for inputs uniform in [-1, 1): a
      // realistic spread of tokens over experts, not all to one (see the imbalance counter).
      fill(w.router, seed + 2, 3.0f / std::sqrt(float(c.d_model)));
      fill_ffn(w.experts, seed + 3);
      if (c.shared_d_ff > 0) fill_ffn(w.shared, seed + 5);
      m.sparse.push_back(std::make_unique<moe::SparseMoeBlock<float>>(mc, std::move(w)));
    } else {
      moe::ExpertStack<float> stack(1, c.d_model, width, true);
      fill_ffn(stack, seed + 7);
      m.dense.push_back(std::move(stack));
    }
  }
  return m;
}

// One pool per thread count, made on first use and kept for the whole run.
const moe::Executor& executor(Index threads) {
  if (threads <= 1) return moe::serial_executor();
  static std::map<Index, std::unique_ptr<moe::ThreadPool>> pools;
  auto& pool = pools[threads];
  if (!pool) pool = std::make_unique<moe::ThreadPool>(threads);
  return *pool;
}

void set_label(benchmark::State& state) {
  state.SetLabel(std::string(Eigen::SimdInstructionSetsInUse()) +
                 ", small_batch_rows=" + std::to_string(moe::kernels::small_batch_rows));
}

// One dense SwiGLU FFN on x through the same task decomposition as the block's experts; the
// activation in place over the gate columns (inference).
void dense_forward(const moe::ExpertStack<float>& w, const RowMatrix<float>& x,
                   RowMatrix<float>& hidden, RowMatrix<float>& y, const moe::Executor& ex) {
  moe::detail::ffn_forward<moe::SwiGLU, float>(w, 0, x.data(), x.cols(), x.rows(), hidden.data(),
                                               hidden.data(), hidden.cols(), y.data(), ex);
}

void bm_model(benchmark::State& state, const Config* c, std::string kind, Index tokens,
              Index threads) {
  Model& m = model_for(*c, kind);
  const moe::Executor& ex = executor(threads);
  std::vector<RowMatrix<float>> xs;
  for (Index i = 0; i < kInputSets; ++i) {
    xs.emplace_back(tokens, c->d_model);
    fill(xs.back(), 77 + std::uint64_t(i), 1.0f);
  }
  RowMatrix<float> y(tokens, c->d_model);
  moe::Workspace<float> ws;
  const bool sparse = kind == "sparse";
  const Index sets = Index(sparse ? m.sparse.size() : m.dense.size());
  RowMatrix<float> hidden;
  if (!sparse) hidden.resize(tokens, m.dense[0].in_rows());

  // Routing statistics and the bytes of the experts each input batch touches.
  double touched_bytes = 0, imbalance = 0;
  const double expert_bytes = 3.0 * double(c->d_model) * double(c->d_ff) * sizeof(float);
  const double shared_bytes = 3.0 * double(c->d_model) * double(c->shared_d_ff) * sizeof(float);
  for (Index i = 0; i < kInputSets; ++i) {
    if (sparse) {
      m.sparse[0]->forward(xs[std::size_t(i)], y, ws, ex);  // also warms the workspace
      Index used = 0;
      for (Index e = 0; e < c->num_experts; ++e) used += ws.plan().counts[std::size_t(e)] > 0;
      touched_bytes += double(used) * expert_bytes + shared_bytes;
      imbalance += ws.stats().imbalance;
    } else {
      dense_forward(m.dense[0], xs[std::size_t(i)], hidden, y, ex);
      touched_bytes += double(m.model_bytes);
    }
  }
  touched_bytes /= double(kInputSets);
  imbalance /= double(kInputSets);

  Index k = 0;
  for (auto _ : state) {
    const RowMatrix<float>& x = xs[std::size_t(k % kInputSets)];
    const Index set = (k / kInputSets + k) % sets;
    if (sparse) {
      m.sparse[std::size_t(set)]->forward(x, y, ws, ex);
    } else {
      dense_forward(m.dense[std::size_t(set)], x, hidden, y, ex);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    ++k;
  }

  const double iters = double(state.iterations());
  const double width = sparse || kind == "dense_active"
                           ? double(c->d_ff * c->top_k + c->shared_d_ff)
                           : double(c->d_ff * c->num_experts + c->shared_d_ff);
  double flops = 2.0 * 3.0 * double(c->d_model) * width * double(tokens);
  if (sparse) flops += 2.0 * double(c->d_model) * double(c->num_experts) * double(tokens);
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(double(tokens) * iters, Counter::kIsRate);
  state.counters["GFLOP/s"] = Counter(flops * 1e-9 * iters, Counter::kIsRate);
  if (tokens <= 16) {
    state.counters["GB/s"] = Counter(touched_bytes * 1e-9 * iters, Counter::kIsRate);
  }
  if (sparse) state.counters["imbalance"] = imbalance;
  set_label(state);
}

// Eigen's GEMM on Y = X * W^T, 2048^3, in `threads` column blocks on our executor.
void bm_peak_gemm(benchmark::State& state, Index threads) {
  constexpr Index n = 2048;
  RowMatrix<float> x(n, n), w(n, n), y(n, n);
  fill(x, 5, 1.0f);
  fill(w, 6, 1.0f);
  const moe::Executor& ex = executor(threads);
  for (auto _ : state) {
    ex.run(threads, [&](Index task, Index) {
      const auto [c0, c1] = moe::block_range(n, threads, task, 16);
      y.middleCols(c0, c1 - c0).noalias() = x * w.middleRows(c0, c1 - c0).transpose();
    });
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * double(n) * double(n) * double(n) * 1e-9 * double(state.iterations()),
      benchmark::Counter::kIsRate);
  set_label(state);
}

// ---- dtypes (issue 6) ----

// One weight set of a dtype's block, behind a type-erased forward.
struct DtypeSet {
  std::function<void(const RowMatrix<float>&, RowMatrix<float>&, moe::Workspace<float>&,
                     const moe::Executor&)>
      forward;
  std::size_t expert_bytes = 0;
};

struct DtypeModel {
  std::string key;
  std::vector<DtypeSet> sets;
};

moe::MoeConfig moe_config(const Config& c) {
  moe::MoeConfig mc;
  mc.d_model = c.d_model;
  mc.d_ff = c.d_ff;
  mc.num_experts = c.num_experts;
  mc.top_k = c.top_k;
  mc.shared_d_ff = c.shared_d_ff;
  return mc;
}

template <class Block>
DtypeSet erase(std::shared_ptr<Block> block) {
  DtypeSet set;
  set.expert_bytes = block->expert_bytes();
  set.forward = [block](const RowMatrix<float>& x, RowMatrix<float>& y, moe::Workspace<float>& ws,
                        const moe::Executor& ex) { block->forward(x, y, ws, ex); };
  return set;
}

// Compact experts generated one fp32 matrix at a time (same value law as fill_ffn).
template <class Format, moe::CompactMode Mode = moe::CompactMode::fast>
DtypeSet make_compact(const Config& c, std::uint64_t seed) {
  const moe::MoeConfig mc = moe_config(c);
  moe::MoeWeights<float> w;
  w.router = RowMatrix<float>(c.num_experts, c.d_model);
  fill(w.router, seed + 2, 3.0f / std::sqrt(float(c.d_model)));
  moe::CompactExpertStack<Format> stack(c.num_experts, c.d_model, c.d_ff, true);
  using M = moe::CompactMatrix<Format>;
  const float s_in = std::sqrt(3.0f / float(c.d_model)), s_out = std::sqrt(3.0f / float(c.d_ff));
  for (Index e = 0; e < c.num_experts; ++e) {
    RowMatrix<float> m(c.d_ff, c.d_model);
    fill(m, seed + 3 + 10 * std::uint64_t(e), s_in);
    M gate = M::quantize(m);
    fill(m, seed + 4 + 10 * std::uint64_t(e), s_in);
    M up = M::quantize(m);
    m.resize(c.d_model, c.d_ff);
    fill(m, seed + 5 + 10 * std::uint64_t(e), s_out);
    stack.set_gated(e, std::move(gate), std::move(up), M::quantize(m));
  }
  using Block = moe::SparseMoeBlock<float, moe::gating::Mixtral, moe::SwiGLU,
                                    moe::CompactExperts<Format, Mode>>;
  return erase(std::make_shared<Block>(mc, std::move(w), std::move(stack)));
}

// Block-quantised experts (issue 13) from random stored bytes (valid codes, fp16 scales of
// 2^-10 .. 2^-9, E8M0 scales 2^-9 .. 2^-3), repacked into panels (fast) or viewed (exact):
// quantising hundreds of MiB from fp32 with the scale search would take minutes.
template <class Format, moe::CompactMode Mode>
DtypeSet make_quant(const Config& c, std::uint64_t seed) {
  namespace k = moe::kernels;
  const moe::MoeConfig mc = moe_config(c);
  moe::MoeWeights<float> w;
  w.router = RowMatrix<float>(c.num_experts, c.d_model);
  fill(w.router, seed + 2, 3.0f / std::sqrt(float(c.d_model)));
  constexpr auto layout =
      Mode == moe::CompactMode::fast ? moe::QuantLayout::panels : moe::QuantLayout::stored;
  moe::QuantExpertStack<Format, layout> stack(c.num_experts, c.d_model, c.d_ff, true);
  auto bytes = std::make_shared<std::vector<std::vector<std::uint8_t>>>();  // kept for views
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  auto next = [&] {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
  };
  using M = moe::QuantMatrix<Format>;
  auto make = [&](Index rows, Index cols) {
    const Index nb = rows * cols / 32;
    std::vector<std::uint8_t> buf;
    if constexpr (std::is_same_v<Format, moe::Mxfp4>) {
      buf.resize(std::size_t(nb * 17));
      for (std::size_t i = 0; i < std::size_t(nb * 16); i += 8) {
        const std::uint64_t r = next();
        std::memcpy(&buf[i], &r, 8);
      }
      for (Index b = 0; b < nb; ++b) buf[std::size_t(nb * 16 + b)] = std::uint8_t(118 + next() % 7);
    } else {
      using Block = std::conditional_t<std::is_same_v<Format, moe::Q8>, k::BlockQ8, k::BlockQ4>;
      buf.resize(std::size_t(nb) * sizeof(Block));
      for (std::size_t i = 0; i + 8 <= buf.size(); i += 8) {
        const std::uint64_t r = next();
        std::memcpy(&buf[i], &r, 8);
      }
      auto* blocks = reinterpret_cast<Block*>(buf.data());
      for (Index b = 0; b < nb; ++b) blocks[b].d = std::uint16_t(0x1400 + next() % 0x400);
    }
    bytes->push_back(std::move(buf));
    const std::uint8_t* p = bytes->back().data();
    k::QuantView<Format> v;
    if constexpr (std::is_same_v<Format, moe::Mxfp4>) {
      v = k::Mxfp4View{p, p + nb * 16, rows, cols};
    } else if constexpr (std::is_same_v<Format, moe::Q8>) {
      v = k::Q8View{reinterpret_cast<const k::BlockQ8*>(p), rows, cols};
    } else {
      v = k::Q4View{reinterpret_cast<const k::BlockQ4*>(p), rows, cols};
    }
    M m = layout == moe::QuantLayout::panels ? M::repack(v) : M::view(v);
    if (layout == moe::QuantLayout::panels) bytes->pop_back();  // repacked: the source may go
    return m;
  };
  for (Index e = 0; e < c.num_experts; ++e) {
    M gate = make(c.d_ff, c.d_model), up = make(c.d_ff, c.d_model);
    stack.set_gated(e, std::move(gate), std::move(up), make(c.d_model, c.d_ff));
  }
  using Block = moe::SparseMoeBlock<float, moe::gating::Mixtral, moe::SwiGLU,
                                    moe::CompactExperts<Format, Mode>>;
  DtypeSet set = erase(std::make_shared<Block>(mc, std::move(w), std::move(stack)));
  auto forward = set.forward;
  set.forward = [forward, bytes](const RowMatrix<float>& x, RowMatrix<float>& y,
                                 moe::Workspace<float>& ws, const moe::Executor& ex) {
    forward(x, y, ws, ex);
  };
  return set;
}

DtypeSet make_set(const Config& c, const std::string& dtype, std::uint64_t seed) {
  using moe::CompactMode;
  if (dtype == "q8") return make_quant<moe::Q8, CompactMode::fast>(c, seed);
  if (dtype == "q4") return make_quant<moe::Q4, CompactMode::fast>(c, seed);
  if (dtype == "mxfp4") return make_quant<moe::Mxfp4, CompactMode::fast>(c, seed);
  if (dtype == "q8_exact") return make_quant<moe::Q8, CompactMode::exact>(c, seed);
  if (dtype == "q4_exact") return make_quant<moe::Q4, CompactMode::exact>(c, seed);
  if (dtype == "mxfp4_exact") return make_quant<moe::Mxfp4, CompactMode::exact>(c, seed);
  if (dtype == "bf16") return make_compact<moe::Bf16>(c, seed);
  if (dtype == "bf16_exact") return make_compact<moe::Bf16, CompactMode::exact>(c, seed);
  if (dtype == "int8") return make_compact<moe::Int8>(c, seed);
  if (dtype == "fp8") return make_compact<moe::Fp8E4M3>(c, seed);
  auto w = moe::MoeWeights<float>::zeros(moe_config(c));
  fill(w.router, seed + 2, 3.0f / std::sqrt(float(c.d_model)));
  fill_ffn(w.experts, seed + 3);
  if (dtype == "fp32_packed") {
    using Packed =
        moe::SparseMoeBlock<float, moe::gating::Mixtral, moe::SwiGLU, moe::PackedExperts>;
    return erase(std::make_shared<Packed>(moe_config(c), std::move(w)));
  }
  return erase(std::make_shared<moe::SparseMoeBlock<float>>(moe_config(c), std::move(w)));
}

DtypeModel& dtype_model_for(const Config& c, const std::string& dtype) {
  static DtypeModel m;
  const std::string key = c.name + "/" + dtype;
  if (m.key == key) return m;
  m = DtypeModel{};           // free the previous model first
  current_model() = Model{};  // and the model of the other benchmarks
  m.key = key;
  m.sets.push_back(make_set(c, dtype, 1000));
  const std::size_t bytes = m.sets[0].expert_bytes;
  const Index sets = std::max<Index>(1, Index((kRotationBytes + bytes - 1) / bytes));
  for (Index s = 1; s < sets; ++s)
    m.sets.push_back(make_set(c, dtype, 1000 * std::uint64_t(s + 1)));
  return m;
}

void bm_dtype(benchmark::State& state, const Config* c, std::string dtype, Index tokens,
              Index threads) {
  DtypeModel& m = dtype_model_for(*c, dtype);
  const moe::Executor& ex = executor(threads);
  std::vector<RowMatrix<float>> xs;
  for (Index i = 0; i < kInputSets; ++i) {
    xs.emplace_back(tokens, c->d_model);
    fill(xs.back(), 77 + std::uint64_t(i), 1.0f);
  }
  RowMatrix<float> y(tokens, c->d_model);
  moe::Workspace<float> ws;
  const double expert_bytes = double(m.sets[0].expert_bytes) / double(c->num_experts);
  double touched_bytes = 0;
  for (Index i = 0; i < kInputSets; ++i) {
    m.sets[0].forward(xs[std::size_t(i)], y, ws, ex);  // also warms the workspace
    Index used = 0;
    for (Index e = 0; e < c->num_experts; ++e) used += ws.plan().counts[std::size_t(e)] > 0;
    touched_bytes += double(used) * expert_bytes;
  }
  touched_bytes /= double(kInputSets);
  const Index sets = Index(m.sets.size());
  Index k = 0;
  for (auto _ : state) {
    const RowMatrix<float>& x = xs[std::size_t(k % kInputSets)];
    m.sets[std::size_t((k / kInputSets + k) % sets)].forward(x, y, ws, ex);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    ++k;
  }
  const double iters = double(state.iterations());
  const double flops =
      2.0 * 3.0 * double(c->d_model) * double(c->d_ff * c->top_k) * double(tokens) +
      2.0 * double(c->d_model) * double(c->num_experts) * double(tokens);
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(double(tokens) * iters, Counter::kIsRate);
  state.counters["GFLOP/s"] = Counter(flops * 1e-9 * iters, Counter::kIsRate);
  if (tokens <= 16) {
    state.counters["GB/s"] = Counter(touched_bytes * 1e-9 * iters, Counter::kIsRate);
  }
  state.counters["weights_MiB"] = double(m.sets[0].expert_bytes) / double(1 << 20);
  state.counters["bytes/weight"] = double(m.sets[0].expert_bytes) /
                                   (3.0 * double(c->d_model) * double(c->d_ff * c->num_experts));
  set_label(state);
}

// The serial parts of a sparse forward (issue 16: what limits scaling to 16+ cores), timed alone
// on the block's shapes with fp32 routing: part route (router logits + gating, serial), plan
// (DispatchPlan::build, serial), gather (gather_rows, serial), combine (combine_expert_outputs on
// the executor), all (the four in sequence: a forward minus its expert products). Counter
// share_of_forward is not computed here: divide by sparse/<config>/tokens:<T>/threads:<n>.
void bm_serial_part(benchmark::State& state, const Config* c, std::string part, Index tokens,
                    Index threads) {
  const moe::MoeConfig mc = moe_config(*c);
  moe::MoeWeights<float> w;
  w.router = RowMatrix<float>(c->num_experts, c->d_model);
  fill(w.router, 1002, 3.0f / std::sqrt(float(c->d_model)));
  const moe::Router<float, moe::gating::Mixtral> router;
  const moe::Executor& ex = executor(threads);
  RowMatrix<float> x(tokens, c->d_model), y(tokens, c->d_model);
  fill(x, 77, 1.0f);
  moe::Workspace<float> ws;
  moe::DispatchPlan plan;
  router.route(mc, x, w, ws);
  plan.build(ws.routing());
  std::vector<float> x_rows(std::size_t(plan.num_rows * c->d_model));
  std::vector<float> y_rows(x_rows.size());
  fill(y_rows.data(), y_rows.size(), 78, 1.0f);
  const bool all = part == "all";
  for (auto _ : state) {
    if (all || part == "route") router.route(mc, x, w, ws, ex);
    if (all || part == "plan") plan.build(ws.routing());
    if (all || part == "gather") moe::gather_rows<float>(x, plan, x_rows.data(), ex);
    if (all || part == "combine") {
      moe::combine_expert_outputs<float, float>(plan, ws.routing().weights(), y_rows.data(),
                                                nullptr, nullptr, y, ex);
    }
    benchmark::DoNotOptimize(x_rows.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  // Bytes the part moves: gather reads and writes num_rows rows, combine reads them and writes
  // the tokens (the router reads x and W_r).
  const double row_bytes = double(c->d_model) * sizeof(float);
  double bytes = 0;
  if (all || part == "route") bytes += double(tokens + c->num_experts) * row_bytes;
  if (all || part == "gather") bytes += 2.0 * double(plan.num_rows) * row_bytes;
  if (all || part == "combine") bytes += double(plan.num_rows + tokens) * row_bytes;
  using benchmark::Counter;
  state.counters["GB/s"] = Counter(bytes * 1e-9 * double(state.iterations()), Counter::kIsRate);
  set_label(state);
}

// Thread counts of every benchmark: 1 and 2 (the 2-core development machine), or the list in
// MOE_BENCH_THREADS (e.g. "1,2,4,8,16" on a server: docs/benchmarks.md's scaling table).
std::vector<Index> bench_threads() {
  std::vector<Index> list;
  if (const char* env = std::getenv("MOE_BENCH_THREADS")) {
    const std::string text = env;
    std::size_t start = 0;
    while (start < text.size()) {
      const std::size_t end = std::min(text.find(',', start), text.size());
      const long n = std::strtol(text.substr(start, end - start).c_str(), nullptr, 10);
      if (n > 0) list.push_back(Index(n));
      start = end + 1;
    }
  }
  if (list.empty()) list = {1, 2};
  return list;
}

const bool registered = [] {
  const std::vector<Index> thread_counts = bench_threads();
  for (Index threads : thread_counts) {
    benchmark::RegisterBenchmark(("peak/gemm/threads:" + std::to_string(threads)).c_str(),
                                 bm_peak_gemm, threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.5);
  }
  for (const Config& c : configs()) {
    for (const std::string& kind : c.kinds) {
      for (Index tokens : c.tokens) {
        for (Index threads : thread_counts) {
          const std::string name = kind + "/" + c.name + "/tokens:" + std::to_string(tokens) +
                                   "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(name.c_str(), bm_model, &c, kind, tokens, threads)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond)
              ->MinTime(0.3);
        }
      }
    }
  }
  // Packed experts (issue 16): the fp32 block against the same block with PackedExperts, at
  // prefill token counts, on the three expert shapes.
  for (const Config& c : configs()) {
    if (c.name != "mixtral_quarter" && c.name != "olmoe" && c.name != "qwen3") continue;
    for (const std::string dtype : {"fp32", "fp32_packed"}) {
      for (Index t : {2048}) {  // the loop below has 1, 8, 64, 512
        for (Index threads : thread_counts) {
          const std::string name = "sparse/" + c.name + "/dtype:" + dtype +
                                   "/tokens:" + std::to_string(t) +
                                   "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(name.c_str(), bm_dtype, &c, dtype, t, threads)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond)
              ->MinTime(0.3);
        }
      }
    }
  }
  for (const Config& c : configs()) {
    if (c.name != "mixtral_quarter" && c.name != "olmoe" && c.name != "qwen3") continue;
    for (const char* part : {"route", "plan", "gather", "combine", "all"}) {
      for (Index tokens : c.tokens) {
        for (Index threads : thread_counts) {
          const std::string name = std::string("serial/") + c.name + "/part:" + part +
                                   "/tokens:" + std::to_string(tokens) +
                                   "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(name.c_str(), bm_serial_part, &c, std::string(part),
                                       tokens, threads)
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond)
              ->MinTime(0.1);
        }
      }
    }
  }
  for (const Config& c : configs()) {
    if (c.name != "mixtral_quarter" && c.name != "mixtral_8x7b" && c.name != "olmoe" &&
        c.name != "qwen3") {
      continue;
    }
    const std::vector<Index> tokens = c.name == "mixtral_8x7b" ? std::vector<Index>{1, 8, 16, 32}
                                                               : std::vector<Index>{1, 8, 64, 512};
    for (const std::string dtype : {"fp32", "fp32_packed", "bf16", "int8", "fp8", "q8", "q4",
                                    "mxfp4", "bf16_exact", "q8_exact", "q4_exact",
                                    "mxfp4_exact"}) {
      if (c.name == "mixtral_8x7b" && dtype == std::string("fp32_packed")) continue;
      for (Index t : tokens) {
        for (Index threads : thread_counts) {
          const std::string name = "sparse/" + c.name + "/dtype:" + dtype +
                                   "/tokens:" + std::to_string(t) +
                                   "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(name.c_str(), bm_dtype, &c, dtype, t, threads)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond)
              ->MinTime(0.3);
        }
      }
    }
  }
  return true;
}();

}  // namespace
