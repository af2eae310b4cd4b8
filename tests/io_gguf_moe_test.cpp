// Tests of moe/io/gguf_moe.hpp: golden cases (tests/data/reference, FORMAT.md) written to GGUF by
// our writer under llama.cpp's architecture, keys and tensor names, loaded back as blocks:
//   F32 reproduces the case (bitwise equal to the block built from the case's own tensors, and
//   within the golden runner's tolerances of HF), stacked, fused gate_up and per-expert layouts;
//   F16, BF16, Q8_0, Q4_0 load with their format's error (output NMSE printed);
//   K-quants (Q4_K, Q5_K, Q6_K) on a layer wide enough for 256-blocks: bitwise equal to the block
//   built from the dequantised weights, and the output NMSE of each format;
// and the errors of the mapping (architecture, dense model, dims, gating, layer, non-finite).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/gguf.hpp"
#include "moe/io/gguf_any.hpp"
#include "moe/io/gguf_moe.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/moe.hpp"

#include "reference/golden_case.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
using moe::io::GgmlType;
using moe::io::GgufFile;
using moe::io::GgufWriter;
namespace k = moe::kernels;

std::string data_dir() { return std::string(MOE_TEST_DATA_DIR) + "/reference/"; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moe::error& e) {
    return e.what();
  }
  return "<no exception>";
}

double nmse(const RowMatrix<double>& got, const RowMatrix<double>& ref) {
  return (got - ref).squaredNorm() / ref.squaredNorm();
}

/// Bytes of a row-major float matrix stored as `type`; falls back to F32 when the rows are not a
/// whole number of blocks (as llama.cpp's quantizer does). Returns the type used.
GgmlType encode(const RowMatrix<float>& m, GgmlType type, std::vector<unsigned char>& out) {
  const auto traits = moe::io::ggml_type_traits(type);
  if (m.cols() % static_cast<Index>(traits.block_size) != 0) type = GgmlType::F32;
  const Index n = m.size();
  const float* x = m.data();
  switch (type) {
    case GgmlType::F16:
    case GgmlType::BF16: {
      out.resize(static_cast<std::size_t>(n) * 2);
      for (Index i = 0; i < n; ++i) {
        const std::uint16_t h =
            type == GgmlType::F16 ? moe::io::float_to_f16(x[i]) : moe::io::float_to_bf16(x[i]);
        std::memcpy(out.data() + 2 * i, &h, 2);
      }
      return type;
    }
    case GgmlType::Q8_0:
    case GgmlType::Q4_0: {
      // Our Q8 / Q4 quantisers: the same bytes as ggml's Q8_0 / Q4_0 blocks.
      const Index blocks_per_row = m.cols() / 32;
      out.resize(static_cast<std::size_t>(n / 32) * (type == GgmlType::Q8_0 ? 34 : 18));
      for (Index r = 0; r < m.rows(); ++r) {
        if (type == GgmlType::Q8_0) {
          k::quantize_q8_row(x + r * m.cols(), m.cols(),
                             reinterpret_cast<k::BlockQ8*>(out.data()) + r * blocks_per_row, r);
        } else {
          k::quantize_q4_row(x + r * m.cols(), m.cols(),
                             reinterpret_cast<k::BlockQ4*>(out.data()) + r * blocks_per_row, r);
        }
      }
      return type;
    }
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K: {
      const auto t = moe::io::ggml_type_traits(type);
      out.resize(static_cast<std::size_t>(n) / t.block_size * t.type_size);
      auto* q = type == GgmlType::Q4_K   ? k::quantize_q4_k
                : type == GgmlType::Q5_K ? k::quantize_q5_k
                                         : k::quantize_q6_k;
      q(x, n, out.data());
      return type;
    }
    case GgmlType::MXFP4: {
      // Our Mxfp4 quantiser (split codes/scales, row by row), repacked into ggml blocks.
      const Index nb = n / 32;
      std::vector<std::uint8_t> codes(static_cast<std::size_t>(nb) * 16),
          scales(static_cast<std::size_t>(nb));
      const Index row_blocks = m.cols() / 32;
      for (Index r = 0; r < m.rows(); ++r) {
        k::quantize_mxfp4_row(x + r * m.cols(), m.cols(), codes.data() + r * row_blocks * 16,
                              scales.data() + r * row_blocks, r);
      }
      out.resize(static_cast<std::size_t>(nb) * k::ggml_mxfp4_bytes);
      k::repack_split_to_mxfp4(codes.data(), scales.data(), n, out.data());
      return type;
    }
    default:
      out.resize(static_cast<std::size_t>(n) * 4);
      std::memcpy(out.data(), x, out.size());
      return GgmlType::F32;
  }
}

/// Adds `m` ([rows x cols] row-major) as tensor `name` with ggml dims `dims` in `type`.
void add(GgufWriter& w, const std::string& name, const RowMatrix<float>& m, GgmlType type,
         std::vector<std::int64_t> dims) {
  std::vector<unsigned char> bytes;
  const GgmlType used = encode(m, type, bytes);
  w.add_tensor(name, used, std::move(dims), bytes.data(), bytes.size());
}

/// The common MoE keys of `arch`: block_count, embedding_length, expert_count,
/// expert_used_count, expert_feed_forward_length.
void moe_keys(GgufWriter& w, const std::string& arch, Index layers, Index D, Index E, Index top_k,
              Index F) {
  const std::string p = arch + ".";
  w.set("general.architecture", arch);
  w.set<std::uint32_t>(p + "block_count", static_cast<std::uint32_t>(layers));
  w.set<std::uint32_t>(p + "embedding_length", static_cast<std::uint32_t>(D));
  w.set<std::uint32_t>(p + "expert_count", static_cast<std::uint32_t>(E));
  w.set<std::uint32_t>(p + "expert_used_count", static_cast<std::uint32_t>(top_k));
  w.set<std::uint32_t>(p + "expert_feed_forward_length", static_cast<std::uint32_t>(F));
}

/// Rows of several matrices stacked (experts' [F x D] into [E*F x D]).
RowMatrix<float> stack(const std::vector<RowMatrix<float>>& parts) {
  Index rows = 0;
  for (const auto& p : parts) rows += p.rows();
  RowMatrix<float> out(rows, parts.front().cols());
  Index r = 0;
  for (const auto& p : parts) {
    out.middleRows(r, p.rows()) = p;
    r += p.rows();
  }
  return out;
}

enum class Layout { stacked, fused, per_expert };

/// llama.cpp's arch for a golden family, and its metadata.
std::string arch_of(const std::string& family) {
  if (family == "mixtral") return "llama";
  if (family == "qwen2_moe") return "qwen2moe";
  if (family == "qwen3_moe") return "qwen3moe";
  if (family == "deepseek_v3") return "deepseek2";
  return family;  // olmoe
}

