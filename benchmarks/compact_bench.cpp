// Benchmarks of the products on compact weights (moe/kernels/gemm_compact.hpp) against the fp32
// small-batch kernel (gemm_small_nt) and Eigen's fp32 GEMM, on one thread.
//
// Names: compact/<fp32|bf16|int8|fp8>/n:<n>/out:<o>/in:<i>/threads:1. n <= 16 runs the streaming
// kernels (fp32: gemm_small_nt; compact: gemm_compact_nt); larger n the prefill path (fp32:
// Eigen GEMM; compact: gemm_compact_nt_prefill). Counters: GB/s of weight bytes as stored (codes
// and scales; 4 per weight for fp32), GFLOP/s. Compare time ratios within one run.
//
// Decode sizes rotate among weight sets of 256 MiB in total per format (8x the 32 MiB
// last-level cache), so every iteration streams its weights from DRAM.

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

#include "moe/experts/compact_expert_stack.hpp"
#include "moe/experts/compact_matrix.hpp"
#include "moe/kernels/gemm_compact.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"

#include <sys/mman.h>

namespace {

using moe::Index;

constexpr std::size_t kRotateBytes = std::size_t(256) << 20;
constexpr std::size_t kPage2M = std::size_t(2) << 20;

struct Free {
  void operator()(void* p) const { std::free(p); }
};

// Huge-page-advised buffer of `count` elements (as a weight loader would map them).
template <class T>
std::unique_ptr<T[], Free> alloc_weights(std::size_t count) {
  const std::size_t bytes =
      std::max(kPage2M, (count * sizeof(T) + kPage2M - 1) / kPage2M * kPage2M);
  void* p = std::aligned_alloc(kPage2M, bytes);
  if (p == nullptr) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);
  return std::unique_ptr<T[], Free>(static_cast<T*>(p));
}

struct Fp32 {
  using code_type = float;
  static constexpr const char* name = "fp32";
};

// Random codes of a format (never NaN, never all zero), generated directly: quantising hundreds
// of MiB through the exact rounding of io/dtype.hpp would take seconds.
template <class Format>
typename Format::code_type random_code(std::mt19937& rng) {
  const std::uint32_t u = rng();
  if constexpr (std::is_same_v<Format, Fp32>) {
    return float(int(u % 2001) - 1000) * 1e-3f;
  } else if constexpr (std::is_same_v<Format, moe::Bf16>) {
    // |w| in about [2^-8, 1): exponent 119..126, random mantissa and sign
    return std::uint16_t((u & 0x8000u) | ((119u + (u >> 16) % 8u) << 7) | (u & 0x7fu));
  } else if constexpr (std::is_same_v<Format, moe::Int8>) {
    return std::int8_t(int(u % 255u) - 127);
  } else {
    const std::uint8_t c = std::uint8_t(u);
    return (c & 0x7f) == 0x7f ? std::uint8_t(c - 1) : c;
  }
}

// `count` weight matrices [out x in] back to back, as codes (plus scales), with a
// CompactMatrix view of each (fp32: raw pointers).
template <class Format>
struct Sets {
  using Code = typename Format::code_type;
  Index out, in, count;
  std::unique_ptr<Code[], Free> codes;
  std::vector<float> scales;
  std::vector<moe::CompactMatrix<Format>> views;  // unused for fp32

  Sets(Index out_, Index in_, bool rotate) : out(out_), in(in_) {
    const std::size_t bytes = std::size_t(out * in) * sizeof(Code);
    count = rotate ? Index(std::max<std::size_t>(2, (kRotateBytes + bytes - 1) / bytes)) : 1;
    const std::size_t n = std::size_t(count * out * in);
    codes = alloc_weights<Code>(n);
    std::mt19937 rng(42);
    const std::size_t block = std::min<std::size_t>(n, std::size_t(1) << 20);
    for (std::size_t i = 0; i < block; ++i) codes[i] = random_code<Format>(rng);
    for (std::size_t i = block; i < n; i += block) {
      std::memcpy(&codes[i], &codes[0], std::min(block, n - i) * sizeof(Code));
    }
    if constexpr (!std::is_same_v<Format, Fp32>) {
      Index per_set = 0;
      if constexpr (std::is_same_v<Format, moe::Int8>) per_set = out;
      if constexpr (std::is_same_v<Format, moe::Fp8E4M3>)
        per_set = ((out + 127) / 128) * ((in + 127) / 128);
      scales.resize(std::size_t(std::max<Index>(per_set, 1) * count));
      for (std::size_t i = 0; i < scales.size(); ++i) scales[i] = 1e-3f * float(1 + i % 7);
      for (Index k = 0; k < count; ++k) {
        views.push_back(moe::CompactMatrix<Format>::view(
            codes.get() + k * out * in, out, in, scales.data() + k * std::max<Index>(per_set, 1)));
      }
    }
  }
  std::size_t bytes_per_set() const {
    std::size_t b = std::size_t(out * in) * sizeof(Code);
    if constexpr (std::is_same_v<Format, moe::Int8>) b += std::size_t(out) * sizeof(float);
    if constexpr (std::is_same_v<Format, moe::Fp8E4M3>) {
      b += std::size_t(((out + 127) / 128) * ((in + 127) / 128)) * sizeof(float);
    }
    return b;
  }
};

