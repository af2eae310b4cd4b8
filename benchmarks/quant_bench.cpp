// Benchmarks of the decode products on block-quantised and bf16 weights (kernels/gemv_quant.hpp,
// kernels/gemv_bf16.hpp) against the fp32 streaming kernel (gemm_small_nt), with weights from
// DRAM: every product rotates among weight sets of 256 MiB per format and shape (8x a 32 MiB
// last-level cache; see rotate_bytes for larger caches).
//
// Names: quant/<fp32|bf16|q8|q4|mxfp4>/<fast|exact>/n:<n>/out:<o>/in:<i>/threads:<t>.
// fast: weights in the panel layout, activations quantised once per call (int8 per block of 32;
// bf16 for bf16), counted in the time; exact: the stored layout, fp32 activations, weights
// decoded in registers (fp32 is its own exact mode). The fast path reads the scales of Q8/Q4
// from a separate array (as panels store them); its bytes are the same as the stored layout's.
// Counters: GB/s of weight bytes as stored (codes and scales) per call, bytes/weight. Compare
// with peak/read/streams:4/threads:<t> (kernels_bench.cpp) in the same run, e.g.
//   moe_benchmarks --benchmark_filter='quant/|peak/read/streams:4'

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "moe/kernels/gemm_small.hpp"
#include "moe/kernels/gemv_bf16.hpp"
#include "moe/kernels/gemv_quant.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/quant_activations.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/kernels/quant_panels.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

#include <sys/mman.h>

namespace {

using moe::Index;
namespace k = moe::kernels;

// 256 MiB per format and shape, or $MOE_BENCH_ROTATE_MIB (on a machine whose last-level cache
// holds 256 MiB, e.g. the 300 MiB L3 of the Xeon servers, use 1024).
std::size_t rotate_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("MOE_BENCH_ROTATE_MIB");
    const long mib = env ? std::atol(env) : 0;
    return std::size_t(mib > 0 ? mib : 256) << 20;
  }();
  return bytes;
}
constexpr std::size_t kPage2M = std::size_t(2) << 20;

struct Free {
  void operator()(void* p) const { std::free(p); }
};

std::unique_ptr<unsigned char[], Free> alloc_bytes(std::size_t bytes) {
  bytes = std::max(kPage2M, (bytes + kPage2M - 1) / kPage2M * kPage2M);
  void* p = std::aligned_alloc(kPage2M, bytes);
  if (p == nullptr) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);
  return std::unique_ptr<unsigned char[], Free>(static_cast<unsigned char*>(p));
}

struct Fp32 {
  static constexpr const char* name = "fp32";
};
struct Bf16 {
  static constexpr const char* name = "bf16";
};

// Stored bytes per weight row of `in` weights.
template <class F>
std::size_t row_bytes(Index in) {
  if constexpr (std::is_same_v<F, Fp32>) return std::size_t(in) * 4;
  if constexpr (std::is_same_v<F, Bf16>) return std::size_t(in) * 2;
  if constexpr (std::is_same_v<F, moe::Q8>) return std::size_t(in / 32) * 34;
  if constexpr (std::is_same_v<F, moe::Q4>) return std::size_t(in / 32) * 18;
  return std::size_t(in / 32) * 17;  // Mxfp4: 16 code bytes + 1 scale byte per block
}

// `count` weight matrices [out x in] back to back, random but valid codes (generated directly:
// quantising 256 MiB from fp32 would take seconds). Mxfp4 keeps its scales in a second array.
template <class F>
struct Sets {
  Index out, in, count;
  std::unique_ptr<unsigned char[], Free> data, scales;

