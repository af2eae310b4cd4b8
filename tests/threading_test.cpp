#include "moe/threading.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace {

using moe::Index;

// Runs `num_tasks` tasks and checks that each ran once and saw a worker id in range.
void expect_each_task_once(const moe::Executor& executor, Index num_tasks) {
  std::vector<std::atomic<int>> runs(static_cast<std::size_t>(std::max<Index>(num_tasks, 0)));
  std::atomic<int> bad_worker{0};
  const Index workers = executor.num_workers();
  executor.run(num_tasks, [&](Index task, Index worker) {
    if (worker < 0 || worker >= workers) bad_worker.fetch_add(1);
    runs[static_cast<std::size_t>(task)].fetch_add(1);
  });
  EXPECT_EQ(bad_worker.load(), 0);
  for (Index t = 0; t < num_tasks; ++t) {
    ASSERT_EQ(runs[static_cast<std::size_t>(t)].load(), 1) << "task " << t;
  }
}

int free_function_calls = 0;
void free_function(Index task, Index worker) { free_function_calls += int(task + worker + 1); }

TEST(FunctionRef, CallsLambdaFunctorAndFunction) {
  int sum = 0;
  auto lambda = [&sum](Index a, Index b) { sum += int(a * 10 + b); };
  moe::FunctionRef<void(Index, Index)> ref = lambda;
  ref(2, 3);
  EXPECT_EQ(sum, 23);

  struct Square {
    int operator()(int v) const { return v * v; }
  };
  const Square square;
  moe::FunctionRef<int(int)> sq = square;
  EXPECT_EQ(sq(7), 49);

  free_function_calls = 0;
  moe::FunctionRef<void(Index, Index)> fn = free_function;
  fn(1, 0);
  EXPECT_EQ(free_function_calls, 2);

  // Copies refer to the same callable.
  moe::FunctionRef<void(Index, Index)> copy = ref;
  copy(0, 1);
  EXPECT_EQ(sum, 24);
}

TEST(SerialExecutor, RunsInOrderOnWorkerZero) {
  const moe::Executor& serial = moe::serial_executor();
  EXPECT_EQ(serial.num_workers(), 1);
  std::vector<Index> order;
  order.reserve(5);
  serial.run(5, [&](Index task, Index worker) {
    EXPECT_EQ(worker, 0);
    order.push_back(task);
  });
  EXPECT_EQ(order, (std::vector<Index>{0, 1, 2, 3, 4}));
  for (Index n : {Index(0), Index(1), Index(1000)}) expect_each_task_once(serial, n);
  serial.run(-3, [](Index, Index) { FAIL() << "negative num_tasks must run nothing"; });
}

TEST(ThreadPool, RejectsBadSizes) {
  try {
    moe::ThreadPool pool(0);
    FAIL() << "expected config_error";
  } catch (const moe::config_error& e) {
    EXPECT_STREQ(e.what(), "moe: ThreadPool num_threads = 0, expected at least 1");
  }
  EXPECT_THROW(moe::ThreadPool(2, -1), moe::config_error);
}

TEST(ThreadPool, EveryTaskOnceForAnyCount) {
  for (Index threads : {1, 2, 3, 5}) {
    moe::ThreadPool pool(threads);
    EXPECT_EQ(pool.num_workers(), threads);
    for (Index n : {0, 1, 2, 3, 7, 64, 10007}) {
      SCOPED_TRACE(testing::Message() << "threads " << threads << " tasks " << n);
      expect_each_task_once(pool, n);
    }
  }
}

TEST(ThreadPool, ManyConsecutiveRuns) {
  moe::ThreadPool pool(3);
  std::atomic<Index> total{0};
  constexpr int kRuns = 5000;
  for (int run = 0; run < kRuns; ++run) {
    pool.run(run % 5, [&](Index task, Index) { total.fetch_add(task + 1); });
  }
  // Sum over runs of 1 + 2 + ... + (run % 5).
  Index expected = 0;
  for (int run = 0; run < kRuns; ++run) expected += (run % 5) * (run % 5 + 1) / 2;
  EXPECT_EQ(total.load(), expected);
}

TEST(ThreadPool, NoSpinPoolStillCompletes) {
  moe::ThreadPool pool(2, 0);
  for (int run = 0; run < 500; ++run) expect_each_task_once(pool, 1 + run % 9);
}

