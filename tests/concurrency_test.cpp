// Concurrency: one immutable block shared by several threads, each with its own workspace, and a
// ThreadPool shared by several callers. Every result must be bitwise equal to the single-threaded
// one. The suite names contain "Concurrency": the tsan preset runs exactly these tests
// (CMakePresets.json, test preset "tsan"), so keep the configuration small enough for TSan.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moe/moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;
using test::random_weights;

#if defined(__SANITIZE_THREAD__)  // GCC
#define MOE_TEST_TSAN 1
#elif defined(__has_feature)  // clang
#if __has_feature(thread_sanitizer)
#define MOE_TEST_TSAN 1
#endif
#endif

constexpr int kThreads = 4;
#ifdef MOE_TEST_TSAN
constexpr int kCallsPerThread = 500;  // TSan is 5-15x slower; still thousands of calls in all.
#else
constexpr int kCallsPerThread = 1000;
#endif

/// A batch of `x.rows()` tokens and the output a single thread computed for it, with the routing.
template <class T>
struct Case {
  RowMatrix<T> x;
  RowMatrix<T> y;
  Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> experts;
};

/// Small Qwen2-MoE-like layer: 8 experts, top-2, and a gated shared expert, so every code path of
/// forward (routed experts, shared expert, combine) runs concurrently.
MoeConfig concurrency_config() {
  MoeConfig c;
  c.d_model = 32;
  c.d_ff = 48;
  c.num_experts = 8;
  c.top_k = 2;
  c.shared_d_ff = 40;
  c.shared_expert_gate = true;
  return c;
}

/// Random batch sizes 0..70 (0, decode-like 1..4 and prefill-like chunks), computed serially.
template <class T, class Block>
std::vector<Case<T>> make_cases(const Block& block, std::mt19937_64& rng, int count) {
  std::vector<Case<T>> cases;
  std::uniform_int_distribution<int> size(0, 70);
  Workspace<T> ws;
  for (int i = 0; i < count; ++i) {
    const Index n = i < 4 ? Index(i) : Index(size(rng));
    Case<T> c;
    c.x = random_matrix<T>(n, block.config().d_model, rng);
    c.y.resize(n, block.config().d_model);
    block.forward(c.x, c.y, ws);
    c.experts = ws.routing().experts();
    cases.push_back(std::move(c));
  }
  return cases;
}

/// `kThreads` threads call block.forward concurrently on random cases, each with its own
/// workspace and through `executor`; returns the number of calls whose output or routing differs
/// from the serial result (and the total number of calls in *calls).
template <class T, class Block>
int hammer(const Block& block, const std::vector<Case<T>>& cases, const Executor& executor,
           long* calls) {
  std::atomic<int> mismatches{0};
  std::atomic<long> done{0};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int id = 0; id < kThreads; ++id) {
    threads.emplace_back([&, id] {
      std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(id));
      std::uniform_int_distribution<std::size_t> pick(0, cases.size() - 1);
      Workspace<T> ws;  // one per thread
      RowMatrix<T> y;
      for (int call = 0; call < kCallsPerThread; ++call) {
        const Case<T>& c = cases[pick(rng)];
        y.resize(c.x.rows(), c.x.cols());
        block.forward(c.x, y, ws, executor);
        // Bitwise comparison: the same input must give the same bits whatever runs alongside.
        const bool same_y = y.rows() == c.y.rows() && (y.array() == c.y.array()).all();
        const bool same_route = ws.routing().experts() == c.experts;
        if (!same_y || !same_route) mismatches.fetch_add(1);
        done.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  *calls = done.load();
  return mismatches.load();
}

template <class T>
class ConcurrencyTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
// A name generator as third argument: clang's -Wpedantic rejects the two-argument form (the tsan
// preset builds with clang).
struct ScalarName {
  template <class T>
  static std::string GetName(int /*index*/) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(ConcurrencyTyped, Scalars, ScalarName);

// One const block, 4 threads, each with its own workspace, serial executor.
TYPED_TEST(ConcurrencyTyped, SharedBlockOwnWorkspacesBitwiseEqualToSerial) {
  using T = TypeParam;
  std::mt19937_64 rng(11);
  const MoeConfig c = concurrency_config();
  const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  const auto cases = make_cases<T>(block, rng, 48);
  long calls = 0;
  EXPECT_EQ(hammer<T>(block, cases, serial_executor(), &calls), 0);
  EXPECT_EQ(calls, long(kThreads) * kCallsPerThread);
  ::testing::Test::RecordProperty("calls", std::to_string(calls));
}

// One const block and one ThreadPool shared by 4 callers (the pool serialises their jobs).
TYPED_TEST(ConcurrencyTyped, SharedBlockSharedThreadPoolBitwiseEqualToSerial) {
  using T = TypeParam;
  std::mt19937_64 rng(12);
  const MoeConfig c = concurrency_config();
  const SparseMoeBlock<T> block(c, random_weights<T>(c, rng));
  const auto cases = make_cases<T>(block, rng, 48);
  const ThreadPool pool(3);
  long calls = 0;
  EXPECT_EQ(hammer<T>(block, cases, pool, &calls), 0);
  EXPECT_EQ(calls, long(kThreads) * kCallsPerThread);
  ::testing::Test::RecordProperty("calls", std::to_string(calls));
}

// Each caller with its own pool: pools coexist (8 threads on a 2-core machine: oversubscribed on
// purpose, the results must not care).
TEST(Concurrency, OnePoolPerCallerBitwiseEqualToSerial) {
  std::mt19937_64 rng(13);
  const MoeConfig c = concurrency_config();
  const SparseMoeBlock<float> block(c, random_weights<float>(c, rng));
  const auto cases = make_cases<float>(block, rng, 32);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int id = 0; id < kThreads; ++id) {
    threads.emplace_back([&, id] {
      const ThreadPool pool(2);
      Workspace<float> ws;
      RowMatrix<float> y;
      std::mt19937_64 pick_rng(2000 + static_cast<std::uint64_t>(id));
      for (int call = 0; call < kCallsPerThread / 4; ++call) {
        const Case<float>& cs = cases[pick_rng() % cases.size()];
        y.resize(cs.x.rows(), cs.x.cols());
        block.forward(cs.x, y, ws, pool);
        if (!(y.array() == cs.y.array()).all()) mismatches.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// Workspaces move between threads (a server's worker pool handing requests around): a workspace
// used by one thread, then by another, gives the same bits. The join is the synchronisation.
TEST(Concurrency, WorkspaceHandedBetweenThreads) {
  std::mt19937_64 rng(14);
  const MoeConfig c = concurrency_config();
  const SparseMoeBlock<double> block(c, random_weights<double>(c, rng));
  const auto cases = make_cases<double>(block, rng, 16);
  Workspace<double> ws;
  int mismatches = 0;
  for (int round = 0; round < 8; ++round) {
    std::thread([&] {
      RowMatrix<double> y;
      for (const Case<double>& cs : cases) {
        y.resize(cs.x.rows(), cs.x.cols());
        block.forward(cs.x, y, ws);
        if (!(y.array() == cs.y.array()).all()) ++mismatches;
      }
    }).join();
  }
  EXPECT_EQ(mismatches, 0);
}

}  // namespace
}  // namespace moe