/// The golden case as a one-layer GGUF: router in F32 (llama.cpp never quantises ffn_gate_inp),
/// experts and shared expert in `type`.
std::vector<unsigned char> gguf_from_case(const moe::golden::Case& c, GgmlType type,
                                          Layout layout) {
  const moe::MoeConfig cfg = c.config();
  const std::string family = c.meta("family");
  const std::string arch = arch_of(family);
  const std::string p = arch + ".";
  const Index D = cfg.d_model, F = cfg.d_ff, E = cfg.num_experts;
  GgufWriter w;
  w.set("general.architecture", arch).set("general.name", c.name());
  w.set<std::uint32_t>(p + "block_count", 1).set<std::uint32_t>(p + "embedding_length", D);
  w.set<std::uint32_t>(p + "expert_count", E)
      .set<std::uint32_t>(p + "expert_used_count", cfg.top_k);
  if (arch == "llama") {
    w.set<std::uint32_t>(p + "feed_forward_length", F);  // Mixtral files carry only this one
  } else {
    w.set<std::uint32_t>(p + "expert_feed_forward_length", F);
  }
  if (arch == "deepseek2") {
    w.set<std::uint32_t>(p + "leading_dense_block_count", 0);
    w.set<std::uint32_t>(p + "expert_shared_count", 1);
    w.set<float>(p + "expert_weights_scale",
                 static_cast<float>(c.meta_double_or("routed_scaling_factor", 1.0)));
    w.set(p + "expert_weights_norm", c.meta_bool_or("norm_topk_prob", true));
    w.set<std::uint32_t>(p + "expert_gating_func", 2);
    w.set<std::uint32_t>(p + "expert_group_count", c.meta_int_or("n_group", 1));
    w.set<std::uint32_t>(p + "expert_group_used_count", c.meta_int_or("topk_group", 1));
    add(w, "blk.0.exp_probs_b.bias", c.mat<float>("router.bias"), GgmlType::F32, {E});  // [1 x E]
  }
  add(w, "blk.0.ffn_gate_inp.weight", c.mat<float>("router.weight"), GgmlType::F32, {D, E});
  std::vector<RowMatrix<float>> gate, up, down, gate_up;
  for (Index e = 0; e < E; ++e) {
    const std::string x = "experts." + std::to_string(e) + ".";
    gate.push_back(c.mat<float>(x + "gate.weight"));
    up.push_back(c.mat<float>(x + "up.weight"));
    down.push_back(c.mat<float>(x + "down.weight"));
    gate_up.push_back(stack({gate.back(), up.back()}));
  }
  if (layout == Layout::per_expert) {
    for (Index e = 0; e < E; ++e) {
      const std::string n = std::to_string(e);
      add(w, "blk.0.ffn_gate." + n + ".weight", gate[e], type, {D, F});
      add(w, "blk.0.ffn_up." + n + ".weight", up[e], type, {D, F});
      add(w, "blk.0.ffn_down." + n + ".weight", down[e], type, {F, D});
    }
  } else {
    if (layout == Layout::fused) {
      add(w, "blk.0.ffn_gate_up_exps.weight", stack(gate_up), type, {D, 2 * F, E});
    } else {
      add(w, "blk.0.ffn_gate_exps.weight", stack(gate), type, {D, F, E});
      add(w, "blk.0.ffn_up_exps.weight", stack(up), type, {D, F, E});
    }
    add(w, "blk.0.ffn_down_exps.weight", stack(down), type, {F, D, E});
  }
  if (cfg.shared_d_ff > 0) {
    const Index Fs = cfg.shared_d_ff;
    add(w, "blk.0.ffn_gate_shexp.weight", c.mat<float>("shared.gate.weight"), type, {D, Fs});
    add(w, "blk.0.ffn_up_shexp.weight", c.mat<float>("shared.up.weight"), type, {D, Fs});
    add(w, "blk.0.ffn_down_shexp.weight", c.mat<float>("shared.down.weight"), type, {Fs, D});
    if (cfg.shared_expert_gate) {
      add(w, "blk.0.ffn_gate_inp_shexp.weight", c.mat<float>("shared_gate.weight"), GgmlType::F32,
          {D});
    }
  }
  return w.to_bytes();
}

/// Loads layer 0 of the GGUF as the family's block in T and runs it on the case's input.
template <class T>
RowMatrix<double> run_gguf(const moe::golden::Case& c, const GgufFile& f) {
  const auto spec = moe::io::read_gguf_moe_spec(f);
  const RowMatrix<T> x = c.mat<T>("input");
  RowMatrix<T> y(x.rows(), x.cols());
  moe::Workspace<T> ws;
  if (spec.routing == moe::io::GgufRouting::deepseek_v3) {
    const auto b = moe::io::load_gguf_moe_layer<
        moe::SparseMoeBlock<T, moe::gating::GroupLimitedTopK, moe::SwiGLU>>(f, spec, 0);
    b.forward(x, y, ws);
  } else {
    const auto b =
        moe::io::load_gguf_moe_layer<moe::SparseMoeBlock<T, moe::gating::SoftmaxTopK, moe::SwiGLU>>(
            f, spec, 0);
    b.forward(x, y, ws);
  }
  return y.template cast<double>();
}

/// The case's own block (weights from its canonical tensors), for bitwise comparison.
template <class T>
RowMatrix<double> run_case(const moe::golden::Case& c) {
  const auto cfg = c.config();
  const RowMatrix<T> x = c.mat<T>("input");
  RowMatrix<T> y(x.rows(), x.cols());
  moe::Workspace<T> ws;
  if (c.meta("family") == "deepseek_v3") {
    using G = moe::gating::GroupLimitedTopK;
    const auto o = G::Options::deepseek_v3(
        c.meta_int_or("n_group", 1), c.meta_int_or("topk_group", 1),
        c.meta_double_or("routed_scaling_factor", 1.0), c.meta_bool_or("norm_topk_prob", true));
    moe::SparseMoeBlock<T, G, moe::SwiGLU>(cfg, c.weights<T>(cfg, true, true), o).forward(x, y, ws);
  } else {
    moe::gating::SoftmaxTopK::Options o;
    const std::string fam = c.meta("family");
    o.normalize = fam == "mixtral" || c.meta_bool_or("norm_topk_prob", fam == "qwen3_moe");
    moe::SparseMoeBlock<T, moe::gating::SoftmaxTopK, moe::SwiGLU>(cfg,
                                                                  c.weights<T>(cfg, true, false), o)
        .forward(x, y, ws);
  }
  return y.template cast<double>();
}

class GgufGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufGolden, F32ReproducesTheCaseInEveryLayout) {
  const moe::golden::Case c(data_dir() + GetParam() + ".safetensors");
  const RowMatrix<double> hf = c.mat("output");
  const RowMatrix<double> ref64 = c.mat("ref64.output");
  const double scale = 1 + hf.cwiseAbs().maxCoeff();
  for (Layout layout : {Layout::stacked, Layout::fused, Layout::per_expert}) {
    SCOPED_TRACE(static_cast<int>(layout));
    const auto f = GgufFile::from_buffer(gguf_from_case(c, GgmlType::F32, layout), c.name());
    const RowMatrix<double> d = run_gguf<double>(c, f);
    const RowMatrix<double> s = run_gguf<float>(c, f);
    // The golden weights are float32 values: F32 storage is exact, so the blocks are the same.
    EXPECT_EQ(d, run_case<double>(c));
    EXPECT_EQ(s, run_case<float>(c));
    // And the runner's tolerances (tests/reference/golden_families.hpp).
    EXPECT_LE((d - ref64).cwiseAbs().maxCoeff(), 1e-10 * scale);
    EXPECT_LE((d - hf).cwiseAbs().maxCoeff(), 1e-6 * scale);
    EXPECT_LE((s - hf).cwiseAbs().maxCoeff(), 1e-5 * scale);
  }
}

