// moe/io: the conversions of a load run as tasks on LoadOptions::executor, with the errors a
// serial load would report.
#pragma once

#include <atomic>
#include <exception>
#include <vector>

#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe::io::detail {

// Runs f(k) for k in [0, count) on `executor` (serial when null) and rethrows the exception of
// the lowest k that threw, as a serial loop stopping at its first error would: a task starts only
// while no lower task has failed, so every task below the reported one ran. Tasks never throw
// into the pool (a ThreadPool thread must not throw).
template <class F>
void run_load_tasks(const Executor* executor, Index count, const F& f) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(count));
  std::atomic<Index> first_error{count};
  auto task = [&](Index k, Index) {
    if (k > first_error.load(std::memory_order_relaxed)) return;
    try {
      f(k);
    } catch (...) {
      errors[static_cast<std::size_t>(k)] = std::current_exception();
      Index seen = first_error.load(std::memory_order_relaxed);
      while (k < seen && !first_error.compare_exchange_weak(seen, k)) {
      }
    }
  };
  (executor != nullptr ? *executor : serial_executor()).run(count, task);
  const Index k = first_error.load();
  if (k < count) std::rethrow_exception(errors[static_cast<std::size_t>(k)]);
}

}  // namespace moe::io::detail