TEST(ThreadPool, WorkersUseDistinctScratch) {
  // Each worker increments its own slot without atomics; the slots must add up.
  moe::ThreadPool pool(4);
  std::vector<Index> scratch(static_cast<std::size_t>(pool.num_workers()) * 16, 0);
  pool.run(100000, [&](Index, Index worker) { ++scratch[static_cast<std::size_t>(worker) * 16]; });
  Index sum = 0;
  for (Index v : scratch) sum += v;
  EXPECT_EQ(sum, 100000);
}

TEST(ThreadPool, UsesTheThreadsWhenTasksBlock) {
  // Two tasks that wait for each other finish only if they run on different threads.
  moe::ThreadPool pool(2);
  std::atomic<int> arrived{0};
  std::atomic<int> distinct{0};
  pool.run(2, [&](Index, Index) {
    arrived.fetch_add(1);
    for (int spins = 0; spins < 200000000 && arrived.load() < 2; ++spins) std::this_thread::yield();
    if (arrived.load() == 2) distinct.fetch_add(1);
  });
  EXPECT_EQ(distinct.load(), 2);
}

TEST(ThreadPool, ConcurrentCallers) {
  moe::ThreadPool pool(3);
  constexpr int kCallers = 4;
  constexpr int kRuns = 300;
  std::atomic<int> failures{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      std::vector<std::atomic<int>> runs(64);
      for (int run = 0; run < kRuns; ++run) {
        const Index n = 1 + (run + c) % 64;
        for (Index t = 0; t < n; ++t) runs[static_cast<std::size_t>(t)].store(0);
        pool.run(n, [&](Index task, Index worker) {
          if (worker < 0 || worker >= pool.num_workers()) failures.fetch_add(1);
          runs[static_cast<std::size_t>(task)].fetch_add(1);
        });
        for (Index t = 0; t < n; ++t) {
          if (runs[static_cast<std::size_t>(t)].load() != 1) failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(ThreadPool, ThrowOnCallerPropagatesAfterOthersFinish) {
  moe::ThreadPool pool(2);
  std::atomic<int> finished{0};
  EXPECT_THROW(pool.run(50,
                        [&](Index task, Index worker) {
                          if (worker == 0 && task >= 0) throw std::runtime_error("task failed");
                          std::this_thread::sleep_for(std::chrono::microseconds(100));
                          finished.fetch_add(1);
                        }),
               std::runtime_error);
  const int after = finished.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(finished.load(), after) << "a task was still running after run() returned";
  expect_each_task_once(pool, 100);  // The pool is still usable.
}

TEST(ThreadPool, CleanDestruction) {
  for (int i = 0; i < 50; ++i) {
    moe::ThreadPool pool(1 + i % 4, i % 2 == 0 ? 0 : 100);
    if (i % 3 == 0) expect_each_task_once(pool, 10);
  }  // Idle, just-used and never-used pools all join.
  auto pool = std::make_unique<moe::ThreadPool>(2);
  expect_each_task_once(*pool, 3);
  pool.reset();
  SUCCEED();
}

TEST(ThreadPool, UsableThroughExecutorInterface) {
  moe::ThreadPool pool(2);
  const moe::Executor& executor = pool;
  std::atomic<Index> sum{0};
  executor.run(10, [&](Index task, Index) { sum.fetch_add(task); });
  EXPECT_EQ(sum.load(), 45);
}

TEST(BlockRange, CoversTheRangeOnGranuleBoundaries) {
  for (Index size : {0, 1, 3, 4, 5, 33, 1024, 7168}) {
    for (Index parts : {1, 2, 3, 8}) {
      for (Index granule : {1, 4, 16}) {
        Index expected_begin = 0;
        for (Index p = 0; p < parts; ++p) {
          const auto [b, e] = moe::block_range(size, parts, p, granule);
          EXPECT_EQ(b, expected_begin) << size << " " << parts << " " << p << " " << granule;
          EXPECT_LE(b, e);
          EXPECT_TRUE(b % granule == 0 || b == size);
          EXPECT_LE(e - b, ((size + granule - 1) / granule + parts - 1) / parts * granule);
          expected_begin = e;
        }
        EXPECT_EQ(expected_begin, size);
      }
    }
  }
  EXPECT_EQ(moe::block_range(7168, 2, 0, 4), (std::pair<Index, Index>{0, 3584}));
  EXPECT_EQ(moe::block_range(10, 2, 1, 4), (std::pair<Index, Index>{8, 10}));
}

}  // namespace