TEST_P(GgufGolden, AnyMoeBlockPicksTheArchsPolicy) {
  const moe::golden::Case c(data_dir() + GetParam() + ".safetensors");
  const auto f = GgufFile::from_buffer(gguf_from_case(c, GgmlType::F32, Layout::stacked), "a.gguf");
  const moe::io::AnyMoeBlock<double> any = moe::io::load_gguf_any_moe_layer<double>(f, 0);
  EXPECT_EQ(any.index(), GetParam() == std::string("deepseek_v3") ? 2u : 0u);
  EXPECT_EQ(any.forward(c.mat("input")), run_case<double>(c));
}

TEST(GgufGoldenGlm, Glm4MoeRoutesLikeDeepSeekV3WithSigmoidByDefault) {
  // GLM-4.5 (arch glm4moe) routes as DeepSeek-V3: the V3 case under that arch, without
  // expert_gating_func (glm4moe's default is sigmoid), loads and reproduces the case.
  const moe::golden::Case c(data_dir() + "deepseek_v3.safetensors");
  auto bytes = gguf_from_case(c, GgmlType::F32, Layout::stacked);
  auto f = GgufFile::from_buffer(bytes, "v3.gguf");
  GgufWriter w;
  for (const auto& kv : f.metadata()) {
    std::string key = kv.key;
    if (key.rfind("deepseek2.", 0) == 0) key = "glm4moe." + key.substr(10);
    if (key == "glm4moe.expert_gating_func") continue;
    w.set_value(key,
                kv.key == "general.architecture" ? moe::io::GgufValue::of("glm4moe") : kv.value);
  }
  for (const auto& t : f.tensors()) w.add_tensor(t.name, t.type, t.dims, f.data(t), t.nbytes);
  const auto glm = GgufFile::from_buffer(w.to_bytes(), "glm.gguf");
  const auto spec = moe::io::read_gguf_moe_spec(glm);
  EXPECT_EQ(spec.arch, "glm4moe");
  EXPECT_EQ(spec.routing, moe::io::GgufRouting::deepseek_v3);
  EXPECT_EQ(run_gguf<double>(c, glm), run_case<double>(c));
}

TEST_P(GgufGolden, CompactTypesLoadWithTheirFormatsError) {
  const moe::golden::Case c(data_dir() + GetParam() + ".safetensors");
  const RowMatrix<double> hf = c.mat("output");
  const struct {
    GgmlType type;
    double max_nmse;  // output NMSE: about twice the weight NMSE (two projections)
  } types[] = {{GgmlType::F16, 1e-5},
               {GgmlType::BF16, 1e-3},
               {GgmlType::Q8_0, 1e-3},
               {GgmlType::Q4_0, 5e-2}};
  for (const auto& t : types) {
    const auto f = GgufFile::from_buffer(gguf_from_case(c, t.type, Layout::stacked), c.name());
    const double e = nmse(run_gguf<float>(c, f), hf);
    EXPECT_LT(e, t.max_nmse) << moe::io::ggml_type_name(t.type);
    EXPECT_GT(e, 0.0) << moe::io::ggml_type_name(t.type);
    std::printf("[ measure  ] %s %s output NMSE vs HF %.3g\n", GetParam().c_str(),
                moe::io::ggml_type_name(t.type), e);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, GgufGolden,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                           "deepseek_v3"));

TEST(GgufGoldenV2, DeepSeekV2FromHfFusedTensorsReproducesTheCase) {
  // The v2 DeepSeek-V2 case (HF 5.17 state_dict: experts.gate_up_proj [E, 2F, D] gate rows first,
  // experts.down_proj [E, D, F]) written as llama.cpp would: ffn_gate_up_exps [D, 2F, E], softmax
  // gating (no expert_gating_func key), topk_method greedy = no group keys, scale 2.5, no norm.
  const auto c = moe::io::SafetensorsFile::open(data_dir() + "v2/deepseek_v2.safetensors");
  const RowMatrix<float> router = c.read_matrix<float>("hf.gate.weight");
  const RowMatrix<float> gate_up = c.read_matrix<float>("hf.experts.gate_up_proj");  // [E*2F x D]
  const RowMatrix<float> down = c.read_matrix<float>("hf.experts.down_proj");        // [E*D x F]
  const RowMatrix<float> sg = c.read_matrix<float>("hf.shared_experts.gate_proj.weight");
  const RowMatrix<float> su = c.read_matrix<float>("hf.shared_experts.up_proj.weight");
  const RowMatrix<float> sd = c.read_matrix<float>("hf.shared_experts.down_proj.weight");
  const Index E = router.rows(), D = router.cols(), F = down.cols(), Fs = sg.rows();
  GgufWriter w;
  w.set("general.architecture", "deepseek2");
  w.set<std::uint32_t>("deepseek2.block_count", 1)
      .set<std::uint32_t>("deepseek2.embedding_length", D);
  w.set<std::uint32_t>("deepseek2.expert_count", E);
  w.set<std::uint32_t>("deepseek2.expert_used_count", std::stoi(c.metadata().at("k")));
  w.set<std::uint32_t>("deepseek2.expert_feed_forward_length", F);
  w.set<std::uint32_t>("deepseek2.expert_shared_count", 1);
  w.set<float>("deepseek2.expert_weights_scale", 2.5f).set("deepseek2.expert_weights_norm", false);
  add(w, "blk.0.ffn_gate_inp.weight", router, GgmlType::F32, {D, E});
  add(w, "blk.0.ffn_gate_up_exps.weight", gate_up, GgmlType::F32, {D, 2 * F, E});
  add(w, "blk.0.ffn_down_exps.weight", down, GgmlType::F32, {F, D, E});
  add(w, "blk.0.ffn_gate_shexp.weight", sg, GgmlType::F32, {D, Fs});
  add(w, "blk.0.ffn_up_shexp.weight", su, GgmlType::F32, {D, Fs});
  add(w, "blk.0.ffn_down_shexp.weight", sd, GgmlType::F32, {Fs, D});
  const auto f = GgufFile::from_buffer(w.to_bytes(), "v2.gguf");
  using V2 = moe::SparseMoeBlock<double, moe::gating::DeepSeekV2, moe::SwiGLU>;
  const V2 block = moe::io::load_gguf_moe_layer<V2>(f, 0);
  const RowMatrix<double> x = c.read_matrix<double>("input");
  const RowMatrix<double> hf = c.read_matrix<double>("output");
  RowMatrix<double> y(x.rows(), x.cols());
  moe::Workspace<double> ws;
  block.forward(x, y, ws);
  EXPECT_LE((y - hf).cwiseAbs().maxCoeff(), 1e-6 * (1 + hf.cwiseAbs().maxCoeff()));
}

// ---- K-quants: a Qwen3-MoE layer with d_model = d_ff = 256 ----

struct Layer {
  moe::MoeConfig cfg;
  RowMatrix<float> router, gate, up, down;  // stacked [E*F x D], [E*F x D], [E*D x F]
};

Layer random_layer() {
  Layer l;
  l.cfg.d_model = 256;
  l.cfg.d_ff = 256;
  l.cfg.num_experts = 4;
  l.cfg.top_k = 2;
  std::mt19937 rng(17);
  std::normal_distribution<float> g(0.0f, 0.05f);
  auto draw = [&](Index r, Index c) {
    RowMatrix<float> m(r, c);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = g(rng);
    return m;
  };
  l.router = draw(4, 256);
  l.gate = draw(4 * 256, 256);
  l.up = draw(4 * 256, 256);
  l.down = draw(4 * 256, 256);
  return l;
}

