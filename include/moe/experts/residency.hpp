// moe: how much each routed expert is used, and where its weights live, for experts viewed in a
// memory-mapped checkpoint (io::LoadOptions::weights = as_stored). The block reports every
// routing here before the expert products: the chosen experts' pages are hinted to the kernel
// (madvise MADV_WILLNEED) so their reads from disk overlap the first experts' compute, and their
// usage counters grow, so that a caller can pin the hot ones (lock()).
//
// Why it exists: an expert that is never chosen should cost no RAM. A mapped expert's pages are
// read on first touch and are page cache afterwards (clean, file-backed: the kernel may drop them
// under memory pressure and read them again later), so a model whose experts exceed the RAM still
// runs, at the speed of the disk for the experts that are not resident.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define MOE_HAVE_MADVISE 1
#else
#define MOE_HAVE_MADVISE 0
#endif

namespace moe {

/// Per-expert usage counters and memory ranges of the routed experts of one layer. Shared (by
/// shared_ptr) between the copies of a CompactExpertStack; thread-safe: the counters are relaxed
/// atomics, the ranges are immutable after loading.
class ExpertResidency {
 public:
  /// One contiguous piece of an expert's weights (codes or scales).
  struct Range {
    const void* data = nullptr;
    std::size_t bytes = 0;
  };

  /// num_experts experts with no ranges yet. `mapped`: the ranges lie in a memory-mapped file,
  /// so routed() hints their pages (prefetch true) to the kernel; else it only counts.
  ExpertResidency(Index num_experts, bool mapped, bool prefetch = true)
      : ranges_(std::size_t(std::max<Index>(num_experts, 0))),
        usage_(new std::atomic<std::uint64_t>[std::size_t(std::max<Index>(num_experts, 0))]),
        mapped_(mapped),
        prefetch_(prefetch) {
    for (std::size_t e = 0; e < ranges_.size(); ++e) usage_[e].store(0, std::memory_order_relaxed);
  }

  Index num_experts() const { return Index(ranges_.size()); }
  /// True when the experts' weights are views of a memory-mapped file.
  bool mapped() const { return mapped_; }

  /// Records a range of expert e's weights (while loading). Throws config_error for e out of range.
  void add_range(Index e, const void* data, std::size_t bytes) {
    check(e);
    if (bytes > 0) ranges_[std::size_t(e)].push_back({data, bytes});
  }
  /// The ranges of expert e's weights (codes, then scales, per matrix).
  const std::vector<Range>& ranges(Index e) const {
    check(e);
    return ranges_[std::size_t(e)];
  }

  /// Called by the block after routing, before the expert products: counts[e] rows were routed
  /// to expert e (counts has num_experts() entries). Adds them to the usage counters and, for
  /// mapped experts, asks the kernel to read the pages of every chosen expert ahead
  /// (MADV_WILLNEED; asynchronous, a no-op for pages already resident). Cost: one relaxed atomic
  /// add per chosen expert and, when mapped, one madvise per range (the kernel looks up each page
  /// of the range in its page cache). Never throws: a failed hint is ignored.
  void routed(const Index* counts) const {
    for (std::size_t e = 0; e < ranges_.size(); ++e) {
      if (counts[e] <= 0) continue;
      usage_[e].fetch_add(std::uint64_t(counts[e]), std::memory_order_relaxed);
      if (mapped_ && prefetch_) advise(ranges_[e]);
    }
  }

  /// Rows (token slots) routed to each expert since loading (or reset_usage()).
  std::vector<std::uint64_t> usage_counts() const {
    std::vector<std::uint64_t> out(ranges_.size());
    for (std::size_t e = 0; e < out.size(); ++e) out[e] = usage_[e].load(std::memory_order_relaxed);
    return out;
  }
  /// Sets every usage counter to 0.
  void reset_usage() const {
    for (std::size_t e = 0; e < ranges_.size(); ++e) usage_[e].store(0, std::memory_order_relaxed);
  }

  /// Pins expert e's pages in RAM (mlock of its ranges, page-aligned): they are read now and
  /// never dropped while locked. Returns false when the system refuses (RLIMIT_MEMLOCK, no
  /// permission); what was locked before the failure stays locked until unlock(e). Throws
  /// config_error for e out of range.
  bool lock(Index e) const {
#if MOE_HAVE_MADVISE
    for (const Range& r : ranges(e)) {
      const auto [p, n] = page_span(r);
      if (::mlock(p, n) != 0) return false;
    }
    return true;
#else
    (void)e;
    return false;
#endif
  }
  /// Undoes lock(e). Returns false when the system refuses.
  bool unlock(Index e) const {
#if MOE_HAVE_MADVISE
    bool ok = true;
    for (const Range& r : ranges(e)) {
      const auto [p, n] = page_span(r);
      ok = ::munlock(p, n) == 0 && ok;
    }
    return ok;
#else
    (void)e;
    return false;
#endif
  }

 private:
  void check(Index e) const {
    if (e < 0 || e >= num_experts()) {
      throw config_error(
          detail::concat("moe: expert index ", e, " out of range [0, ", num_experts(), ")"));
    }
  }

#if MOE_HAVE_MADVISE
  struct Span {
    void* p;
    std::size_t n;
  };
  static Span page_span(const Range& r) {
    static const std::uintptr_t page = std::uintptr_t(::sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<std::uintptr_t>(r.data) & ~(page - 1);
    const auto end = reinterpret_cast<std::uintptr_t>(r.data) + r.bytes;
    // madvise takes a page-aligned address: rounding the pointer down needs the integer round trip.
    return {reinterpret_cast<void*>(begin), std::size_t(end - begin)};  // NOLINT(performance-no-int-to-ptr)
  }
#endif

  static void advise(const std::vector<Range>& ranges) {
#if MOE_HAVE_MADVISE
    for (const Range& r : ranges) {
      const Span s = page_span(r);
      (void)::madvise(s.p, s.n, MADV_WILLNEED);
    }
#else
    (void)ranges;
#endif
  }

  std::vector<std::vector<Range>> ranges_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> usage_;
  bool mapped_ = false, prefetch_ = true;
};

}  // namespace moe