  Sets(Index out_, Index in_) : out(out_), in(in_) {
    const std::size_t set = std::size_t(out) * row_bytes<F>(in);
    count = Index(std::max<std::size_t>(2, (rotate_bytes() + set - 1) / set));
    const std::size_t code_bytes = std::is_same_v<F, moe::Mxfp4> ? set / 17 * 16 : set;
    const std::size_t total = code_bytes * std::size_t(count);
    data = alloc_bytes(total);
    std::mt19937 rng(42);
    const std::size_t block = std::min<std::size_t>(total, std::size_t(1) << 20);
    for (std::size_t i = 0; i < block; i += 4) {
      const std::uint32_t u = rng();
      std::memcpy(&data[i], &u, std::min<std::size_t>(4, block - i));
    }
    for (std::size_t i = block; i < total; i += block) {
      std::memcpy(&data[i], &data[0], std::min(block, total - i));
    }
    // Valid values where bits matter: fp32/bf16 finite, fp16 scales about 1e-3..3e-2.
    if constexpr (std::is_same_v<F, Fp32>) {
      auto* f = reinterpret_cast<float*>(data.get());
      for (std::size_t i = 0; i < total / 4; ++i) f[i] = float(int(i * 2654435761u % 2001) - 1000) * 1e-3f;
    } else if constexpr (std::is_same_v<F, Bf16>) {
      auto* h = reinterpret_cast<std::uint16_t*>(data.get());
      for (std::size_t i = 0; i < total / 2; ++i) h[i] = std::uint16_t((h[i] & 0x807fu) | ((119u + i % 8u) << 7));
    } else if constexpr (std::is_same_v<F, moe::Q8>) {
      auto* b = reinterpret_cast<k::BlockQ8*>(data.get());
      for (std::size_t i = 0; i < total / 34; ++i) b[i].d = std::uint16_t(0x1400 + i % 0x800);
      panel_d16.resize(total / 34);
      for (std::size_t i = 0; i < panel_d16.size(); ++i) panel_d16[i] = b[i].d;
    } else if constexpr (std::is_same_v<F, moe::Q4>) {
      auto* b = reinterpret_cast<k::BlockQ4*>(data.get());
      for (std::size_t i = 0; i < total / 18; ++i) b[i].d = std::uint16_t(0x1400 + i % 0x800);
      panel_d16.resize(total / 18);
      for (std::size_t i = 0; i < panel_d16.size(); ++i) panel_d16[i] = b[i].d;
    } else {
      const std::size_t ns = total / 16;
      scales = alloc_bytes(ns);
      for (std::size_t i = 0; i < ns; ++i) scales[i] = std::uint8_t(118 + i % 7);
    }
  }
  std::size_t bytes_per_set() const { return std::size_t(out) * row_bytes<F>(in); }
  const unsigned char* set(Index s) const {
    const std::size_t code_bytes =
        std::is_same_v<F, moe::Mxfp4> ? bytes_per_set() / 17 * 16 : bytes_per_set();
    return data.get() + std::size_t(s % count) * code_bytes;
  }
  // The same bytes read as panels (random codes are valid in either layout): codes then
  // scales of set s; Q8/Q4 scales are taken from the block headers' positions' fp16 range.
  auto panels(Index s) const {
    const std::size_t nblk = std::size_t(out * in / 32);
    if constexpr (std::is_same_v<F, moe::Mxfp4>) {
      return k::QuantPanels<F>{set(s), scales.get() + std::size_t(s % count) * nblk, out, in};
    } else {
      // Codes: the first nblk * B bytes of the set; scales: fp16 values from the panel_scales.
      return k::QuantPanels<F>{set(s), panel_d16.data() + std::size_t(s % count) * nblk, out, in};
    }
  }
  std::vector<std::uint16_t> panel_d16;
  auto view(Index s) const {
    if constexpr (std::is_same_v<F, moe::Mxfp4>) {
      return k::Mxfp4View{set(s), scales.get() + std::size_t(s % count) * std::size_t(out * in / 32),
                          out, in};
    } else if constexpr (std::is_same_v<F, moe::Q8>) {
      return k::Q8View{reinterpret_cast<const k::BlockQ8*>(set(s)), out, in};
    } else {
      return k::Q4View{reinterpret_cast<const k::BlockQ4*>(set(s)), out, in};
    }
  }
};

template <class F>
const Sets<F>& sets(Index out, Index in) {
  static std::vector<std::unique_ptr<Sets<F>>> cache;  // kept until exit
  for (const auto& s : cache) {
    if (s->out == out && s->in == in) return *s;
  }
  cache.push_back(std::make_unique<Sets<F>>(out, in));
  return *cache.back();
}

const moe::Executor& executor(Index threads) {
  static moe::ThreadPool pool(2);
  if (threads == 1) return moe::serial_executor();
  return pool;
}

