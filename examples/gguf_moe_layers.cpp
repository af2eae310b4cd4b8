// Runs the MoE layers of a GGUF file (llama.cpp's format) one by one on the same hidden states and
// prints, per layer, the expert tensors' types, load and forward times and a checksum of the
// output, so that a run can be compared with llama.cpp on the same bytes. The hidden states are
// seeded N(0, 1) draws [tokens x d_model] (the example has no attention for these models).
//
//   gguf_moe_layers FILE [--tokens N] [--seed N] [--threads N] [--layer L]
//   gguf_moe_layers --write-demo FILE     writes a small random qwen3moe file (Q4_K gate/up,
//                                         Q6_K down, F32 router) to try it on
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/io/gguf.hpp"
#include "moe/io/gguf_moe.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
using moe::io::GgmlType;

struct Args {
  std::string file, demo;
  Index tokens = 16, threads = 2, layer = -1;
  unsigned seed = 42;
};

Index parse_int(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size()) {
    throw std::invalid_argument(flag + " expects an integer, got '" + v + "'");
  }
  return static_cast<Index>(x);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf(
          "usage: gguf_moe_layers FILE [--tokens N] [--seed N] [--threads N] [--layer L]\n"
          "       gguf_moe_layers --write-demo FILE\n");
      std::exit(0);
    }
    if (flag.rfind("--", 0) != 0) {
      a.file = flag;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    const std::string v = argv[++i];
    if (flag == "--tokens") {
      a.tokens = parse_int(flag, v);
    } else if (flag == "--seed") {
      a.seed = static_cast<unsigned>(parse_int(flag, v));
    } else if (flag == "--threads") {
      a.threads = parse_int(flag, v);
    } else if (flag == "--layer") {
      a.layer = parse_int(flag, v);
    } else if (flag == "--write-demo") {
      a.demo = v;
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  if (a.file.empty() && a.demo.empty()) throw std::invalid_argument("no GGUF file given");
  if (a.tokens < 1 || a.threads < 1)
    throw std::invalid_argument("--tokens, --threads must be >= 1");
  return a;
}

/// Two sparse layers of a qwen3moe model with d_model = d_ff = 256, 8 experts, top 2.
void write_demo(const std::string& path) {
  const Index D = 256, F = 256, E = 8;
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 0.05f);
  auto draw = [&](Index n) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = g(rng);
    return v;
  };
  moe::io::GgufWriter w;
  w.set("general.architecture", "qwen3moe").set("general.name", "moe demo");
  w.set<std::uint32_t>("qwen3moe.block_count", 2)
      .set<std::uint32_t>("qwen3moe.embedding_length", D);
  w.set<std::uint32_t>("qwen3moe.expert_count", E)
      .set<std::uint32_t>("qwen3moe.expert_used_count", 2);
  w.set<std::uint32_t>("qwen3moe.expert_feed_forward_length", F);
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "blk." + std::to_string(layer) + ".";
    const auto router = draw(E * D);
    w.add_f32(p + "ffn_gate_inp.weight", router.data(), E, D);
    for (const char* name : {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}) {
      const bool down = std::string(name) == "ffn_down_exps";
      const auto x = draw(E * F * D);
      std::vector<unsigned char> q(static_cast<std::size_t>(E * F * D / 256) * (down ? 210 : 144));
      (down ? moe::kernels::quantize_q6_k : moe::kernels::quantize_q4_k)(x.data(), E * F * D,
                                                                         q.data());
      w.add_tensor(p + name + ".weight", down ? GgmlType::Q6_K : GgmlType::Q4_K,
                   {down ? F : D, down ? D : F, E}, q.data(), q.size());
    }
  }
  w.write(path);
  std::printf("wrote %s\n", path.c_str());
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class Block>
RowMatrix<float> run(const moe::io::GgufFile& f, const moe::io::GgufMoeSpec& spec, Index layer,
                     const RowMatrix<float>& x, const moe::Executor& pool, double& load_s,
                     double& fwd_s) {
  auto t0 = std::chrono::steady_clock::now();
  const Block block = moe::io::load_gguf_moe_layer<Block>(f, spec, layer);
  load_s = seconds_since(t0);
  RowMatrix<float> y(x.rows(), x.cols());
  moe::Workspace<float> ws;
  t0 = std::chrono::steady_clock::now();
  block.forward(x, y, ws, pool);
  fwd_s = seconds_since(t0);
  return y;
}

