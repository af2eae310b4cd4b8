// libFuzzer target: the differential comparison of tests/differential_test.cpp (block vs the
// scalar float64 reference, serial and on a 2-worker ThreadPool) on a configuration decoded from
// the fuzz bytes (FuzzedDataProvider: policy, sizes, options, data seeds), then up to 64 x values
// taken from the remaining bytes (a byte b becomes (b - 128) / 32: exact in float, so equal bytes
// make exact ties). Aborts on any mismatch, printing the case.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "moe/moe.hpp"

#include "reference/config_draw.hpp"
#include <fuzzer/FuzzedDataProvider.h>

namespace {

/// The draws of difftest::draw_case from the fuzz bytes (zeros once they run out).
struct FuzzSource {
  FuzzedDataProvider& bytes;
  moe::Index range(moe::Index lo, moe::Index hi) {
    return bytes.ConsumeIntegralInRange<moe::Index>(lo, hi);
  }
  double unit() { return bytes.ConsumeProbability<double>(); }
  std::uint64_t bits() { return bytes.ConsumeIntegral<std::uint64_t>(); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const moe::ThreadPool pool(2);
  FuzzedDataProvider bytes(data, size);
  FuzzSource src{bytes};
  moe::difftest::Case c = moe::difftest::draw_case(src);
  while (bytes.remaining_bytes() > 0 && c.x_prefix.size() < 64) {
    c.x_prefix.push_back((static_cast<double>(bytes.ConsumeIntegral<std::uint8_t>()) - 128) / 32);
  }
  moe::difftest::Tally tally;
  const std::string failure = moe::difftest::run_case(c, pool, tally);
  if (!failure.empty()) {
    std::fprintf(stderr, "differential mismatch: %s\n  case: %s\n", failure.c_str(),
                 c.describe().c_str());
    std::abort();
  }
  return 0;
}
