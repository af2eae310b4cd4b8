// moe: executors that run (task, worker) closures, serially or on a persistent thread pool.
//
// Parallel work in moe is a list of independent tasks (an expert, a row chunk, a column block of
// one expert's weights). The closure receives the worker index as well, so each worker can own a
// slice of the caller's scratch memory without locks (as in Google Highway's ThreadPool).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe {

template <class Sig>
class FunctionRef;

/// Non-owning, non-allocating reference to a callable (like llvm::function_ref): two pointers,
/// copied by value. The referenced callable must outlive every call; bind it to a named lambda or
/// pass a lambda directly as a function argument, never store a FunctionRef built from a temporary.
template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  /// Refers to `callable` (a lambda, a functor, or a function). Does not copy or allocate.
  template <class Callable,
            class = std::enable_if_t<
                !std::is_same_v<std::remove_cv_t<std::remove_reference_t<Callable>>, FunctionRef> &&
                std::is_invocable_r_v<R, Callable&, Args...>>>
  // NOLINTNEXTLINE(google-explicit-constructor): implicit by design, like std::function.
  FunctionRef(Callable&& callable) noexcept {
    using Decayed = std::remove_reference_t<Callable>;
    if constexpr (std::is_function_v<Decayed>) {
      // A function designator: keep the function pointer itself (no object pointer to refer to).
      target_.fn = reinterpret_cast<void (*)()>(&callable);
      invoke_ = [](Target t, Args... args) -> R {
        return reinterpret_cast<Decayed*>(t.fn)(std::forward<Args>(args)...);
      };
    } else {
      target_.obj = const_cast<void*>(static_cast<const volatile void*>(std::addressof(callable)));
      invoke_ = [](Target t, Args... args) -> R {
        return (*static_cast<Decayed*>(t.obj))(std::forward<Args>(args)...);
      };
    }
  }

  /// Calls the referenced callable.
  R operator()(Args... args) const { return invoke_(target_, std::forward<Args>(args)...); }

 private:
  union Target {
    void* obj;
    void (*fn)();
  };
  Target target_{};
  R (*invoke_)(Target, Args...) = nullptr;
};

/// Runs a batch of independent tasks, possibly in parallel.
///
/// run(num_tasks, f) calls f(task, worker) exactly once for every task in [0, num_tasks), in an
/// unspecified order, and returns after every call finished. `worker` is in [0, num_workers()); two
/// calls of the same run() that execute concurrently always get different workers, so per-worker
/// scratch (owned by the caller, e.g. in its workspace) needs no lock. Tasks must not throw:
/// validate before the parallel region. run() never allocates.
class Executor {
 public:
  virtual ~Executor() = default;
  /// Upper bound (exclusive) of the worker index passed to tasks; size per-worker scratch with it.
  virtual Index num_workers() const = 0;
  /// Runs tasks 0..num_tasks-1 (nothing if num_tasks <= 0); see the class comment.
  virtual void run(Index num_tasks, FunctionRef<void(Index task, Index worker)> f) const = 0;
};

/// Runs every task on the calling thread, in order 0, 1, ..., as worker 0. The default executor.
/// Stateless: safe to share between threads. An exception thrown by a task propagates.
class SerialExecutor final : public Executor {
 public:
  Index num_workers() const override { return 1; }
  void run(Index num_tasks, FunctionRef<void(Index task, Index worker)> f) const override {
    for (Index task = 0; task < num_tasks; ++task) f(task, 0);
  }
};

/// The process-wide SerialExecutor.
inline const Executor& serial_executor() {
  static const SerialExecutor executor;
  return executor;
}

