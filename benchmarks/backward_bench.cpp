// Backward of the sparse MoE block next to the training-mode forward it follows (issue 4).
//
// Names: forward_train/<config>/tokens:<T>/threads:<n>   SparseMoeBlock<float>::forward with
//                                                        ws.set_training(true) (keeps activations)
//        backward/<config>/tokens:<T>/threads:<n>        block_backward on that workspace
//                                                        (experts, router, HF aux + z-loss)
// Time columns are CPU time of the calling thread (exact for threads:1); wall_ms is the wall-clock
// time per call. Counters: tokens/s; GFLOP/s with the matrix products' FLOPs (forward 6 d_model
// d_ff per routed row + the router; backward twice the expert products + router); `vs_forward` on
// the backward: its wall time per call divided by the fastest of 3 training forwards timed just
// before (target <= 2.5; on a shared machine compare the CPU times of the two rows instead).
// Threads: 1 = the serial executor, 2 = moe::ThreadPool(2).
//
// mixtral_quarter: d_model 1024, d_ff 3584, 8 experts, top-2 (a quarter of Mixtral 8x7B's width),
// float, SwiGLU, seeded pseudo-random weights scaled 1/sqrt(fan_in) (the routing is balanced to
// within a few percent, as in a trained model).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "moe/backward.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;

struct BackwardConfig {
  std::string name;
  Index d_model, d_ff, num_experts, top_k;
  std::vector<Index> tokens;
};

void fill(float* data, Index count, std::uint64_t seed, float scale) {
  for (Index i = 0; i < count; ++i) {
    std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(i);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / float(1 << 24));
    data[i] = scale * (2.0f * u - 1.0f);
  }
}

using Block = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU>;

/// One model at a time (hundreds of MB): built when first needed, replaced by the next config.
struct Model {
  std::string name;
  moe::MoeConfig config;
  std::unique_ptr<Block> block;
  std::unique_ptr<moe::MoeGradients<float>> grads;
};

Model& model_for(const BackwardConfig& c) {
  static Model m;
  if (m.name == c.name) return m;
  m.block.reset();
  m.grads.reset();
  m.name = c.name;
  m.config.d_model = c.d_model;
  m.config.d_ff = c.d_ff;
  m.config.num_experts = c.num_experts;
  m.config.top_k = c.top_k;
  auto w = moe::MoeWeights<float>::zeros(m.config);
  fill(w.router.data(), w.router.size(), 1, 1.0f / std::sqrt(float(c.d_model)));
  fill(w.experts.stacked_in().data(), w.experts.stacked_in().size(), 2,
       1.0f / std::sqrt(float(c.d_model)));
  fill(w.experts.stacked_out().data(), w.experts.stacked_out().size(), 3,
       1.0f / std::sqrt(float(c.d_ff)));
  m.grads = std::make_unique<moe::MoeGradients<float>>(moe::MoeGradients<float>::zeros_like(w));
  m.block = std::make_unique<Block>(m.config, std::move(w));
  return m;
}

double expert_flops(const moe::MoeConfig& c, Index tokens) {
  return 2.0 * 3.0 * double(c.d_model) * double(c.d_ff) * double(tokens * c.top_k);
}
double router_flops(const moe::MoeConfig& c, Index tokens) {
  return 2.0 * double(c.d_model) * double(c.num_experts) * double(tokens);
}

void bm(benchmark::State& state, const BackwardConfig* c, bool backward, Index tokens,
        Index threads) {
  Model& m = model_for(*c);
  RowMatrix<float> x(tokens, c->d_model), dy(tokens, c->d_model), y(tokens, c->d_model),
      dx(tokens, c->d_model);
  fill(x.data(), x.size(), 11, 1.0f);
  fill(dy.data(), dy.size(), 12, 1.0f);
  moe::Workspace<float> ws;
  ws.set_training(true);
  moe::BackwardWorkspace<float> bws;
  std::unique_ptr<moe::ThreadPool> pool;
  if (threads > 1) pool = std::make_unique<moe::ThreadPool>(threads);
  const moe::Executor& ex =
      pool ? static_cast<const moe::Executor&>(*pool) : moe::serial_executor();
  moe::LossCoefficients coeffs;
  coeffs.aux = 0.01;
  coeffs.z = 0.001;

  double forward_seconds = 1e30;
  for (int i = 0; i < 3; ++i) {  // warm the buffers; time the training forward
    const auto t0 = std::chrono::steady_clock::now();
    m.block->forward(x, y, ws, ex);
    forward_seconds =
        std::min(forward_seconds,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (backward) moe::block_backward(*m.block, x, dy, ws, *m.grads, dx, coeffs, bws, ex);

  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (backward) {
      moe::block_backward(*m.block, x, dy, ws, *m.grads, dx, coeffs, bws, ex);
      benchmark::DoNotOptimize(dx.data());
    } else {
      m.block->forward(x, y, ws, ex);
      benchmark::DoNotOptimize(y.data());
    }
    benchmark::ClobberMemory();
  }
  const double per_call =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
      double(std::max<benchmark::IterationCount>(1, state.iterations()));
  const double flops =
      (backward ? 2.0 : 1.0) * (expert_flops(m.config, tokens) + router_flops(m.config, tokens));
  state.counters["tokens/s"] =
      benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["wall_ms"] = per_call * 1e3;
  if (backward) state.counters["vs_forward"] = per_call / forward_seconds;
  state.SetLabel(Eigen::SimdInstructionSetsInUse());
}

const std::vector<BackwardConfig>& configs() {
  static const std::vector<BackwardConfig> all = {
      {"mixtral_quarter", 1024, 3584, 8, 2, {64, 512}},
  };
  return all;
}

[[maybe_unused]] const bool registered = [] {
  for (const BackwardConfig& c : configs()) {
    for (Index tokens : c.tokens) {
      for (Index threads : {1, 2}) {
        for (bool backward : {false, true}) {
          const std::string name = std::string(backward ? "backward/" : "forward_train/") + c.name +
                                   "/tokens:" + std::to_string(tokens) +
                                   "/threads:" + std::to_string(threads);
          // No MinTime / UseRealTime: they would append to the name; wall time is a counter.
          benchmark::RegisterBenchmark(name.c_str(), bm, &c, backward, tokens, threads)
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
  }
  return true;
}();

}  // namespace
