// moe_mpi_bench: expert parallelism on the local ranks of one machine.
//
//   mpirun -np R build/benchmarks/moe_mpi_bench [--quick]
//
// Part 1, the layer: an ExpertParallelBlock (float, d_model 1024, 16 experts of d_ff 512, top-2,
// contiguous placement) at 1, 8, 64 and 512 tokens per rank: the time of one layer (median over
// repeats of the slowest rank) and the bytes exchanged per token, measured (ExchangeStats) and
// checked against the formula 2 k d_model bytes_per_value minus the slots routed locally.
// Part 2, the transport: MPI_Alltoall time per message size, fitted to t = a + m / B (latency a,
// bandwidth B of one rank's outgoing bytes m), the terms docs/scale-out.md uses.
//
// Not Google Benchmark: its iteration count adapts per process, and ranks that run different
// numbers of collectives deadlock; every rank here runs the same fixed repeats in lock step.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moe/distributed/mpi.hpp"

#include <mpi.h>

namespace {

using moe::Index;
using moe::RowMatrix;
namespace dist = moe::distributed;

int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int ranks() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

/// Median over `repeats` of the slowest rank's time of f(), in seconds (after one warm-up call).
template <class F>
double time_collective(int repeats, F&& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = std::chrono::steady_clock::now();
    f();
    double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double slowest = mine;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    t.push_back(slowest);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

RowMatrix<float> random_matrix(Index rows, Index cols, std::mt19937& rng, double scale) {
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

int layer_part(bool quick) {
  const int R = ranks(), me = rank_of();
  moe::MoeConfig c;
  c.d_model = 1024, c.d_ff = 512, c.num_experts = 16, c.top_k = 2;
  const auto placement = dist::ExpertPlacement::contiguous(c.num_experts, R);
  // Replicated tensors from one seed on every rank; this rank's experts only.
  std::mt19937 rng(7);
  auto w = moe::MoeWeights<float>::zeros(c);
  w.router = random_matrix(c.num_experts, c.d_model, rng, 1.0 / 32);
  const auto& mine = placement.experts_of(me);
  moe::MoeWeights<float> local;
  local.router = w.router;
  local.experts = moe::ExpertStack<float>(Index(mine.size()), c.d_model, c.d_ff, true);
  local.experts.stacked_in() =
      random_matrix(local.experts.stacked_in().rows(), c.d_model, rng, 1.0 / 32);
  local.experts.stacked_out() =
      random_matrix(local.experts.stacked_out().rows(), c.d_ff, rng, 1.0 / 23);
  int failures = 0;
  for (const bool bf16 : {false, true}) {
    dist::ExchangeOptions exchange;
    exchange.bf16_rows = bf16;
    const dist::ExpertParallelBlock<float> block(MPI_COMM_WORLD, c, placement, local, {}, exchange);
    dist::ExpertParallelWorkspace<float> ws;
    for (const Index tokens : {Index(1), Index(8), Index(64), Index(512)}) {
      std::mt19937 xrng(100 + static_cast<unsigned>(me));
      const RowMatrix<float> x = random_matrix(tokens, c.d_model, xrng, 1.0);
      RowMatrix<float> y(tokens, c.d_model);
      const int repeats = quick ? 3 : (tokens >= 512 ? 7 : 21);
      const double seconds = time_collective(repeats, [&] { block.forward(x, y, ws); });
      const dist::ExchangeStats& s = ws.stats();
      const std::int64_t formula = 2 * (c.top_k * tokens - s.local_slots) * c.d_model *
                                   s.bytes_per_value;  // no drops: every slot is kept
      failures += s.token_bytes == formula ? 0 : 1;
      // Bytes per token over all ranks (ranks route different numbers of slots locally).
      std::int64_t bytes = s.token_bytes, all_bytes = 0;
      MPI_Allreduce(&bytes, &all_bytes, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
      // Exchange time of the last call, slowest rank; the largest bytes one rank sent out.
      double exchange = s.exchange_seconds, slowest_exchange = 0;
      MPI_Allreduce(&exchange, &slowest_exchange, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      std::int64_t out = s.token_bytes / 2, max_out = 0;
      MPI_Allreduce(&out, &max_out, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
      if (me == 0) {
        const double per_token = double(all_bytes) / double(tokens * R);
        std::printf(
            "layer ranks=%d rows=%s tokens/rank=%4ld  %9.3f ms/layer  exchange %8.3f ms "
            "(%8ld B out/rank/direction)  %6.0f bytes/token (all remote: %ld)  %s\n",
            R, bf16 ? "bf16" : "fp32", static_cast<long>(tokens), seconds * 1e3,
            slowest_exchange * 1e3, static_cast<long>(max_out), per_token,
            static_cast<long>(2 * c.top_k * c.d_model * s.bytes_per_value),
            s.token_bytes == formula ? "formula ok" : "FORMULA MISMATCH");
      }
    }
  }
  return failures;
}

void transport_part(bool quick) {
  const int R = ranks(), me = rank_of();
  if (R == 1) return;
  for (std::int64_t per_pair = 64; per_pair <= (std::int64_t(1) << 22); per_pair *= 4) {
    std::vector<char> send(static_cast<std::size_t>(per_pair * R), 1), recv(send.size());
    const int repeats = quick ? 3 : 21;
    const double seconds = time_collective(repeats, [&] {
      MPI_Alltoall(send.data(), static_cast<int>(per_pair), MPI_CHAR, recv.data(),
                   static_cast<int>(per_pair), MPI_CHAR, MPI_COMM_WORLD);
    });
    if (me == 0) {
      const double out = double(per_pair) * (R - 1);  // bytes leaving one rank
      std::printf("alltoall ranks=%d bytes/pair=%8ld  %9.1f us  %7.2f GB/s out per rank\n", R,
                  static_cast<long>(per_pair), seconds * 1e6, out / seconds / 1e9);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int failures = 0;
  try {
    failures = layer_part(quick);
    transport_part(quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_mpi_bench: %s\n", e.what());
    failures = 1;
  }
  int any = 0;
  MPI_Allreduce(&failures, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any == 0 ? 0 : 1;
}
