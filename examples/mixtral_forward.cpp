// Runs a Mixtral-style model (random weights by default, or a Hugging Face Mixtral / Qwen2-MoE
// checkpoint) on a token sequence: prints throughput, the tokens each expert received per layer,
// and the top-5 next-token predictions; optionally writes the logits [S x V] (float32) to a
// safetensors file under the name "logits".
//
//   mixtral_forward [--checkpoint DIR]
//                   [--weights as-stored|fp32|bf16|int8|fp8|q8|q4|mxfp4] [--exact]
//                   [--tokens 1,2,3] [--logits-out FILE] [--seq-len N] [--threads N]
//                   [--layers N] [--seed N] [--repeats N] [--prefetch 0|1]
//
// Prints the load time, `experts: <bytes> bytes resident (<format>)` (the sum of the MoE blocks'
// expert_bytes(): for as-stored views these are bytes of the mapped file, paged in only when an
// expert is chosen), `peak rss: <bytes> bytes` (VmHWM) after the runs and `read from storage:
// <bytes> bytes` (what the page cache did not already hold).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "mixtral_model.hpp"

namespace {

struct Args {
  std::string checkpoint;
  std::string logits_out;
  std::vector<example::Index> tokens;
  example::Index seq_len = 128;
  example::Index threads = 2;
  example::Index layers = 4;
  std::uint64_t seed = 42;
  int repeats = 5;
  bool prefetch = true;
  bool exact = false;
  moe::io::WeightFormat weights = moe::io::WeightFormat::as_stored;
};

moe::io::WeightFormat parse_weights(const std::string& v) {
  using F = moe::io::WeightFormat;
  for (F f : {F::as_stored, F::fp32, F::bf16, F::int8, F::fp8, F::q8, F::q4, F::mxfp4}) {
    if (v == moe::io::weight_format_name(f)) return f;
  }
  throw std::invalid_argument(
      "--weights expects as-stored, fp32, bf16, int8, fp8, q8, q4 or mxfp4, got '" + v + "'");
}

// The number after `key` in a /proc file of "key: value" lines (0 where the file or key is
// absent).
long long proc_number(const char* path, const std::string& key) {
  std::ifstream in(path);
  std::string word;
  while (in >> word) {
    if (word == key) {
      long long value = 0;
      in >> value;
      return value;
    }
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

// Peak resident set size of this process in bytes (VmHWM, in KiB in /proc/self/status).
long long peak_rss_bytes() { return proc_number("/proc/self/status", "VmHWM:") * 1024; }

// Bytes this process made the kernel read from storage (/proc/self/io read_bytes): with a cold
// page cache, what the chosen experts cost in I/O.
long long storage_read_bytes() { return proc_number("/proc/self/io", "read_bytes:"); }

long parse_int(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  long x = 0;
  try {
    x = std::stol(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty())
    throw std::invalid_argument(flag + " expects an integer, got '" + v + "'");
  return x;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf(
          "usage: mixtral_forward [--checkpoint DIR] [--weights F] [--exact]\n"
          "                       [--tokens 1,2,3] [--logits-out FILE]\n"
          "                       [--seq-len N] [--threads N] [--layers N] [--seed N]\n"
          "  --checkpoint DIR   Hugging Face Mixtral or Qwen2-MoE directory (config.json +\n"
          "                     safetensors, sharded or not); default: random weights\n"
          "  --weights F        routed experts as-stored (default: BF16 / F8_E4M3 / MXFP4\n"
          "                     experts kept as stored, viewed in the mapped file), fp32, bf16,\n"
          "                     int8, fp8, q8, q4 or mxfp4 (quantised on load, expert by expert)\n"
          "  --exact            exact products for q8 / q4 / mxfp4 (fp32 activations, bitwise\n"
          "                     the fp32 model on the dequantised weights); default: fast\n"
          "  --threads N        workers of the forward and of quantise-on-load (default 2)\n"
          "  --repeats N        timed forward passes after one warm-up (default 5)\n"
          "  --prefetch 0|1     read-ahead hint for the chosen mapped experts (default 1)\n"
          "  --logits-out FILE  write the logits [S x V] as float32 safetensors ('logits')\n");
      std::exit(0);
    }
    if (flag == "--exact") {
      a.exact = true;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    const std::string v = argv[++i];
    if (flag == "--checkpoint") {
      a.checkpoint = v;
    } else if (flag == "--logits-out") {
      a.logits_out = v;
    } else if (flag == "--tokens") {
      std::size_t start = 0;
      while (start <= v.size()) {
        const std::size_t end = std::min(v.find(',', start), v.size());
        a.tokens.push_back(parse_int(flag, v.substr(start, end - start)));
        start = end + 1;
      }
    } else if (flag == "--seq-len") {
      a.seq_len = parse_int(flag, v);
    } else if (flag == "--threads") {
      a.threads = parse_int(flag, v);
    } else if (flag == "--layers") {
      a.layers = parse_int(flag, v);
    } else if (flag == "--weights") {
      a.weights = parse_weights(v);
    } else if (flag == "--prefetch") {
      a.prefetch = parse_int(flag, v) != 0;
    } else if (flag == "--repeats") {
      a.repeats = static_cast<int>(parse_int(flag, v));
    } else if (flag == "--seed") {
      a.seed = static_cast<std::uint64_t>(parse_int(flag, v));
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  if (a.threads < 1 || a.seq_len < 1 || a.layers < 1 || a.repeats < 1) {
    throw std::invalid_argument("--threads, --seq-len, --layers and --repeats must be >= 1");
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  example::ModelConfig config;
  config.num_layers = args.layers;
  // One pool for loading (quantise-on-load converts the experts' matrices on it) and forward.
  moe::ThreadPool pool(args.threads);
  moe::io::LoadOptions options;
  options.weights = args.weights;
  options.prefetch = args.prefetch;
  options.exact = args.exact;
  options.executor = &pool;
  const auto load_start = std::chrono::steady_clock::now();
  const example::ModelWeights model =
      args.checkpoint.empty() ? example::random_model(config, args.seed, args.weights, args.exact)
                              : example::load_model(args.checkpoint, options);
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  config = model.config;
  std::vector<example::Index> ids = args.tokens;
  if (ids.empty()) {
    std::mt19937_64 rng(args.seed + 1);
    for (example::Index t = 0; t < args.seq_len; ++t) {
      ids.push_back(
          static_cast<example::Index>(rng() % static_cast<std::uint64_t>(config.vocab_size)));
    }
  }
  const std::string source = args.checkpoint.empty()
                                 ? "random weights (seed " + std::to_string(args.seed) + ")"
                                 : "checkpoint " + args.checkpoint;
  std::printf(
      "Mixtral-style model, %s: %ld layers, d_model %ld, %ld "
      "experts of d_ff %ld, top-%ld; %zu tokens, %ld threads\n",
      source.c_str(), static_cast<long>(config.num_layers), static_cast<long>(config.hidden_size),
      static_cast<long>(config.num_experts), static_cast<long>(config.intermediate_size),
      static_cast<long>(config.top_k), ids.size(), static_cast<long>(args.threads));

  std::size_t expert_bytes = 0;
  std::string format;
  for (const auto& layer : model.layers) {
    expert_bytes += layer.moe.expert_bytes();
    std::string f = moe::io::weight_format_name(layer.moe.weight_format());
    if (!layer.moe.exact()) f += ", fast";
    format = format.empty() || format == f ? f : "mixed";
  }
  std::printf("load: %.1f ms\n", load_seconds * 1e3);
  std::printf("experts: %zu bytes resident (%s)\n", expert_bytes, format.c_str());

  moe::Workspace<float> ws;
  const auto first_start = std::chrono::steady_clock::now();
  example::forward(model, ids, ws, pool);  // warm-up: grows the workspace, pages experts in
  std::printf("first forward: %.2f ms\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - first_start).count() *
                  1e3);
  example::ForwardTrace trace;
  const int repeats = args.repeats;
  const auto start = std::chrono::steady_clock::now();
  example::Matrix logits;
  for (int r = 0; r < repeats; ++r) {
    trace = {};
    logits = example::forward(model, ids, ws, pool, &trace);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
  std::printf("forward: %.2f ms for %zu tokens = %.0f tokens/s\n", seconds * 1e3, ids.size(),
              static_cast<double>(ids.size()) / seconds);
  for (std::size_t l = 0; l < trace.tokens_per_expert.size(); ++l) {
    std::printf("layer %zu tokens per expert:", l);
    for (const auto n : trace.tokens_per_expert[l]) std::printf(" %4ld", static_cast<long>(n));
    std::printf("\n");
  }
  const auto last = logits.row(logits.rows() - 1);
  std::vector<example::Index> order(static_cast<std::size_t>(last.size()));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                    [&](example::Index a, example::Index b) { return last(a) > last(b); });
  std::printf("top-5 next tokens:");
  for (int i = 0; i < 5; ++i) {
    std::printf(" %ld (%.4f)", static_cast<long>(order[std::size_t(i)]),
                last(order[std::size_t(i)]));
  }
  std::printf("\n");
  std::printf("peak rss: %lld bytes\n", peak_rss_bytes());
  std::printf("read from storage: %lld bytes\n", storage_read_bytes());
  if (!args.logits_out.empty()) {
    moe::io::write_safetensors(args.logits_out,
                               {moe::io::make_tensor("logits", logits, moe::io::Dtype::F32)});
    std::printf("logits [%ld x %ld] written to %s\n", static_cast<long>(logits.rows()),
                static_cast<long>(logits.cols()), args.logits_out.c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "mixtral_forward: %s\n", e.what());
  return 1;
}
