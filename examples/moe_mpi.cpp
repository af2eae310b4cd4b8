// Runs a Hugging Face Mixtral / Qwen2-MoE checkpoint with its routed experts spread over the ranks
// of an MPI job (expert parallelism) and prints one line, `checksum: <16 hex digits>`, the FNV-1a
// hash of the logits' bytes: the same for every number of ranks, and the same as the
// single-process model (--single) computes.
//
//   mpirun -np N moe_mpi --checkpoint DIR --tokens 1,42,7 [--placement contiguous|round_robin]
//                        [--bf16-rows] [--threads N]
//   moe_mpi --single --checkpoint DIR --tokens 1,42,7      (no MPI exchange: SparseMoeBlock)
//
// Every rank runs attention, norms and the LM head on the whole sequence (replicated: the point
// here is the MoE layer); each MoE layer runs on an even slice of the tokens per rank, its experts
// sharded by the placement, and the slices' outputs are all-gathered before the residual add.
// Loading: the MoE layers' shards come from moe::io::load_moe_shard (each rank reads only its
// experts); the rest of the model (attention, norms, embeddings) from examples/mixtral_model.hpp's
// loader, which also builds full single-process blocks (used by --single; a real deployment would
// load the non-MoE weights alone).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/distributed/mpi.hpp"

#include "mixtral_model.hpp"
#include <mpi.h>

namespace {

using example::Index;
using example::Matrix;
using EpBlock = moe::distributed::ExpertParallelBlock<float, moe::gating::Mixtral, moe::SwiGLU>;

struct Args {
  std::string checkpoint;
  std::vector<Index> tokens;
  std::string placement = "contiguous";
  bool bf16_rows = false;
  bool single = false;
  Index threads = 1;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--single") {
      a.single = true;
      continue;
    }
    if (flag == "--bf16-rows") {
      a.bf16_rows = true;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument("moe_mpi: " + flag + " needs a value");
    const std::string v = argv[++i];
    if (flag == "--checkpoint") {
      a.checkpoint = v;
    } else if (flag == "--tokens") {
      std::size_t start = 0;
      while (start < v.size()) {
        const std::size_t end = std::min(v.find(',', start), v.size());
        a.tokens.push_back(std::stol(v.substr(start, end - start)));
        start = end + 1;
      }
    } else if (flag == "--placement") {
      a.placement = v;
    } else if (flag == "--threads") {
      a.threads = std::stol(v);
    } else {
      throw std::invalid_argument("moe_mpi: unknown flag " + flag);
    }
  }
  if (a.checkpoint.empty() || a.tokens.empty()) {
    throw std::invalid_argument(
        "usage: mpirun -np N moe_mpi --checkpoint DIR --tokens 1,2,3 "
        "[--placement contiguous|round_robin] [--bf16-rows] [--threads N] [--single]");
  }
  if (a.placement != "contiguous" && a.placement != "round_robin") {
    throw std::invalid_argument("moe_mpi: --placement must be contiguous or round_robin, got '" +
                                a.placement + "'");
  }
  return a;
}

/// FNV-1a, 64 bits, of the logits' bytes.
std::uint64_t checksum(const Matrix& m) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(m.data());
  for (std::size_t i = 0; i < sizeof(float) * static_cast<std::size_t>(m.size()); ++i) {
    h = (h ^ p[i]) * 1099511628211ull;
  }
  return h;
}