/// A fixed set of persistent threads; the thread calling run() takes part as worker 0, so
/// ThreadPool(n) starts n - 1 threads and runs up to n tasks at once.
///
/// Tasks are handed out dynamically through an atomic counter (one fetch_add per task), so unequal
/// tasks balance themselves; give a few more tasks than workers when their cost varies. Between
/// jobs the threads sleep on a condition variable (after a short spin, see the constructor): an
/// idle pool costs no CPU, and waking it costs a few microseconds, so a job should carry at least
/// tens of microseconds of work. run() does not allocate.
///
/// Thread safety: run() may be called from several threads at once; jobs that need the pool
/// threads are serialised by a mutex (one job at a time, in lock order), and a job of one task, or
/// any job on a pool of one worker, runs directly on its caller without taking the lock. Do not
/// call run() from inside a task of the same pool (it would deadlock), and do not destroy the pool
/// while a run() is in progress.
///
/// Exceptions: a task that throws on a pool thread terminates the program. One that throws on the
/// calling thread cancels the tasks not yet started, waits for the running ones, and propagates.
class ThreadPool final : public Executor {
 public:
  /// Starts num_threads - 1 threads. `spin_iterations` is how many times an idle thread (and the
  /// caller waiting for the last task) polls before sleeping; each poll is one pause instruction
  /// (tens of nanoseconds). Throws config_error if num_threads < 1 or spin_iterations < 0.
  explicit ThreadPool(Index num_threads, Index spin_iterations = kDefaultSpinIterations)
      : num_workers_(num_threads), spin_iterations_(spin_iterations) {
    if (num_threads < 1) {
      throw config_error(
          detail::concat("moe: ThreadPool num_threads = ", num_threads, ", expected at least 1"));
    }
    if (spin_iterations < 0) {
      throw config_error(detail::concat("moe: ThreadPool spin_iterations = ", spin_iterations,
                                        ", expected at least 0"));
    }
    threads_.reserve(static_cast<std::size_t>(num_threads - 1));
    try {
      for (Index worker = 1; worker < num_threads; ++worker) {
        threads_.emplace_back([this, worker] { worker_loop(worker); });
      }
    } catch (...) {
      shut_down();
      throw;
    }
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Wakes and joins the threads. No run() may be in progress.
  ~ThreadPool() override { shut_down(); }

  /// The number of threads including the caller, as given to the constructor.
  Index num_workers() const override { return num_workers_; }

  void run(Index num_tasks, FunctionRef<void(Index task, Index worker)> f) const override {
    if (num_tasks <= 0) return;
    if (num_workers_ == 1 || num_tasks == 1) {
      for (Index task = 0; task < num_tasks; ++task) f(task, 0);
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &f;
      num_tasks_ = num_tasks;
      next_task_.store(0, std::memory_order_relaxed);
      ++generation_;
      published_generation_.store(generation_, std::memory_order_release);
    }
    // Threads beyond the number of tasks would only wake up to find nothing left.
    if (num_tasks - 1 >= static_cast<Index>(threads_.size())) {
      wake_.notify_all();
    } else {
      for (Index i = 0; i < num_tasks - 1; ++i) wake_.notify_one();
    }
    try {
      work(f, num_tasks, 0);
    } catch (...) {
      next_task_.store(num_tasks, std::memory_order_relaxed);
      finish_job();
      throw;
    }
    finish_job();
  }

  /// Spin iterations used when the constructor is not told otherwise: none. A 2000-pause spin did
  /// not measurably shorten runs of 2 x 2 us tasks on the shared 2-core machine, and spinning
  /// threads take the core from others there.
  static constexpr Index kDefaultSpinIterations = 0;

 private:
  using Job = FunctionRef<void(Index, Index)>;

  void work(const Job& f, Index num_tasks, Index worker) const {
    for (;;) {
      const Index task = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (task >= num_tasks) return;
      f(task, worker);
    }
  }

  // Closes the job to late-waking threads, then waits for the threads still inside it.
  void finish_job() const {
    for (Index i = 0; i < spin_iterations_ && active_.load(std::memory_order_acquire) != 0; ++i) {
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;
    done_.wait(lock, [this] { return active_.load(std::memory_order_relaxed) == 0; });
  }

  void worker_loop(Index worker) const noexcept {
    std::uint64_t seen = 0;
    for (;;) {
      // A short poll catches back-to-back jobs without the cost of a futex sleep and wake-up.
      for (Index i = 0; i < spin_iterations_; ++i) {
        if (published_generation_.load(std::memory_order_acquire) != seen) break;
        cpu_relax();
      }
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (job_ == nullptr) continue;  // The caller already finished this job on its own.
      const Job* job = job_;
      const Index num_tasks = num_tasks_;
      active_.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      work(*job, num_tasks, worker);  // noexcept context: a throwing task terminates.
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_release) == 1) done_.notify_one();
    }
  }

  void shut_down() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
    threads_.clear();
  }

  static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  Index num_workers_;
  Index spin_iterations_;
  std::vector<std::thread> threads_;
  mutable std::mutex job_mutex_;  // Serialises run() calls that use the threads.
  mutable std::mutex mutex_;      // Guards the fields below except the atomics.
  mutable std::condition_variable wake_;
  mutable std::condition_variable done_;
  mutable const Job* job_ = nullptr;
  mutable Index num_tasks_ = 0;
  mutable std::uint64_t generation_ = 0;
  mutable bool stop_ = false;
  mutable std::atomic<std::uint64_t> published_generation_{0};
  mutable std::atomic<Index> next_task_{0};
  mutable std::atomic<Index> active_{0};  // Threads inside the current job; changed under mutex_.
};

/// Splits [0, size) into num_parts contiguous ranges whose boundaries are multiples of `granule`
/// (except the end, `size`) and returns the part-th one as [first, second). Parts differ by at most
/// one granule; trailing parts may be empty when size is small. Use it to give each task a column
/// block of a weight matrix that starts on a kernel tile.
inline std::pair<Index, Index> block_range(Index size, Index num_parts, Index part,
                                           Index granule = 1) {
  MOE_ASSERT(size >= 0 && num_parts >= 1 && part >= 0 && part < num_parts && granule >= 1);
  const Index granules = (size + granule - 1) / granule;
  const Index base = granules / num_parts;
  const Index extra = granules % num_parts;
  const Index begin = part * base + std::min(part, extra);
  const Index end = begin + base + (part < extra ? 1 : 0);
  return {std::min(begin * granule, size), std::min(end * granule, size)};
}

}  // namespace moe