template <class Format>
const Sets<Format>& sets(Index out, Index in, bool rotate) {
  static std::vector<std::unique_ptr<Sets<Format>>> cache;  // kept until exit
  for (const auto& s : cache) {
    if (s->out == out && s->in == in && (s->count > 1) == rotate) return *s;
  }
  cache.push_back(std::make_unique<Sets<Format>>(out, in, rotate));
  return *cache.back();
}

template <class Format>
void bm_compact(benchmark::State& state, Index n_arg, Index out_arg, Index in_arg) {
  // Opaque sizes: with constants propagated GCC 12 reports a false overflow in gemm_small_nt's
  // remainder loop (-Waggressive-loop-optimizations).
  Index n = n_arg, out = out_arg, in = in_arg;
  benchmark::DoNotOptimize(n);
  benchmark::DoNotOptimize(out);
  benchmark::DoNotOptimize(in);
  const bool small = n <= moe::kernels::small_batch_rows;
  const Sets<Format>& w = sets<Format>(out, in, small);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(std::size_t(n * in));
  for (float& v : x) v = dist(rng);
  std::vector<float> y(std::size_t(n * out));
  std::vector<float> scratch(std::size_t(moe::kernels::gemm_compact_scratch_floats(in)));
  Index k = 0;
  for (auto _ : state) {
    const Index set = k++ % w.count;
    if constexpr (std::is_same_v<Format, Fp32>) {
      const float* wp = w.codes.get() + set * out * in;
      if (small) {
        moe::kernels::gemm_small_nt(x.data(), n, in, wp, in, in, 0, out, y.data(), out);
      } else {
        moe::MutMap<float>(y.data(), n, out).noalias() =
            moe::ConstMap<float>(x.data(), n, in) * moe::ConstMap<float>(wp, out, in).transpose();
      }
    } else {
      const auto& wm = w.views[std::size_t(set)];
      if (small) {
        moe::kernels::gemm_compact_nt(x.data(), n, in, wm.kernel_view(), 0, out, y.data(), out);
      } else {
        moe::kernels::gemm_compact_nt_prefill(x.data(), n, in, wm.kernel_view(), 0, out, y.data(),
                                              out, scratch.data(), Index(scratch.size()));
      }
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double iters = double(state.iterations());
  state.counters["GB/s"] =
      benchmark::Counter(double(w.bytes_per_set()) * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(n * out * in) * iters * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(Eigen::SimdInstructionSetsInUse()) +
                 (moe::kernels::gemm_compact_simd ? "" : " (compact: scalar)"));
}

template <class Format>
void register_format() {
  const Index out = 7168, in = 1024;
  for (Index n : {1, 8, 16, 512}) {
    const std::string name = std::string("compact/") + Format::name + "/n:" + std::to_string(n) +
                             "/out:" + std::to_string(out) + "/in:" + std::to_string(in) +
                             "/threads:1";
    auto* b = benchmark::RegisterBenchmark(
        name.c_str(), [=](benchmark::State& st) { bm_compact<Format>(st, n, out, in); });
    b->Unit(benchmark::kMicrosecond)->UseRealTime();
    if (n > 16) b->MinTime(0.5);
  }
}

const bool registered = [] {
  register_format<Fp32>();
  register_format<moe::Bf16>();
  register_format<moe::Int8>();
  register_format<moe::Fp8E4M3>();
  return true;
}();

}  // namespace
