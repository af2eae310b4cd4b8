// Benchmarks of the packed GEMM (moe/kernels/gemm_packed.hpp) against Eigen's GEMM on the expert
// products of three configurations, one expert at a time:
//   gemm/<config>/<product>/<impl>/rows:<n>/threads:<t>
// product: up = x [n x d_model] * W_in^T (W_in = gate and up, [2 d_ff x d_model]);
//          down = a [n x d_ff] * W_out^T (W_out [d_model x d_ff]);
//          swiglu = up with SwiGLU fused into the packed kernel's epilogue (packed only), against
//          Eigen's up product followed by the block's activation pass (eigen).
// impl: packed (weights packed once outside the loop; x packed per call into scratch) or eigen
// (Map * Map^T, as the block's experts compute today).
// Threads: the columns are split into `t` tasks (whole panels) on the serial executor (t = 1) or
// on moe::ThreadPool(2); each task has its own scratch. Counter GFLOP/s = 2 n k c / s.
// Compare with peak/gemm/threads:<t> (moe_bench.cpp) from the same run.

#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "moe/kernels/gemm_packed.hpp"
#include "moe/kernels/gemm_packed_epilogue.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
namespace kernels = moe::kernels;
using Shape = kernels::GemmPackedShape<float>;

struct ExpertShape {
  const char* name;
  Index d_model, d_ff;
};

constexpr ExpertShape kShapes[] = {
    {"mixtral_quarter", 1024, 3584}, {"olmoe", 2048, 1024}, {"qwen3", 2048, 768}};

const moe::Executor& gemm_executor(Index threads) {
  static moe::ThreadPool pool(2);
  return threads == 1 ? moe::serial_executor() : pool;
}

void fill_random(RowMatrix<float>& m, unsigned seed, float scale) {
  std::uint32_t s = seed * 2654435761u + 1u;
  for (Index i = 0; i < m.size(); ++i) {
    s = s * 1664525u + 1013904223u;
    m.data()[i] = scale * (float(s >> 8) * (1.0f / 8388608.0f) - 1.0f);
  }
}

void bm_gemm(benchmark::State& state, ExpertShape shape, std::string product, bool packed,
             Index rows, Index threads) {
  const bool down = product == "down";
  const bool swiglu = product == "swiglu";
  const Index k = down ? shape.d_ff : shape.d_model;
  const Index c = down ? shape.d_model : 2 * shape.d_ff;
  RowMatrix<float> x(rows, k), w(c, k), out(rows, c);
  fill_random(x, 1, 1.0f);
  fill_random(w, 2, 0.05f);
  out.setZero();
  const Index f = shape.d_ff;
  // Packed weights: plain for up/down, gate/up interleaved for swiglu.
  Eigen::Matrix<float, Eigen::Dynamic, 1> panels;
  kernels::PackedPanels<float> pw;
  if (swiglu) {
    panels.resize(kernels::gemm_packed_size<float>(kernels::gemm_packed_gated_cols<float>(f), k));
    pw = kernels::pack_gated_nt(w.data(), k, w.data() + f * k, k, f, k, panels.data());
  } else {
    panels.resize(kernels::gemm_packed_size<float>(c, k));
    pw = kernels::pack_nt(w.data(), c, k, k, panels.data());
  }
  const Index scratch_size = kernels::gemm_packed_scratch_size<float>(k);
  Eigen::Matrix<float, Eigen::Dynamic, 1> scratch(scratch_size * threads);
  scratch.setZero();
  const moe::Executor& ex = gemm_executor(threads);
  const Index granule = swiglu ? Shape::gated_granule : Shape::granule;
  for (auto _ : state) {
    ex.run(threads, [&](Index task, Index worker) {
      float* my_scratch = scratch.data() + worker * scratch_size;
      if (packed) {
        const auto [c0, c1] = moe::block_range(pw.cols, threads, task, granule);
        if (swiglu) {
          kernels::SwiGluEpilogue<float> ep{out.data(), c, f};
          kernels::gemm_packed_nt(x.data(), rows, k, pw, c0, c1, ep, my_scratch);
        } else {
          kernels::StoreEpilogue<float> ep{out.data(), c};
          kernels::gemm_packed_nt(x.data(), rows, k, pw, c0, c1, ep, my_scratch);
        }
        return;
      }
      // Eigen's GEMM on a column block of W, as the block's experts compute above the streaming
      // threshold (DenseOperand).
      auto eigen_block = [&](Index c0, Index c1) {
        using Strided = Eigen::Map<RowMatrix<float>, 0, Eigen::OuterStride<>>;
        Strided om(out.data() + c0, rows, c1 - c0, Eigen::OuterStride<>(c));
        om.noalias() = x * w.middleRows(c0, c1 - c0).transpose();
      };
      if (swiglu) {  // the unfused path: gate block, up block, the activation pass
        const auto [a, b] = moe::block_range(f, threads, task, 16);
        eigen_block(a, b);
        eigen_block(f + a, f + b);
        moe::detail::apply_activation_cols<moe::SwiGLU>(out.data(), c, rows, f, a, b, out.data(),
                                                        c);
        return;
      }
      const auto [c0, c1] = moe::block_range(c, threads, task, 16);
      eigen_block(c0, c1);
    });
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * double(rows) * double(k) * double(c) * 1e-9 * double(state.iterations()),
      benchmark::Counter::kIsRate);
  state.SetLabel(std::string(Eigen::SimdInstructionSetsInUse()) + ", mr x nr = " +
                 std::to_string(Shape::mr) + " x " + std::to_string(Shape::nr));
}

const bool registered = [] {
  for (const ExpertShape& s : kShapes) {
    for (const char* product : {"up", "down", "swiglu"}) {
      for (bool packed : {true, false}) {
        for (Index rows : {64, 512, 2048}) {
          for (Index threads : {1, 2}) {
            const std::string name = std::string("gemm/") + s.name + "/" + product + "/" +
                                     (packed ? "packed" : "eigen") + "/rows:" +
                                     std::to_string(rows) + "/threads:" + std::to_string(threads);
            benchmark::RegisterBenchmark(name.c_str(), bm_gemm, s, std::string(product), packed,
                                         rows, threads)
                ->UseRealTime()
                ->Unit(benchmark::kMillisecond)
                ->MinTime(0.2);
          }
        }
      }
    }
  }
  return true;
}();

}  // namespace