std::vector<unsigned char> gguf_of(const Layer& l, GgmlType gate_up, GgmlType down) {
  GgufWriter w;
  w.set("general.architecture", "qwen3moe");
  w.set<std::uint32_t>("qwen3moe.block_count", 1)
      .set<std::uint32_t>("qwen3moe.embedding_length", 256);
  w.set<std::uint32_t>("qwen3moe.expert_count", 4)
      .set<std::uint32_t>("qwen3moe.expert_used_count", 2);
  w.set<std::uint32_t>("qwen3moe.expert_feed_forward_length", 256);
  add(w, "blk.0.ffn_gate_inp.weight", l.router, GgmlType::F32, {256, 4});
  add(w, "blk.0.ffn_gate_exps.weight", l.gate, gate_up, {256, 256, 4});
  add(w, "blk.0.ffn_up_exps.weight", l.up, gate_up, {256, 256, 4});
  add(w, "blk.0.ffn_down_exps.weight", l.down, down, {256, 256, 4});
  return w.to_bytes();
}

using Qwen3Block = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU>;

RowMatrix<float> forward(const Qwen3Block& b, const RowMatrix<float>& x) {
  RowMatrix<float> y(x.rows(), x.cols());
  moe::Workspace<float> ws;
  b.forward(x, y, ws);
  return y;
}

/// Dequantises `m` through `type` (what the loader does, done by hand).
RowMatrix<float> through(const RowMatrix<float>& m, GgmlType type) {
  std::vector<unsigned char> bytes;
  encode(m, type, bytes);
  RowMatrix<float> out(m.rows(), m.cols());
  moe::io::ggml_decode_to_float(type, bytes.data(), m.size(), out.data());
  return out;
}

TEST(GgufKQuants, LoadEqualsTheDequantisedWeightsAndHasTheFormatsError) {
  const Layer l = random_layer();
  std::mt19937 rng(5);
  std::normal_distribution<float> g;
  RowMatrix<float> x(31, 256);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
  const auto f32 = GgufFile::from_buffer(gguf_of(l, GgmlType::F32, GgmlType::F32), "f32.gguf");
  const RowMatrix<float> ref = forward(moe::io::load_gguf_moe_layer<Qwen3Block>(f32, 0), x);
  const struct {
    const char* name;
    GgmlType gate_up, down;
  } mixes[] = {{"Q4_K", GgmlType::Q4_K, GgmlType::Q4_K},
               {"Q5_K", GgmlType::Q5_K, GgmlType::Q5_K},
               {"Q6_K", GgmlType::Q6_K, GgmlType::Q6_K},
               {"Q4_K_M-like (down Q6_K)", GgmlType::Q4_K, GgmlType::Q6_K}};
  double previous = 1.0;
  for (const auto& m : mixes) {
    const auto f = GgufFile::from_buffer(gguf_of(l, m.gate_up, m.down), "q.gguf");
    const RowMatrix<float> y = forward(moe::io::load_gguf_moe_layer<Qwen3Block>(f, 0), x);
    // The same block built by hand from the dequantised weights: bitwise equal.
    auto w = moe::MoeWeights<float>::zeros(l.cfg);
    w.router = l.router;
    const RowMatrix<float> gate = through(l.gate, m.gate_up), up = through(l.up, m.gate_up),
                           down = through(l.down, m.down);
    for (Index e = 0; e < 4; ++e) {
      w.experts.set_gated(e, gate.middleRows(256 * e, 256), up.middleRows(256 * e, 256),
                          down.middleRows(256 * e, 256));
    }
    moe::gating::SoftmaxTopK::Options o;
    o.normalize = true;
    EXPECT_EQ(y, forward(Qwen3Block(l.cfg, std::move(w), o), x)) << m.name;
    const double e = nmse(y.cast<double>(), ref.cast<double>());
    std::printf("[ measure  ] %s output NMSE vs F32 %.3g\n", m.name, e);
    EXPECT_GT(e, 0.0) << m.name;
    EXPECT_LT(e, 3e-2) << m.name;
    if (m.gate_up == m.down) {
      EXPECT_LT(e, previous) << m.name << ": more bits must not be worse";
      previous = e;
    }
  }
}

TEST(GgufDeepSeek2, SoftmaxGatingIsDeepSeekV2WithItsGroupsScaleAndDenseLead) {
  // A deepseek2 file without expert_gating_func (DeepSeek-V2 files have none): softmax gating,
  // groups and scale from the keys; layer 0 dense (leading_dense_block_count = 1), layer 1
  // sparse with two shared experts of width 32 (one [64 x D] shared FFN).
  const Index D = 32, F = 32, E = 8, Fs = 64;
  std::mt19937 rng(23);
  std::normal_distribution<float> g(0.0f, 0.2f);
  auto draw = [&](Index r, Index c) {
    RowMatrix<float> m(r, c);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = g(rng);
    return m;
  };
  const RowMatrix<float> router = draw(E, D), gate = draw(E * F, D), up = draw(E * F, D),
                         down = draw(E * D, F), sg = draw(Fs, D), su = draw(Fs, D),
                         sd = draw(D, Fs);
  for (bool norm : {false, true}) {
    GgufWriter w;
    w.set("general.architecture", "deepseek2");
    w.set<std::uint32_t>("deepseek2.block_count", 2)
        .set<std::uint32_t>("deepseek2.embedding_length", D);
    w.set<std::uint32_t>("deepseek2.expert_count", E)
        .set<std::uint32_t>("deepseek2.expert_used_count", 3);
    w.set<std::uint32_t>("deepseek2.expert_feed_forward_length", F);
    w.set<std::uint32_t>("deepseek2.leading_dense_block_count", 1);
    w.set<std::uint32_t>("deepseek2.expert_shared_count", 2);
    w.set<float>("deepseek2.expert_weights_scale", 16.0f)
        .set("deepseek2.expert_weights_norm", norm);
    w.set<std::uint32_t>("deepseek2.expert_group_count", 4);
    w.set<std::uint32_t>("deepseek2.expert_group_used_count", 2);
    add(w, "blk.1.ffn_gate_inp.weight", router, GgmlType::F32, {D, E});
    add(w, "blk.1.ffn_gate_exps.weight", gate, GgmlType::F32, {D, F, E});
    add(w, "blk.1.ffn_up_exps.weight", up, GgmlType::F32, {D, F, E});
    add(w, "blk.1.ffn_down_exps.weight", down, GgmlType::F32, {F, D, E});
    add(w, "blk.1.ffn_gate_shexp.weight", sg, GgmlType::F32, {D, Fs});
    add(w, "blk.1.ffn_up_shexp.weight", su, GgmlType::F32, {D, Fs});
    add(w, "blk.1.ffn_down_shexp.weight", sd, GgmlType::F32, {Fs, D});
    const auto f = GgufFile::from_buffer(w.to_bytes(), "v2.gguf");
    const auto spec = moe::io::read_gguf_moe_spec(f);
    EXPECT_EQ(spec.routing, moe::io::GgufRouting::deepseek_v2);
    EXPECT_EQ(spec.leading_dense, 1);
    EXPECT_EQ(spec.moe.shared_d_ff, Fs);
    EXPECT_FALSE(moe::io::gguf_is_moe_layer(f, 0));
    using V2 = moe::SparseMoeBlock<float, moe::gating::DeepSeekV2, moe::SwiGLU>;
    // Hugging Face's DeepseekV2MoEGate: renormalised weights are not scaled; otherwise scaled.
    auto o = moe::gating::DeepSeekV2::Options::deepseek_v2(4, 2, norm ? 1.0 : 16.0);
    o.normalize = norm;
    moe::MoeConfig cfg = spec.moe;
    auto wt = moe::MoeWeights<float>::zeros(cfg);
    wt.router = router;
    for (Index e = 0; e < E; ++e) {
      wt.experts.set_gated(e, gate.middleRows(F * e, F), up.middleRows(F * e, F),
                           down.middleRows(D * e, D));
    }
    wt.shared.set_gated(0, sg, su, sd);
    RowMatrix<float> x = draw(7, D);
    moe::Workspace<float> ws;
    RowMatrix<float> want(7, D), got(7, D);
    V2(cfg, std::move(wt), o).forward(x, want, ws);
    moe::io::load_gguf_moe_layer<V2>(f, spec, 1).forward(x, got, ws);
    EXPECT_EQ(got, want) << "norm " << norm;
  }
}

