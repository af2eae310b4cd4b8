// No heap allocation of ours once the workspace is warm: a counting global operator new, active
// only while `counting` is set (this file is linked into the single test executable, so every
// other test allocates as usual). Counts allocations on every thread, pool workers included.
//
// Decode (1 token) and small batches (<= kernels::small_batch_rows rows per expert) must allocate
// nothing, serially and on a ThreadPool. Larger batches run Eigen's blocked GEMM, which allocates
// its packing buffers with std::malloc (not operator new) once they exceed
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB): on glibc without a sanitizer, malloc itself is
// interposed here too (forwarding to __libc_malloc), so those are counted, printed, and bounded.
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "test_util.hpp"

// glibc lets a program define malloc and friends; sanitizers interpose them themselves.
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && \
    !defined(__has_feature)
#define MOE_INTERPOSE_MALLOC 1
#elif defined(__GLIBC__) && defined(__has_feature)
#if !__has_feature(address_sanitizer) && !__has_feature(thread_sanitizer) && \
    !__has_feature(memory_sanitizer)
#define MOE_INTERPOSE_MALLOC 1
#endif
#endif

namespace {

std::atomic<bool> counting{false};
std::atomic<long> allocations{0};    // operator new
std::atomic<long> c_allocations{0};  // malloc and friends (Eigen), operator new included
#ifdef MOE_INTERPOSE_MALLOC
constexpr bool malloc_interposed = true;
#else
constexpr bool malloc_interposed = false;
#endif

// Not inlined: GCC would otherwise pair the inlined malloc in operator new with the free in
// operator delete and report a new/free mismatch.
[[gnu::noinline]] void* counted_alloc(std::size_t size, std::size_t align) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1);
  if (size == 0) size = 1;
  void* p = nullptr;
  if (align <= alignof(std::max_align_t)) {
    p = std::malloc(size);
  } else {
    p = std::aligned_alloc(align, (size + align - 1) / align * align);
  }
  return p;
}

[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }

/// Counts the allocations made while it is alive.
class AllocationCounter {
 public:
  AllocationCounter() {
    allocations.store(0);
    c_allocations.store(0);
    counting.store(true);
  }
  ~AllocationCounter() { counting.store(false); }
  /// Calls of operator new.
  long count() const { return allocations.load(); }
  /// Calls of malloc / calloc / realloc / aligned allocation (-1 where not interposed).
  long malloc_count() const { return malloc_interposed ? c_allocations.load() : -1; }
};

}  // namespace

#ifdef MOE_INTERPOSE_MALLOC
extern "C" {
void* __libc_malloc(std::size_t) noexcept;
void* __libc_calloc(std::size_t, std::size_t) noexcept;
void* __libc_realloc(void*, std::size_t) noexcept;
void* __libc_memalign(std::size_t, std::size_t) noexcept;
void __libc_free(void*) noexcept;

void* malloc(std::size_t size) noexcept {
  if (counting.load(std::memory_order_relaxed)) c_allocations.fetch_add(1);
  return __libc_malloc(size);
}
void* calloc(std::size_t n, std::size_t size) noexcept {
  if (counting.load(std::memory_order_relaxed)) c_allocations.fetch_add(1);
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t size) noexcept {
  if (counting.load(std::memory_order_relaxed)) c_allocations.fetch_add(1);
  return __libc_realloc(p, size);
}
void* memalign(std::size_t align, std::size_t size) noexcept {
  if (counting.load(std::memory_order_relaxed)) c_allocations.fetch_add(1);
  return __libc_memalign(align, size);
}
void* aligned_alloc(std::size_t align, std::size_t size) noexcept { return memalign(align, size); }
int posix_memalign(void** out, std::size_t align, std::size_t size) noexcept {
  void* p = memalign(align, size);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) noexcept { __libc_free(p); }
}
#endif

void* operator new(std::size_t size) {
  void* p = counted_alloc(size, alignof(std::max_align_t));
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new(std::size_t size, std::align_val_t align) {
  void* p = counted_alloc(size, static_cast<std::size_t>(align));
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t size, std::align_val_t align) { return operator new(size, align); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size, alignof(std::max_align_t));
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size, alignof(std::max_align_t));
}
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }

namespace moe {
namespace {

MoeConfig config(Index shared_d_ff = 0) {
  MoeConfig c;
  c.d_model = 256;
  c.d_ff = 320;
  c.num_experts = 8;
  c.top_k = 2;
  c.shared_d_ff = shared_d_ff;
  c.shared_expert_gate = shared_d_ff > 0;
  return c;
}

struct Counts {
  long news, mallocs;  // mallocs: -1 where malloc is not interposed
};

// Forward `tokens` tokens after warming the workspace with the same batch size; returns the
// allocations of the measured call.
Counts allocations_of_forward(const SparseMoeBlock<float>& block, Index tokens, const Executor& ex,
                              bool training = false) {
  std::mt19937_64 rng(static_cast<std::uint64_t>(tokens));
  const RowMatrix<float> warm = test::random_matrix<float>(tokens, block.config().d_model, rng);
  const RowMatrix<float> x = test::random_matrix<float>(tokens, block.config().d_model, rng);
  RowMatrix<float> y(tokens, block.config().d_model);
  Workspace<float> ws;
  ws.set_training(training);
  block.forward(warm, y, ws, ex);
  AllocationCounter counter;
  block.forward(x, y, ws, ex);
  return {counter.count(), counter.malloc_count()};
}

TEST(Allocation, CounterSeesAllocations) {
  AllocationCounter counter;
  auto p = std::make_unique<int>(3);
  EXPECT_EQ(counter.count(), 1);
}

TEST(Allocation, DecodeAndSmallBatchesAllocateNothing) {
  std::mt19937_64 rng(1);
  ThreadPool pool(2);
  for (Index shared : {Index(0), Index(96)}) {
    const MoeConfig c = config(shared);
    const SparseMoeBlock<float> block(c, test::random_weights<float>(c, rng));
    // At most 16 tokens: no expert can receive more than small_batch_rows rows.
    for (Index tokens : {1, 2, 8, 16}) {
      ASSERT_LE(tokens, kernels::small_batch_rows);
      for (bool training : {false, true}) {
        for (const Executor* ex : {&serial_executor(), static_cast<const Executor*>(&pool)}) {
          const Counts n = allocations_of_forward(block, tokens, *ex, training);
          EXPECT_EQ(n.news, 0) << tokens << " tokens, workers " << ex->num_workers() << ", shared "
                               << shared << ", training " << training;
          EXPECT_LE(n.mallocs, 0) << tokens << " tokens, workers " << ex->num_workers()
                                  << ", shared " << shared << ", training " << training;
        }
      }
    }
  }
}

// Large batches: the experts run on Eigen's GEMM, whose packing buffers go to the heap above
// EIGEN_STACK_ALLOCATION_LIMIT. Measured and printed (a handful per GEMM call, none of ours).
TEST(Allocation, LargeBatchesOnlyEigenPacking) {
  std::mt19937_64 rng(2);
  const MoeConfig c = config();
  const SparseMoeBlock<float> block(c, test::random_weights<float>(c, rng));
  ThreadPool pool(2);
  for (Index tokens : {64, 256}) {
    const Counts serial = allocations_of_forward(block, tokens, serial_executor());
    const Counts pooled = allocations_of_forward(block, tokens, pool);
    std::printf(
        "[ allocations ] %ld tokens (about %ld rows per expert): operator new %ld serial, "
        "%ld on 2 threads; malloc (Eigen GEMM packing) %ld serial, %ld on 2 threads\n",
        static_cast<long>(tokens), static_cast<long>(tokens * c.top_k / c.num_experts), serial.news,
        pooled.news, serial.mallocs, pooled.mallocs);
    EXPECT_EQ(serial.news, 0);
    EXPECT_EQ(pooled.news, 0);
    // Eigen allocates at most its two packing blocks per product call: per expert, 2 products in
    // each of the 2 input-phase tasks (d_ff 320 = 2 blocks) and 1 in the output phase.
    EXPECT_LE(serial.mallocs, 2 * 5 * c.num_experts);
    EXPECT_LE(pooled.mallocs, 2 * 5 * c.num_experts);
  }
}

// Workspace::reserve sizes a cold workspace once: every forward of at most that many tokens then
// allocates nothing of ours, from the first call on (no warm-up), serially and on a pool, with a
// shared expert and in training mode. Without reserve the first call allocates (the control).
TEST(Allocation, NothingAfterReserve) {
  std::mt19937_64 rng(3);
  ThreadPool pool(2);
  for (Index shared : {Index(0), Index(96)}) {
    const MoeConfig c = config(shared);
    const SparseMoeBlock<float> block(c, test::random_weights<float>(c, rng));
    for (bool training : {false, true}) {
      for (const Executor* ex : {&serial_executor(), static_cast<const Executor*>(&pool)}) {
        const Index max_tokens = 129;
        Workspace<float> ws;
        ws.set_training(training);
        ws.reserve(c, max_tokens, ex->num_workers());
        const std::size_t reserved = ws.bytes();
        for (Index tokens : {max_tokens, Index(1), Index(7), Index(31), max_tokens}) {
          const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
          RowMatrix<float> y(tokens, c.d_model);
          long news = 0;
          {
            AllocationCounter counter;
            block.forward(x, y, ws, *ex);
            news = counter.count();
          }
          EXPECT_EQ(news, 0) << tokens << " tokens, workers " << ex->num_workers() << ", shared "
                             << shared << ", training " << training;
        }
        EXPECT_EQ(ws.bytes(), reserved) << "the forwards grew the reserved workspace";
        Workspace<float> cold;
        cold.set_training(training);
        const RowMatrix<float> x = test::random_matrix<float>(max_tokens, c.d_model, rng);
        RowMatrix<float> y(max_tokens, c.d_model);
        AllocationCounter counter;
        block.forward(x, y, cold, *ex);
        EXPECT_GT(counter.count(), 0) << "control: a cold workspace must allocate";
      }
    }
  }
}

// SparseMoeBlock::reserve knows the gating's slots and the storage's decode scratch: expert
// choice (slots = num_experts) and compact prefill (per-worker decoded tiles) included.
TEST(Allocation, NothingAfterBlockReserve) {
  std::mt19937_64 rng(4);
  ThreadPool pool(2);
  const MoeConfig c = config(64);
  const SparseMoeBlock<float, gating::Mixtral, SwiGLU, CompactExperts<Fp8E4M3>> compact(
      c, test::random_weights<float>(c, rng));
  const SparseMoeBlock<float, gating::ExpertChoice> choice(c, test::random_weights<float>(c, rng));
  for (const Executor* ex : {&serial_executor(), static_cast<const Executor*>(&pool)}) {
    Workspace<float> ws_compact, ws_choice;
    compact.reserve(ws_compact, 200, ex->num_workers());
    choice.reserve(ws_choice, 200, ex->num_workers());
    for (Index tokens : {Index(200), Index(1), Index(31)}) {
      const RowMatrix<float> x = test::random_matrix<float>(tokens, c.d_model, rng);
      RowMatrix<float> y(tokens, c.d_model);
      long news_compact = 0, news_choice = 0;
      {
        AllocationCounter counter;
        compact.forward(x, y, ws_compact, *ex);
        news_compact = counter.count();
      }
      {
        AllocationCounter counter;
        choice.forward(x, y, ws_choice, *ex);
        news_choice = counter.count();
      }
      EXPECT_EQ(news_compact, 0) << tokens << " tokens, workers " << ex->num_workers();
      EXPECT_EQ(news_choice, 0) << tokens << " tokens, workers " << ex->num_workers();
    }
  }
}

TEST(Allocation, ReserveRejectsBadArguments) {
  Workspace<float> ws;
  test::expect_error<config_error>([&] { ws.reserve(config(), -1); },
                                   "moe: reserve: max_tokens = -1 must be >= 0");
  test::expect_error<config_error>([&] { ws.reserve(config(), 4, 0); },
                                   "moe: reserve: num_workers = 0 must be >= 1");
}

}  // namespace
}  // namespace moe