template <class F>
void bm_quant(benchmark::State& state, bool exact, Index n, Index out, Index in, Index threads) {
  const Sets<F>& w = sets<F>(out, in);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(std::size_t(n * in));
  for (float& v : x) v = dist(rng);
  std::vector<float> y(std::size_t(n * out));
  std::vector<float> scratch_f(k::activations_i8_bytes(n, in) / 4 + 16);
  const Index ldb = k::bf16_padded_cols(in);
  std::vector<std::uint16_t> xb(std::size_t(n * ldb));
  const moe::Executor& exec = executor(threads);
  const Index tasks = threads == 1 ? 1 : 4 * threads;
  Index it = 0;
  for (auto _ : state) {
    const Index s = it++;
    if constexpr (std::is_same_v<F, Fp32>) {
      const float* wp = reinterpret_cast<const float*>(w.set(s));
      exec.run(tasks, [&](Index task, Index) {
        const auto [b, e] = moe::block_range(out, tasks, task, 4);
        k::gemm_small_nt(x.data(), n, in, wp, in, in, b, e, y.data(), out);
      });
    } else if constexpr (std::is_same_v<F, Bf16>) {
      const auto* wp = reinterpret_cast<const std::uint16_t*>(w.set(s));
      k::activations_to_bf16(x.data(), n, in, in, xb.data(), ldb);
      exec.run(tasks, [&](Index task, Index) {
        const auto [b, e] = moe::block_range(out, tasks, task, 4);
        k::gemv_bf16_nt(xb.data(), n, ldb, wp, in, in, b, e, y.data(), out);
      });
    } else {
      const k::QuantView<F> wv = w.view(s);
      if (exact) {
        exec.run(tasks, [&](Index task, Index) {
          const auto [b, e] = moe::block_range(out, tasks, task, 4);
          k::gemv_quant_nt_exact<F>(x.data(), n, in, wv, b, e, y.data(), out);
        });
      } else {
        const k::QuantPanels<F> wp = w.panels(s);
        k::ActivationsI8 a = k::make_activations_i8(scratch_f.data(), n, in);
        k::quantize_activations_i8(x.data(), in, k::quant_offset<F>, a);
        exec.run(tasks, [&](Index task, Index) {
          const auto [b, e] = moe::block_range(out, tasks, task, 4);
          k::gemv_quant_nt<F>(a, wp, b, e, y.data(), out);
        });
      }
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double iters = double(state.iterations());
  state.counters["GB/s"] =
      benchmark::Counter(double(w.bytes_per_set()) * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["bytes/weight"] = double(row_bytes<F>(in)) / double(in);
  state.SetLabel(std::string(Eigen::SimdInstructionSetsInUse()) +
                 (k::gemv_quant_simd ? "" : " (quant: scalar)") +
                 (k::gemv_bf16_simd ? "" : " (bf16: scalar)"));
}

template <class F>
void register_format(bool has_exact) {
  const std::pair<Index, Index> shapes[] = {{7168, 1024}, {1024, 3584}};
  for (bool exact : {false, true}) {
    if (exact && !has_exact) continue;
    for (const auto& [out, in] : shapes) {
      for (Index threads : {1, 2}) {
        for (Index n : {1, 2, 8, 16}) {
          const std::string name = std::string("quant/") + F::name + (exact ? "/exact" : "/fast") +
                                   "/n:" + std::to_string(n) + "/out:" + std::to_string(out) +
                                   "/in:" + std::to_string(in) +
                                   "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
            bm_quant<F>(st, exact, n, out, in, threads);
          })->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.2);
        }
      }
    }
  }
}

// Quantisation from fp32 (what quantise-on-load spends its time in): `rows` Gaussian rows of
// `in` weights (sigma 0.02, as trained projections) per iteration, one thread. Counter: weights/s.
// Names: quantize/<q8|q4|mxfp4>/in:<in>.
template <class F>
void bm_quantize(benchmark::State& state, Index in) {
  const Index rows = 64;
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> w(std::size_t(rows * in));
  for (float& v : w) v = dist(rng);
  const Index nb = in / 32;
  std::vector<k::BlockQ8> q8(std::size_t(rows * nb));
  std::vector<k::BlockQ4> q4(std::size_t(rows * nb));
  std::vector<std::uint8_t> codes(std::size_t(rows * nb * 16)), scales(std::size_t(rows * nb));
  for (auto _ : state) {
    for (Index o = 0; o < rows; ++o) {
      const float* row = &w[std::size_t(o * in)];
      if constexpr (std::is_same_v<F, moe::Q8>) {
        k::quantize_q8_row(row, in, &q8[std::size_t(o * nb)], o);
      } else if constexpr (std::is_same_v<F, moe::Q4>) {
        k::quantize_q4_row(row, in, &q4[std::size_t(o * nb)], o);
      } else {
        k::quantize_mxfp4_row(row, in, &codes[std::size_t(o * nb * 16)],
                              &scales[std::size_t(o * nb)], o);
      }
    }
    benchmark::DoNotOptimize(q8.data());
    benchmark::DoNotOptimize(q4.data());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.counters["weights/s"] = benchmark::Counter(double(rows * in) * double(state.iterations()),
                                                   benchmark::Counter::kIsRate);
}

template <class F>
void register_quantize() {
  const std::string name = std::string("quantize/") + F::name + "/in:4096";
  benchmark::RegisterBenchmark(name.c_str(), [](benchmark::State& st) {
    bm_quantize<F>(st, 4096);
  })->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
}

const bool registered = [] {
  register_quantize<moe::Q8>();
  register_quantize<moe::Q4>();
  register_quantize<moe::Mxfp4>();
  register_format<Fp32>(false);
  register_format<Bf16>(false);
  register_format<moe::Q8>(true);
  register_format<moe::Q4>(true);
  register_format<moe::Mxfp4>(true);
  return true;
}();

}  // namespace