using Bf16Block = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU,
                                      moe::CompactExperts<moe::Bf16>>;

TEST(GgufCompact, Bf16ExpertsAreViewedInPlaceByABf16Block) {
  // The Mixtral case in BF16: a CompactExperts<Bf16> block views the file's codes (no copy). Its
  // output equals, bit for bit, the Bf16 block the constructor quantises from the same values
  // decoded to fp32 (bf16 -> fp32 -> bf16 is exact, so the codes are the same), in every layout.
  const moe::golden::Case c(data_dir() + "mixtral.safetensors");
  const RowMatrix<float> x = c.mat<float>("input");
  for (Layout layout : {Layout::stacked, Layout::fused, Layout::per_expert}) {
    const auto f = GgufFile::from_buffer(gguf_from_case(c, GgmlType::BF16, layout), "bf16.gguf");
    const auto spec = moe::io::read_gguf_moe_spec(f);
    ASSERT_TRUE(moe::io::gguf_experts_are_bf16(f, spec, 0));
    const Bf16Block viewed = moe::io::load_gguf_moe_layer<Bf16Block>(f, spec, 0);
    EXPECT_EQ(viewed.weights().experts.num_experts(), 0);  // no fp32 copy of the experts
    moe::gating::SoftmaxTopK::Options o;
    const Bf16Block quantised(spec.moe, moe::io::load_gguf_moe_weights<float>(f, spec, 0), o);
    RowMatrix<float> a(x.rows(), x.cols()), b(x.rows(), x.cols());
    moe::Workspace<float> ws;
    viewed.forward(x, a, ws);
    quantised.forward(x, b, ws);
    EXPECT_EQ(a, b) << static_cast<int>(layout);
    EXPECT_LT(nmse(a.cast<double>(), c.mat("output")), 1e-3);
  }
}

TEST(GgufCompact, KQuantsIntoABf16BlockAddAlmostNothing) {
  // Q6_K experts are not BF16: the Bf16 block decodes them to fp32 and quantises to bf16.
  const Layer l = random_layer();
  const auto f = GgufFile::from_buffer(gguf_of(l, GgmlType::Q6_K, GgmlType::Q6_K), "q6k.gguf");
  const auto spec = moe::io::read_gguf_moe_spec(f);
  EXPECT_FALSE(moe::io::gguf_experts_are_bf16(f, spec, 0));
  std::mt19937 rng(8);
  std::normal_distribution<float> g;
  RowMatrix<float> x(31, 256);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
  const RowMatrix<float> native = forward(moe::io::load_gguf_moe_layer<Qwen3Block>(f, spec, 0), x);
  const Bf16Block compact = moe::io::load_gguf_moe_layer<Bf16Block>(f, spec, 0);
  RowMatrix<float> y(x.rows(), x.cols());
  moe::Workspace<float> ws;
  compact.forward(x, y, ws);
  const double e = nmse(y.cast<double>(), native.cast<double>());
  std::printf("[ measure  ] Q6_K experts as Bf16 vs as fp32: output NMSE %.3g\n", e);
  EXPECT_GT(e, 0.0);
  EXPECT_LT(e, 1e-4);  // bf16 keeps 8 significant bits: 2^-18 relative per weight
  EXPECT_EQ(error_of([&] { (void)moe::io::view_gguf_bf16_experts(f, spec, 0); }),
            "moe: q6k.gguf: layer 0: the routed experts are not all BF16, cannot view them");
}

template <class Format, moe::CompactMode Mode>
using QuantBlock = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU,
                                       moe::CompactExperts<Format, Mode>>;

TEST(GgufCompact, Q8_0AndQ4_0GoStraightIntoTheQuantFormats) {
  // Q8_0 / Q4_0 experts taken as Q8 / Q4 blocks (no fp32 on the way): the exact mode computes on
  // the dequantised weights, so it matches the fp32 block loaded from the same file to rounding;
  // the fast mode adds its activation quantisation.
  const Layer l = random_layer();
  std::mt19937 rng(4);
  std::normal_distribution<float> g;
  RowMatrix<float> x(31, 256);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0}) {
    const auto f = GgufFile::from_buffer(gguf_of(l, type, type), "q.gguf");
    const auto spec = moe::io::read_gguf_moe_spec(f);
    const RowMatrix<double> native =
        forward(moe::io::load_gguf_moe_layer<Qwen3Block>(f, spec, 0), x).cast<double>();
    RowMatrix<float> exact(x.rows(), x.cols()), fast(x.rows(), x.cols());
    moe::Workspace<float> ws;
    if (type == GgmlType::Q8_0) {
      moe::io::load_gguf_moe_layer<QuantBlock<moe::Q8, moe::CompactMode::exact>>(f, spec, 0)
          .forward(x, exact, ws);
      moe::io::load_gguf_moe_layer<QuantBlock<moe::Q8, moe::CompactMode::fast>>(f, spec, 0)
          .forward(x, fast, ws);
    } else {
      moe::io::load_gguf_moe_layer<QuantBlock<moe::Q4, moe::CompactMode::exact>>(f, spec, 0)
          .forward(x, exact, ws);
      moe::io::load_gguf_moe_layer<QuantBlock<moe::Q4, moe::CompactMode::fast>>(f, spec, 0)
          .forward(x, fast, ws);
    }
    const double e_exact = nmse(exact.cast<double>(), native),
                 e_fast = nmse(fast.cast<double>(), native);
    std::printf("[ measure  ] %s experts as quant blocks vs fp32: exact NMSE %.3g, fast %.3g\n",
                moe::io::ggml_type_name(type), e_exact, e_fast);
    EXPECT_LT(e_exact, 1e-10) << moe::io::ggml_type_name(type);
    EXPECT_LT(e_fast, 1e-3) << moe::io::ggml_type_name(type);
  }
  const auto f = GgufFile::from_buffer(gguf_of(l, GgmlType::Q8_0, GgmlType::Q8_0), "q8.gguf");
  using Q4Stack = QuantBlock<moe::Q4, moe::CompactMode::fast>::CompactStack;
  EXPECT_EQ(error_of([&] {
              (void)moe::io::view_gguf_quant_experts<moe::Q4, Q4Stack>(
                  f, moe::io::read_gguf_moe_spec(f), 0);
            }),
            "moe: q8.gguf: layer 0: the routed experts are not all Q4_0");
}