std::string expert_types(const moe::io::GgufFile& f, Index layer) {
  std::string s;
  for (const char* n : {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_gate_up_exps.weight",
                        "ffn_down_exps.weight"}) {
    const std::string name = moe::io::gguf_block_tensor(layer, n);
    if (f.contains(name)) {
      s += (s.empty() ? "" : " ") + std::string(n).substr(0, std::string(n).find('.')) + "=" +
           moe::io::ggml_type_name(f.tensor(name).type);
    }
  }
  return s.empty() ? "per-expert tensors" : s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (!a.demo.empty()) {
      write_demo(a.demo);
      if (a.file.empty()) return 0;
    }
    const auto f = moe::io::GgufFile::open(a.file);
    const auto spec = moe::io::read_gguf_moe_spec(f);
    std::printf(
        "%s: arch %s, %lld layers, d_model %lld, d_ff %lld, %lld experts, top %lld, "
        "shared d_ff %lld\n",
        a.file.c_str(), spec.arch.c_str(), static_cast<long long>(spec.num_layers),
        static_cast<long long>(spec.moe.d_model), static_cast<long long>(spec.moe.d_ff),
        static_cast<long long>(spec.moe.num_experts), static_cast<long long>(spec.moe.top_k),
        static_cast<long long>(spec.moe.shared_d_ff));
    std::mt19937 rng(a.seed);
    std::normal_distribution<float> g;
    RowMatrix<float> x(a.tokens, spec.moe.d_model);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
    const moe::ThreadPool pool(a.threads);
    for (Index layer = 0; layer < spec.num_layers; ++layer) {
      if ((a.layer >= 0 && layer != a.layer) || !moe::io::gguf_is_moe_layer(f, layer)) continue;
      double load_s = 0, fwd_s = 0;
      RowMatrix<float> y;
      using moe::SparseMoeBlock;
      using moe::SwiGLU;
      switch (spec.routing) {
        case moe::io::GgufRouting::softmax_top_k:
          y = run<SparseMoeBlock<float, moe::gating::SoftmaxTopK, SwiGLU>>(f, spec, layer, x, pool,
                                                                           load_s, fwd_s);
          break;
        case moe::io::GgufRouting::deepseek_v2:
          y = run<SparseMoeBlock<float, moe::gating::DeepSeekV2, SwiGLU>>(f, spec, layer, x, pool,
                                                                          load_s, fwd_s);
          break;
        case moe::io::GgufRouting::deepseek_v3:
          y = run<SparseMoeBlock<float, moe::gating::GroupLimitedTopK, SwiGLU>>(
              f, spec, layer, x, pool, load_s, fwd_s);
          break;
        case moe::io::GgufRouting::scored_top_k:  // gpt-oss, llama4
          y = run<SparseMoeBlock<float, moe::gating::ScoredTopK, SwiGLU>>(f, spec, layer, x, pool,
                                                                          load_s, fwd_s);
          break;
      }
      std::printf("layer %lld [%s]: load %.3f s, forward %.4f s, checksum sum %.6e sumsq %.6e\n",
                  static_cast<long long>(layer), expert_types(f, layer).c_str(), load_s, fwd_s,
                  static_cast<double>(y.sum()), static_cast<double>(y.squaredNorm()));
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gguf_moe_layers: %s\n", e.what());
    return 1;
  }
}
