// Benchmarks of the small-batch product Y = X * W^T (gemm_small_nt against Eigen) and of the
// memory system's streaming read bandwidth, the ceiling such a product can reach.
//
// Names: kernel/<impl>/n:<n>/out:<o>/in:<i>/threads:<t>, peak/read/streams:<s>/threads:<t>,
// threading/run/spin:<iterations>/tasks:<k>/threads:<t>. Counters: GB/s of weight bytes (the
// bandwidth floor of the product), GFLOP/s.
//
// The product rotates among several weight sets that together exceed the 32 MiB last-level cache
// several times over, so every iteration streams its weights from DRAM, as a decode step does.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

#include <sys/mman.h>

namespace {

using moe::Index;

// Total bytes of weights a benchmark rotates through: 8x the last-level cache.
constexpr std::size_t kRotationBytes = std::size_t(256) << 20;
constexpr std::size_t kHugePage = std::size_t(2) << 20;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// 2 MiB-aligned memory advised for transparent huge pages (the system default here is "madvise"),
// as a model loader would do for its weights (a first touch of a 4 KiB page costs ~13 us here, ~0.25 us with huge pages; TLB reach).
template <class T>
std::unique_ptr<T[], FreeDeleter> huge_alloc(std::size_t count) {
  const std::size_t bytes = (count * sizeof(T) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, bytes);
  if (p == nullptr) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// Random values in [-1, 1), seeded; a 1 Mi-value random block repeated with a per-copy offset
// keeps the fill of hundreds of MiB fast while avoiding zeros and constant data.
template <class T>
void fill_random(T* data, std::size_t count, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<T> dist(T(-1), T(1));
  const std::size_t block = std::min<std::size_t>(count, std::size_t(1) << 20);
  for (std::size_t i = 0; i < block; ++i) data[i] = dist(rng);
  for (std::size_t i = block; i < count; ++i) {
    data[i] = data[i % block] * T(0.5) + T(0.001) * T(i / block % 7);
  }
}

// Several [out x in] weight matrices back to back, kRotationBytes in total (at least 2).
template <class T>
struct WeightSets {
  Index out, in, count;
  std::unique_ptr<T[], FreeDeleter> data;

  WeightSets(Index out_features, Index in_features) : out(out_features), in(in_features) {
    const std::size_t bytes = std::size_t(out * in) * sizeof(T);
    count = Index(std::max<std::size_t>(2, (kRotationBytes + bytes - 1) / bytes));
    data = huge_alloc<T>(std::size_t(count * out * in));
    fill_random(data.get(), std::size_t(count * out * in), 42);
  }
  const T* set(Index k) const { return data.get() + (k % count) * out * in; }
};

template <class T>
const WeightSets<T>& weight_sets(Index out, Index in) {
  // One allocation per shape, shared by every benchmark of that shape (kept until exit).
  static std::vector<std::unique_ptr<WeightSets<T>>> cache;
  for (const auto& w : cache) {
    if (w->out == out && w->in == in) return *w;
  }
  cache.push_back(std::make_unique<WeightSets<T>>(out, in));
  return *cache.back();
}

const moe::Executor& executor(Index threads) {
  static moe::ThreadPool pool(2);
  if (threads == 1) return moe::serial_executor();
  return pool;
}

enum class Impl { kGemmSmall, kEigen, kEigenLazy };

const char* impl_name(Impl impl) {
  switch (impl) {
    case Impl::kGemmSmall:
      return "gemm_small_nt";
    case Impl::kEigen:
      return "eigen";
    case Impl::kEigenLazy:
      return "eigen_lazy";
  }
  return "?";
}

// One column block [begin, end) of Y = X * W^T.
void product_block(Impl impl, const float* x, Index n, const float* w, Index in, Index begin,
                   Index end, float* y, Index out) {
  if (impl == Impl::kGemmSmall) {
    moe::kernels::gemm_small_nt(x, n, in, w, in, in, begin, end, y, out);
    return;
  }
  const moe::ConstMap<float> xm(x, n, in);
  const moe::ConstMap<float> wm(w + begin * in, end - begin, in);
  moe::MutMap<float> ym(y, n, out);
  if (impl == Impl::kEigen) {
    ym.middleCols(begin, end - begin).noalias() = xm * wm.transpose();
  } else {
    ym.middleCols(begin, end - begin).noalias() = xm.lazyProduct(wm.transpose());
  }
}

void set_label(benchmark::State& state) { state.SetLabel(Eigen::SimdInstructionSetsInUse()); }

void bm_product(benchmark::State& state, Impl impl, Index n, Index out, Index in, Index threads) {
  const WeightSets<float>& weights = weight_sets<float>(out, in);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(std::size_t(n * in));
  for (float& v : x) v = dist(rng);
  std::vector<float> y(std::size_t(n * out));
  const moe::Executor& exec = executor(threads);
  // Two tasks per thread: column blocks on tile boundaries, balanced dynamically.
  const Index tasks = threads == 1 ? 1 : 2 * threads;
  Index k = 0;
  for (auto _ : state) {
    const float* w = weights.set(k++);
    exec.run(tasks, [&](Index task, Index) {
      const auto [begin, end] =
          moe::block_range(out, tasks, task, moe::kernels::gemm_small_nt_out_tile);
      product_block(impl, x.data(), n, w, in, begin, end, y.data(), out);
    });
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = double(out) * double(in) * sizeof(float);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2e-9 * double(n) * double(out) * double(in) * double(state.iterations()),
                         benchmark::Counter::kIsRate);
  set_label(state);
}

// Sum of `streams` equal parts of [p, p + count), read side by side (independent streams).
template <int Streams>
float read_streams(const float* p, Index count) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr Index kLanes = Eigen::internal::packet_traits<float>::size;
  constexpr Index kStep = 4 * kLanes / Streams;  // 4 packets in flight per step in total.
  const Index part = count / Streams / kStep * kStep;
  Packet acc[Streams][kStep / kLanes];
  for (auto& a : acc) {
    for (Packet& v : a) v = Eigen::internal::pset1<Packet>(0.0f);
  }
  for (Index i = 0; i < part; i += kStep) {
    for (int s = 0; s < Streams; ++s) {
      for (Index j = 0; j < kStep / kLanes; ++j) {
        acc[s][j] = Eigen::internal::padd(
            acc[s][j], Eigen::internal::ploadu<Packet>(p + s * part + i + j * kLanes));
      }
    }
  }
  Packet total = Eigen::internal::pset1<Packet>(0.0f);
  for (auto& a : acc) {
    for (Packet& v : a) total = Eigen::internal::padd(total, v);
  }
  return Eigen::internal::predux(total);
}

void bm_peak_read(benchmark::State& state, int streams, Index threads) {
  constexpr Index kCount = Index(1) << 28;  // 1 GiB of float.
  static const auto buffer = [] {
    auto b = huge_alloc<float>(std::size_t(kCount));
    fill_random(b.get(), std::size_t(kCount), 3);
    return b;
  }();
  const moe::Executor& exec = executor(threads);
  float sums[2] = {0.0f, 0.0f};
  for (auto _ : state) {
    exec.run(threads, [&](Index task, Index worker) {
      const auto [begin, end] = moe::block_range(kCount, threads, task, 4096);
      const float* p = buffer.get() + begin;
      sums[worker] +=
          streams == 1 ? read_streams<1>(p, end - begin) : read_streams<4>(p, end - begin);
    });
    benchmark::DoNotOptimize(sums);
  }
  state.counters["GB/s"] =
      benchmark::Counter(double(kCount) * sizeof(float) * 1e-9 * double(state.iterations()),
                         benchmark::Counter::kIsRate);
  set_label(state);
}

// Wall time of one run() of `tasks` tasks of about `work_ns` each: the ideal on 2 threads is
// tasks * work_ns / 2; the excess is the cost of waking the pool and waiting for it.
void bm_threading_run(benchmark::State& state, Index spin, Index tasks, Index work_ns,
                      Index threads) {
  moe::ThreadPool pool(threads, spin);
  std::vector<double> sums(std::size_t(threads) * 8, 1.0);
  // About 1 ns per dependent multiply-add on this machine.
  const Index steps = work_ns;
  for (auto _ : state) {
    pool.run(tasks, [&](Index, Index worker) {
      double v = sums[std::size_t(worker) * 8];
      for (Index i = 0; i < steps; ++i) v = v * 0.999999 + 1e-9;
      sums[std::size_t(worker) * 8] = v;
    });
  }
  benchmark::DoNotOptimize(sums.data());
}

std::string shape_name(Index n, Index out, Index in, Index threads) {
  return "/n:" + std::to_string(n) + "/out:" + std::to_string(out) + "/in:" + std::to_string(in) +
         "/threads:" + std::to_string(threads);
}

const bool registered = [] {
  const std::pair<Index, Index> shapes[] = {{7168, 1024}, {1024, 3584}};
  for (Index threads : {1, 2}) {
    for (int streams : {1, 4}) {
      benchmark::RegisterBenchmark(
          ("peak/read/streams:" + std::to_string(streams) + "/threads:" + std::to_string(threads))
              .c_str(),
          bm_peak_read, streams, threads)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.3);
    }
  }
  for (Impl impl : {Impl::kGemmSmall, Impl::kEigen, Impl::kEigenLazy}) {
    for (const auto& [out, in] : shapes) {
      for (Index threads : {1, 2}) {
        for (Index n : {1, 2, 4, 8, 16}) {
          benchmark::RegisterBenchmark(
              (std::string("kernel/") + impl_name(impl) + shape_name(n, out, in, threads)).c_str(),
              bm_product, impl, n, out, in, threads)
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond)
              ->MinTime(0.2);
        }
      }
    }
  }
  for (Index spin : {Index(0), Index(2000)}) {
    for (Index work_ns : {0, 2000, 50000}) {
      benchmark::RegisterBenchmark(("threading/run/spin:" + std::to_string(spin) +
                                    "/tasks:2/work_ns:" + std::to_string(work_ns) + "/threads:2")
                                       .c_str(),
                                   bm_threading_run, spin, Index(2), work_ns, Index(2))
          ->UseRealTime()
          ->MinTime(0.2);
    }
  }
  return true;
}();

}  // namespace