/// A [rows x cols] MXFP4 tensor of random ggml blocks: scales around 2^0, random codes, and a
/// code of magnitude 6 in every block (so that no smaller scale holds the block: re-quantising
/// its decoded values gives back the same bytes).
std::vector<unsigned char> random_mxfp4(Index rows, Index cols, std::mt19937& rng) {
  std::vector<unsigned char> b(static_cast<std::size_t>(rows * cols / 32) * k::ggml_mxfp4_bytes);
  std::uniform_int_distribution<int> byte(0, 255), scale(122, 130), slot(0, 15);
  for (std::size_t i = 0; i < b.size(); i += k::ggml_mxfp4_bytes) {
    b[i] = static_cast<unsigned char>(scale(rng));
    for (std::size_t j = 1; j < k::ggml_mxfp4_bytes; ++j)
      b[i + j] = static_cast<unsigned char>(byte(rng));
    const int s = slot(rng);  // low nibble of qs[s]: +6 or -6
    b[i + 1 + s] = static_cast<unsigned char>((b[i + 1 + s] & 0xF0) | (byte(rng) & 8) | 7);
  }
  return b;
}

TEST(GgufCompact, Mxfp4GoesStraightIntoMxfp4Blocks) {
  // MXFP4 experts repacked into Mxfp4's split layout (no fp32): every matrix dequantises to the
  // file's values bitwise, and the exact-mode block equals, bitwise, the exact-mode block that
  // quantises the decoded fp32 weights itself (the same bytes: each block holds a 6).
  const Index D = 64, F = 96, E = 4;
  std::mt19937 rng(11);
  moe::MoeConfig cfg;
  cfg.d_model = D;
  cfg.d_ff = F;
  cfg.num_experts = E;
  cfg.top_k = 2;
  const auto gate = random_mxfp4(E * F, D, rng), up = random_mxfp4(E * F, D, rng),
             down = random_mxfp4(E * D, F, rng);
  std::normal_distribution<float> g;
  RowMatrix<float> router(E, D), x(31, D);
  for (Index i = 0; i < router.size(); ++i) router.data()[i] = 0.3f * g(rng);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
  GgufWriter w;
  moe_keys(w, "qwen3moe", 1, D, E, 2, F);
  add(w, "blk.0.ffn_gate_inp.weight", router, GgmlType::F32, {D, E});
  w.add_tensor("blk.0.ffn_gate_exps.weight", GgmlType::MXFP4, {D, F, E}, gate.data(), gate.size());
  w.add_tensor("blk.0.ffn_up_exps.weight", GgmlType::MXFP4, {D, F, E}, up.data(), up.size());
  w.add_tensor("blk.0.ffn_down_exps.weight", GgmlType::MXFP4, {F, D, E}, down.data(), down.size());
  const auto f = GgufFile::from_buffer(w.to_bytes(), "mxfp4.gguf");
  // The writer's round trip keeps the blocks byte for byte.
  const auto& t = f.tensor("blk.0.ffn_down_exps.weight");
  EXPECT_EQ(t.type, GgmlType::MXFP4);
  ASSERT_EQ(t.nbytes, down.size());
  EXPECT_EQ(std::memcmp(f.data(t), down.data(), down.size()), 0);

  const auto spec = moe::io::read_gguf_moe_spec(f);
  using Exact = QuantBlock<moe::Mxfp4, moe::CompactMode::exact>;
  const auto stack = moe::io::view_gguf_quant_experts<moe::Mxfp4, Exact::CompactStack>(f, spec, 0);
  const RowMatrix<float> gate32 = moe::io::gguf_to_float(f, "blk.0.ffn_gate_exps.weight"),
                         down32 = moe::io::gguf_to_float(f, "blk.0.ffn_down_exps.weight");
  for (Index e = 0; e < E; ++e) {
    EXPECT_EQ(stack.gate(e).dequantize(), gate32.middleRows(e * F, F)) << e;
    EXPECT_EQ(stack.w_out(e).dequantize(), down32.middleRows(e * D, D)) << e;
  }
  const auto options = moe::io::gguf_gating_options<moe::gating::SoftmaxTopK>(spec, f.path());
  const Exact direct = moe::io::load_gguf_moe_layer<Exact>(f, spec, 0);
  const Exact requantised(cfg, moe::io::load_gguf_moe_weights<float>(f, spec, 0), options);
  RowMatrix<float> y(x.rows(), D), y_ref(x.rows(), D), y_fast(x.rows(), D);
  moe::Workspace<float> ws;
  direct.forward(x, y, ws);
  requantised.forward(x, y_ref, ws);
  EXPECT_EQ(y, y_ref);
  moe::io::load_gguf_moe_layer<QuantBlock<moe::Mxfp4, moe::CompactMode::fast>>(f, spec, 0)
      .forward(x, y_fast, ws);
  const RowMatrix<double> native =
      forward(moe::io::load_gguf_moe_layer<Qwen3Block>(f, spec, 0), x).cast<double>();
  const double e_exact = nmse(y.cast<double>(), native),
               e_fast = nmse(y_fast.cast<double>(), native);
  std::printf("[ measure  ] MXFP4 experts as Mxfp4 blocks vs fp32: exact NMSE %.3g, fast %.3g\n",
              e_exact, e_fast);
  EXPECT_LT(e_exact, 1e-10);
  EXPECT_LT(e_fast, 1e-3);

  // A NaN scale (E8M0 0xFF) is refused by name.
  auto bad = down;
  bad[k::ggml_mxfp4_bytes * 5] = 0xFF;  // block 5: row 1 of expert 0 (F / 32 = 3 blocks a row)
  GgufWriter w2;
  for (const auto& kv : f.metadata()) w2.set_value(kv.key, kv.value);
  for (const auto& ti : f.tensors()) {
    const bool is_down = ti.name == "blk.0.ffn_down_exps.weight";
    w2.add_tensor(ti.name, ti.type, ti.dims, is_down ? bad.data() : f.data(ti), ti.nbytes);
  }
  const auto fb = GgufFile::from_buffer(w2.to_bytes(), "nan.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<Exact>(fb, 0); }),
            "moe: nan.gguf: tensor 'blk.0.ffn_down_exps.weight' has a non-finite scale in row 1");
}

TEST(GgufCompact, NonFiniteBf16IsRefusedWhenViewed) {
  const moe::golden::Case c(data_dir() + "qwen3_moe.safetensors");
  auto bytes = gguf_from_case(c, GgmlType::BF16, Layout::stacked);
  auto f = GgufFile::from_buffer(bytes, "nan.gguf");
  const auto& up = f.tensor("blk.0.ffn_up_exps.weight");
  const std::size_t at = f.data_section_offset() + up.offset + 2 * (5 * 32 + 3);  // row 5, col 3
  bytes[at] = 0xC0;
  bytes[at + 1] = 0x7F;  // bf16 0x7FC0: NaN
  f = GgufFile::from_buffer(bytes, "nan.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<Bf16Block>(f, 0); }),
            "moe: nan.gguf: tensor 'blk.0.ffn_up_exps.weight' has a non-finite value at row 5, "
            "column 3");
}

// ---- errors ----