/// example::forward with every MoE layer replaced by its expert-parallel shard: this rank runs
/// rows [offset, offset + count) through the layer, then the slices are all-gathered.
Matrix forward_ep(const example::ModelWeights& w, const std::vector<EpBlock>& moe_layers,
                  const std::vector<Index>& ids, const std::vector<int>& rows_of,
                  const std::vector<int>& first_row_of, int rank, const moe::Executor& executor) {
  const example::ModelConfig& c = w.config;
  const Index S = static_cast<Index>(ids.size());
  Matrix h(S, c.hidden_size);
  for (Index t = 0; t < S; ++t) {
    const Index id = ids[static_cast<std::size_t>(t)];
    if (id < 0 || id >= c.vocab_size) {
      throw moe::error(
          example::cat("example: token id ", id, " outside [0, ", c.vocab_size, ")"));
    }
    h.row(t) = w.embed_tokens.row(id);
  }
  const Index offset = first_row_of[std::size_t(rank)], count = rows_of[std::size_t(rank)];
  Matrix normed, moe_out(S, c.hidden_size);
  Matrix mine_out(count, c.hidden_size);
  moe::distributed::ExpertParallelWorkspace<float> ws;
  MPI_Datatype row;
  MPI_Type_contiguous(static_cast<int>(c.hidden_size), MPI_FLOAT, &row);
  MPI_Type_commit(&row);
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    const example::LayerWeights& layer = w.layers[l];
    example::rms_norm(h, layer.input_norm, c.rms_norm_eps, normed);
    h += example::attention(normed, layer, c);
    example::rms_norm(h, layer.post_attention_norm, c.rms_norm_eps, normed);
    const Matrix mine_in = normed.middleRows(offset, count);
    moe_layers[l].forward(mine_in, mine_out, ws, executor);
    MPI_Allgatherv(mine_out.data(), static_cast<int>(count), row, moe_out.data(), rows_of.data(),
                   first_row_of.data(), row, MPI_COMM_WORLD);
    h += moe_out;
  }
  MPI_Type_free(&row);
  example::rms_norm(h, w.final_norm, c.rms_norm_eps, normed);
  return normed * w.lm_head.transpose();
}

int run(int argc, char** argv) {
  int rank = 0, num_ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &num_ranks);
  Args args;
  example::ModelWeights model;
  std::vector<EpBlock> layers;
  // Loading and sharding: any rank's failure (bad flag, missing file) is every rank's error.
  moe::distributed::agree(MPI_COMM_WORLD, [&] {
    args = parse(argc, argv);
    model = example::load_model(args.checkpoint);
  });
  moe::ThreadPool pool(args.threads);
  Matrix logits;
  if (args.single) {
    moe::Workspace<float> ws;
    logits = example::forward(model, args.tokens, ws, pool);
  } else {
    const example::ModelConfig& c = model.config;
    const auto placement =
        args.placement == "contiguous"
            ? moe::distributed::ExpertPlacement::contiguous(c.num_experts, num_ranks)
            : moe::distributed::ExpertPlacement::round_robin(c.num_experts, num_ranks);
    moe::distributed::ExchangeOptions exchange;
    exchange.bf16_rows = args.bf16_rows;
    // This rank's shard of every MoE layer: replicated router / shared expert, and only the
    // experts the placement gives it, read from the checkpoint (io's LoadOptions::experts).
    moe::io::LoadOptions load;
    load.experts = placement.experts_of(rank);
    // Reading is local (no collective inside agree()); building the blocks is collective.
    std::vector<moe::io::MoeShard<float>> shards;
    moe::distributed::agree(MPI_COMM_WORLD, [&] {
      const moe::io::ModelCheckpoint ckpt = moe::io::ModelCheckpoint::open(args.checkpoint);
      for (Index l = 0; l < c.num_layers; ++l) {
        shards.push_back(moe::io::load_moe_shard<float>(ckpt, l, load));
      }
    });
    for (auto& shard : shards) {
      const auto options = shard.gating_options<moe::gating::Mixtral>();
      layers.emplace_back(MPI_COMM_WORLD, shard.config(), placement, std::move(shard.weights),
                          options, exchange);
    }
    const Index S = static_cast<Index>(args.tokens.size());
    std::vector<int> rows_of(static_cast<std::size_t>(num_ranks));
    std::vector<int> first_row_of(static_cast<std::size_t>(num_ranks));
    for (int r = 0, at = 0; r < num_ranks; ++r) {
      rows_of[std::size_t(r)] = static_cast<int>(S / num_ranks + (r < S % num_ranks ? 1 : 0));
      first_row_of[std::size_t(r)] = at;
      at += rows_of[std::size_t(r)];
    }
    logits = forward_ep(model, layers, args.tokens, rows_of, first_row_of, rank, pool);
  }
  // Every rank computed the same logits; say so, then rank 0 prints.
  const std::uint64_t h = checksum(logits);
  std::uint64_t lo = h, hi = h;
  MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    if (lo != hi) {
      std::fprintf(stderr, "moe_mpi: the ranks computed different logits\n");
      return 1;
    }
    std::printf("checksum: %016llx\n", static_cast<unsigned long long>(h));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    status = run(argc, argv);
  } catch (const std::exception& e) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) std::fprintf(stderr, "moe_mpi: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
