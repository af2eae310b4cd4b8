// Differential test: thousands of random configurations of every gating family (SoftmaxTopK,
// DeepSeek V2 / V3 group-limited, Switch / GShard capacity, noisy top-k, expert choice), expert
// kind, shared expert, batch size 0..300, float and double; the block (serial and on a 2-worker
// ThreadPool) against the scalar float64 reference. The drawing, mapping and comparison live in
// tests/reference/config_draw.hpp (shared with the libFuzzer target
// tests/fuzz/differential_fuzz.cpp).
//
// Environment: MOE_DIFF_CASES (default 5000), MOE_DIFF_SEED (the master seed), MOE_DIFF_ONLY
// (one case seed, as printed by a failure: reruns that case alone).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/config_draw.hpp"

namespace moe {
namespace {

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 0) : fallback;
}

/// SplitMix64: the seed of case i from the master seed.
std::uint64_t case_seed(std::uint64_t master, std::uint64_t i) {
  std::uint64_t z = master + 0x9e3779b97f4a7c15ULL * (i + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

TEST(Differential, BlockMatchesScalarReference) {
  const std::uint64_t master = env_u64("MOE_DIFF_SEED", 0x0d1ff5eedULL);
  const std::uint64_t only = env_u64("MOE_DIFF_ONLY", 0);
  const std::uint64_t cases = only != 0 ? 1 : env_u64("MOE_DIFF_CASES", 5000);
  const ThreadPool pool(2);
  difftest::Tally tally;
  long long per_policy[6] = {};
  int failures = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::uint64_t i = 0; i < cases && failures < 5; ++i) {
    const std::uint64_t seed = only != 0 ? only : case_seed(master, i);
    difftest::SeededSource src(seed);
    const difftest::Case c = difftest::draw_case(src);
    ++per_policy[static_cast<int>(c.policy)];
    const std::string failure = difftest::run_case(c, pool, tally);
    if (!failure.empty()) {
      ++failures;
      ADD_FAILURE() << failure << "\n  reproduce: MOE_DIFF_ONLY=0x" << std::hex << seed << std::dec
                    << " moe_unit_tests --gtest_filter=Differential.*\n  case: " << c.describe();
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "[ differential ] %lld configurations (%lld SoftmaxTopK, %lld DeepSeekV2, %lld DeepSeekV3, "
      "%lld CapacityTopK, %lld NoisyTopK, %lld ExpertChoice), %lld tokens, in %.1f s\n"
      "[ differential ] comparisons: %lld expert/kept slots, %lld logits/scores/weights, %lld "
      "output values, %lld serial-vs-pool bitwise\n"
      "[ differential ] near-ties: %lld tokens/columns relaxed, %lld actual flips, %lld capacity "
      "batches with drops skipped; worst error/tolerance: values %.3g, outputs %.3g\n",
      tally.cases, per_policy[0], per_policy[1], per_policy[2], per_policy[3], per_policy[4],
      per_policy[5], tally.tokens, seconds, tally.slot_checks, tally.value_checks,
      tally.output_checks, tally.executor_checks, tally.near_tie_tokens, tally.selection_flips,
      tally.diverged_batches, tally.max_value_ratio, tally.max_output_ratio);
  EXPECT_EQ(failures, 0);
}

}  // namespace
}  // namespace moe