TEST(GgufMoeErrors, ArchitectureAndModelAreNamed) {
  GgufWriter w;
  w.set("general.architecture", "gemma3");
  auto f = GgufFile::from_buffer(w.to_bytes(), "m.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::read_gguf_moe_spec(f); }),
            "moe: m.gguf: architecture 'gemma3' has no MoE mapping (supported: llama, qwen2moe, "
            "qwen3moe, olmoe, deepseek2, glm4moe, gpt-oss, llama4)");
  GgufWriter dense;
  dense.set("general.architecture", "llama").set<std::uint32_t>("llama.block_count", 2);
  f = GgufFile::from_buffer(dense.to_bytes(), "m.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::read_gguf_moe_spec(f); }),
            "moe: m.gguf: architecture 'llama' without experts (llama.expert_count is absent or "
            "0): a dense model has no MoE layer");
  GgufWriter bad;
  bad.set("general.architecture", "qwen3moe").set<std::int32_t>("qwen3moe.expert_count", 8);
  f = GgufFile::from_buffer(bad.to_bytes(), "m.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::read_gguf_moe_spec(f); }),
            "moe: m.gguf: no metadata key 'qwen3moe.block_count'");
}

TEST(GgufMoeErrors, TensorsLayersAndGatingAreChecked) {
  const Layer l = random_layer();
  const auto f = GgufFile::from_buffer(gguf_of(l, GgmlType::F32, GgmlType::F32), "m.gguf");
  const auto spec = moe::io::read_gguf_moe_spec(f);
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<Qwen3Block>(f, spec, 1); }),
            "moe: layer 1 out of range [0, 1) of m.gguf");
  using V3 = moe::SparseMoeBlock<float, moe::gating::GroupLimitedTopK, moe::SwiGLU>;
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<V3>(f, spec, 0); }),
            "moe: m.gguf: qwen3moe routes with gating::SoftmaxTopK; the block type uses "
            "gating::GroupLimitedTopK");
  auto wrong = spec;
  wrong.moe.d_ff = 128;
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_weights<float>(f, wrong, 0); }),
            "moe: m.gguf: tensor 'blk.0.ffn_gate_exps.weight' has dims [256, 256, 4], expected "
            "[256, 128, 4] [n_embd, n_ff_exp, n_expert]");
  auto two = spec;
  two.num_layers = 2;
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_weights<float>(f, two, 1); }),
            "moe: m.gguf: layer 1 is dense (it has no blk.1.ffn_gate_inp.weight)");
  Layer nan = l;
  nan.up(300, 7) = std::nanf("");
  const auto g = GgufFile::from_buffer(gguf_of(nan, GgmlType::F32, GgmlType::F32), "nan.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<Qwen3Block>(g, 0); }),
            "moe: nan.gguf: tensor 'blk.0.ffn_up_exps.weight' has a non-finite value at row 300, "
            "column 7");
}

// ---- gpt-oss and llama4 (gating::ScoredTopK) from the v2 golden cases ----

/// A v2 gpt-oss or llama4 case (HF 5.17 state_dict) as llama.cpp writes it, in `type` (router and
/// biases F32; rows that are not whole blocks, the down projections with d_ff = 24, stay F32 as
/// llama.cpp's quantizer leaves them): gpt-oss's interleaved gate_up_proj [E, D, 2F] (gate = even
/// columns) and Llama 4's [E, D, 2F] (gate = first F columns) split into ffn_gate_exps /
/// ffn_up_exps [D, F, E]; down_proj [E, F, D] into ffn_down_exps [F, D, E]. `layers` blocks, the
/// case's MoE layer at index `layers - 1` (llama4 with interleave_moe_layer_step = layers).
std::vector<unsigned char> gguf_from_v2(const moe::io::SafetensorsFile& c, GgmlType type,
                                        Index layers = 1) {
  const std::string family = c.metadata().at("family");
  const bool oss = family == "gpt_oss";
  const std::string arch = oss ? "gpt-oss" : "llama4", p = arch + ".";
  const RowMatrix<float> router = c.read_matrix<float>("hf.router.weight");
  const RowMatrix<float> gate_up = c.read_matrix<float>("hf.experts.gate_up_proj");  // [E*D x 2F]
  const RowMatrix<float> down_in = c.read_matrix<float>("hf.experts.down_proj");     // [E*F x D]
  const Index E = router.rows(), D = router.cols(), F = gate_up.cols() / 2;
  RowMatrix<float> gate(E * F, D), up(E * F, D), down(E * D, F);
  for (Index e = 0; e < E; ++e) {
    for (Index f = 0; f < F; ++f) {
      for (Index d = 0; d < D; ++d) {
        gate(e * F + f, d) = gate_up(e * D + d, oss ? 2 * f : f);
        up(e * F + f, d) = gate_up(e * D + d, oss ? 2 * f + 1 : F + f);
        down(e * D + d, f) = down_in(e * F + f, d);
      }
    }
  }
  GgufWriter w;
  moe_keys(w, arch, layers, D, E, std::stoi(c.metadata().at("k")), F);
  if (!oss)
    w.set<std::uint32_t>(p + "interleave_moe_layer_step", static_cast<std::uint32_t>(layers));
  const std::string b = "blk." + std::to_string(layers - 1) + ".";
  add(w, b + "ffn_gate_inp.weight", router, GgmlType::F32, {D, E});
  add(w, b + "ffn_gate_exps.weight", gate, type, {D, F, E});
  add(w, b + "ffn_up_exps.weight", up, type, {D, F, E});
  add(w, b + "ffn_down_exps.weight", down, type, {F, D, E});
  if (oss) {
    const RowMatrix<float> rb = c.read_matrix<float>("hf.router.bias");
    const RowMatrix<float> in_b = c.read_matrix<float>("hf.experts.gate_up_proj_bias");  // [E x 2F]
    RowMatrix<float> gate_b(E, F), up_b(E, F);
    for (Index e = 0; e < E; ++e) {
      for (Index f = 0; f < F; ++f) {
        gate_b(e, f) = in_b(e, 2 * f);
        up_b(e, f) = in_b(e, 2 * f + 1);
      }
    }
    add(w, b + "ffn_gate_inp.bias", rb, GgmlType::F32, {E});
    add(w, b + "ffn_gate_exps.bias", gate_b, GgmlType::F32, {F, E});
    add(w, b + "ffn_up_exps.bias", up_b, GgmlType::F32, {F, E});
    add(w, b + "ffn_down_exps.bias", c.read_matrix<float>("hf.experts.down_proj_bias"),
        GgmlType::F32, {D, E});
  } else {
    const RowMatrix<float> sg = c.read_matrix<float>("hf.shared_expert.gate_proj.weight");
    const Index Fs = sg.rows();
    add(w, b + "ffn_gate_shexp.weight", sg, type, {D, Fs});
    add(w, b + "ffn_up_shexp.weight", c.read_matrix<float>("hf.shared_expert.up_proj.weight"), type,
        {D, Fs});
    add(w, b + "ffn_down_shexp.weight", c.read_matrix<float>("hf.shared_expert.down_proj.weight"),
        type, {Fs, D});
  }
  return w.to_bytes();
}

template <class T>
using ScoredBlock = moe::SparseMoeBlock<T, moe::gating::ScoredTopK, moe::SwiGLU>;

template <class Block>
RowMatrix<double> run_scored(const Block& block, const moe::io::SafetensorsFile& c) {
  using T = typename Block::Scalar;
  const RowMatrix<T> x = c.read_matrix<T>("input");
  RowMatrix<T> y(x.rows(), x.cols());
  moe::Workspace<T> ws;
  block.forward(x, y, ws);
  return y.template cast<double>();
}

class GgufGoldenScored : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufGoldenScored, F32ReproducesTheCaseAndQuantTypesHaveTheirFormatsError) {
  const auto c = moe::io::SafetensorsFile::open(data_dir() + "v2/" + GetParam() + ".safetensors");
  const RowMatrix<double> hf = c.read_matrix<double>("output");
  const double scale = 1 + hf.cwiseAbs().maxCoeff();
  const auto f = GgufFile::from_buffer(gguf_from_v2(c, GgmlType::F32), GetParam() + ".gguf");
  const auto spec = moe::io::read_gguf_moe_spec(f);
  EXPECT_EQ(spec.routing, moe::io::GgufRouting::scored_top_k);
  const RowMatrix<double> d =
      run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<double>>(f, 0), c);
  const RowMatrix<double> s = run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<float>>(f, 0), c);
  // The runner's tolerances (tests/reference/golden_v2_runner.hpp).
  EXPECT_LE((d - hf).cwiseAbs().maxCoeff(), 1e-6 * scale);
  EXPECT_LE((s - hf).cwiseAbs().maxCoeff(), 1e-5 * scale);
  const moe::io::AnyMoeBlock<double> any = moe::io::load_gguf_any_moe_layer<double>(f, 0);
  EXPECT_EQ(any.index(), 4u);
  EXPECT_EQ(any.forward(c.read_matrix<double>("input")), d);
  const struct {
    GgmlType type;
    double max_nmse;  // output NMSE: about twice the weight NMSE (two projections)
  } types[] = {{GgmlType::Q8_0, 1e-3}, {GgmlType::MXFP4, 5e-2}};
  for (const auto& t : types) {
    const auto q = GgufFile::from_buffer(gguf_from_v2(c, t.type), "q.gguf");
    EXPECT_EQ(q.tensor("blk.0.ffn_gate_exps.weight").type, t.type);
    const double e =
        nmse(run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<float>>(q, 0), c), hf);
    EXPECT_LT(e, t.max_nmse) << moe::io::ggml_type_name(t.type);
    EXPECT_GT(e, 0.0) << moe::io::ggml_type_name(t.type);
    std::printf("[ measure  ] %s %s output NMSE vs HF %.3g\n", GetParam().c_str(),
                moe::io::ggml_type_name(t.type), e);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, GgufGoldenScored,
                         ::testing::Values("gpt_oss", "llama4", "llama4_top2"));

TEST(GgufGptOss, ClampedSwiGluAndBiasesAreTheArchs) {
  // llama.cpp hard-codes gpt-oss's alpha 1.702 and limit 7; the spec carries them, so a caller
  // can set another limit: with the clamp case's 1.5 the GGUF weights reproduce that case.
  const auto c = moe::io::SafetensorsFile::open(data_dir() + "v2/gpt_oss_clamp.safetensors");
  const auto f = GgufFile::from_buffer(gguf_from_v2(c, GgmlType::F32), "oss.gguf");
  auto spec = moe::io::read_gguf_moe_spec(f);
  EXPECT_EQ(spec.arch, "gpt-oss");
  EXPECT_EQ(spec.moe.expert_glu.alpha, 1.702);
  EXPECT_EQ(spec.moe.expert_glu.limit, 7.0);
  EXPECT_EQ(spec.moe.expert_glu.up_offset, 1.0);
  EXPECT_TRUE(spec.expert_biases);
  const RowMatrix<double> hf = c.read_matrix<double>("output");
  const double scale = 1 + hf.cwiseAbs().maxCoeff();
  const RowMatrix<double> unclamped =
      run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<double>>(f, spec, 0), c);
  EXPECT_GT((unclamped - hf).cwiseAbs().maxCoeff(), 1e-3 * scale);  // the case's clamp is reached
  spec.moe.expert_glu.limit = 1.5;
  const RowMatrix<double> clamped =
      run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<double>>(f, spec, 0), c);
  EXPECT_LE((clamped - hf).cwiseAbs().maxCoeff(), 1e-6 * scale);
  // Compact storage keeps the expert biases (fp32) and applies the clamp: BF16 experts viewed in
  // the file equal the block that rounds the F32 file's experts to bf16 (the same rounding), and
  // are within bf16's error of HF's output (weights rounded to 8 significant bits: output NMSE
  // ~1e-5; the exact mode adds no activation rounding).
  using Bf16Exact = moe::SparseMoeBlock<float, moe::gating::ScoredTopK, moe::SwiGLU,
                                        moe::CompactExperts<moe::Bf16, moe::CompactMode::exact>>;
  const auto f16 = GgufFile::from_buffer(gguf_from_v2(c, GgmlType::BF16), "oss16.gguf");
  const Bf16Exact viewed = moe::io::load_gguf_moe_layer<Bf16Exact>(f16, spec, 0);
  const Bf16Exact rounded = moe::io::load_gguf_moe_layer<Bf16Exact>(f, spec, 0);
  EXPECT_FALSE(viewed.experts().gate(0).owning());
  EXPECT_TRUE(viewed.experts().has_biases());
  EXPECT_EQ(viewed.experts().in_biases(), rounded.experts().in_biases());
  EXPECT_EQ(viewed.experts().out_biases(), rounded.experts().out_biases());
  const RowMatrix<double> y16 = run_scored(viewed, c);
  EXPECT_EQ(y16, run_scored(rounded, c));
  const double e = nmse(y16, hf);
  std::printf("[ measure  ] gpt_oss_clamp compact bf16 (biases, clamp) output NMSE vs HF %.3g\n",
              e);
  EXPECT_GT(e, 0.0);
  EXPECT_LT(e, 1e-4);
}

TEST(GgufLlama4, InterleavedDenseLayersFollowTheStep) {
  // interleave_moe_layer_step = 2: layer 0 is dense (no router), layer 1 the case's MoE layer.
  const auto c = moe::io::SafetensorsFile::open(data_dir() + "v2/llama4.safetensors");
  const auto bytes = gguf_from_v2(c, GgmlType::F32, 2);
  const auto f = GgufFile::from_buffer(bytes, "l4.gguf");
  const auto spec = moe::io::read_gguf_moe_spec(f);
  EXPECT_EQ(spec.moe_layer_step, 2);
  EXPECT_TRUE(spec.moe.weight_expert_input);
  EXPECT_EQ(spec.moe.shared_d_ff, 24);
  EXPECT_EQ(error_of([&] { (void)moe::io::load_gguf_moe_layer<ScoredBlock<double>>(f, spec, 0); }),
            "moe: l4.gguf: layer 0 is dense (it has no blk.0.ffn_gate_inp.weight)");
  const RowMatrix<double> hf = c.read_matrix<double>("output");
  EXPECT_LE((run_scored(moe::io::load_gguf_moe_layer<ScoredBlock<double>>(f, spec, 1), c) - hf)
                .cwiseAbs()
                .maxCoeff(),
            1e-6 * (1 + hf.cwiseAbs().maxCoeff()));
  // A step that disagrees with the routers is refused by name.
  GgufWriter w;
  for (const auto& kv : f.metadata()) {
    w.set_value(kv.key, kv.key == "llama4.interleave_moe_layer_step"
                            ? moe::io::GgufValue::of(std::uint32_t{1})
                            : kv.value);
  }
  for (const auto& t : f.tensors()) w.add_tensor(t.name, t.type, t.dims, f.data(t), t.nbytes);
  const auto g = GgufFile::from_buffer(w.to_bytes(), "step.gguf");
  EXPECT_EQ(error_of([&] { (void)moe::io::read_gguf_moe_spec(g); }),
            "moe: step.gguf: layer 0 has no router (blk.0.ffn_gate_inp.weight) but "
            "llama4.interleave_moe_layer_step = 1 makes it sparse");
}

}  // namespace
