// Block-quantised experts from checkpoints (issue 14): gpt-oss's MXFP4 experts (`*_blocks` +
// `*_scales`) loaded as stored, checked against a plain decode of the bytes written and against
// the fp32 loader's dequantised weights; quantise-on-load to q8 / q4 against quantising the fp32
// block's weights directly; the fast / exact choice of load_any_moe_layer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/model.hpp"
#include "moe/moe.hpp"

#include "io_test_util.hpp"
#include "test_util.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
using moe::io::LoadOptions;
using moe::io::WeightFormat;
using moe::test::Json;
using moe::test::Layout;
using moe::test::ScratchDir;
using moe::test::TensorToWrite;

using Any = moe::io::AnyMoeBlock<float>;
using BlockF32 = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU>;
template <class Format, moe::CompactMode Mode = moe::CompactMode::fast>
using BlockOf = moe::io::detail::with_storage_t<BlockF32, moe::CompactExperts<Format, Mode>>;
constexpr moe::CompactMode kExact = moe::CompactMode::exact;

RowMatrix<float> random_tokens(Index n, Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  return moe::test::random_matrix<float>(n, d, rng, 1.0);
}

double nmse(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
  return (got - ref).squaredNorm() / std::max(1e-30, double(ref.squaredNorm()));
}

TensorToWrite bytes_tensor(const std::string& name, std::vector<std::int64_t> shape,
                           std::vector<unsigned char> bytes) {
  return TensorToWrite{name, moe::io::Dtype::U8, std::move(shape), std::move(bytes)};
}

// ---- MXFP4 as gpt-oss stores it -------------------------------------------------------------

constexpr Index kD = 64, kF = 32, kE = 5;

// The MXFP4 tensors of one fused projection [E, rows, cols] as written: random code bytes and
// scale bytes in [120, 130] (weights of about 2^-7 .. 2^3 times an e2m1 value).
struct Mxfp4Written {
  std::vector<unsigned char> blocks, scales;
  Index rows = 0, cols = 0;

  // The weight of expert e, stored row r, column c, decoded from the bytes by the OCP rule
  // (independent of the library's decode).
  float weight(Index e, Index r, Index c) const {
    static const float kFp4[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                   -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
    const Index nb = cols / 32, row = e * rows + r;
    const unsigned char b = blocks[std::size_t((row * nb + c / 32) * 16 + (c % 32) / 2)];
    const int code = (c % 2) ? (b >> 4) : (b & 15);
    return std::ldexp(kFp4[code], int(scales[std::size_t(row * nb + c / 32)]) - 127);
  }
};

Mxfp4Written random_mxfp4(Index rows, Index cols, std::mt19937_64& rng) {
  Mxfp4Written w;
  w.rows = rows;
  w.cols = cols;
  w.blocks.resize(std::size_t(kE * rows * cols / 2));
  w.scales.resize(std::size_t(kE * rows * cols / 32));
  for (auto& b : w.blocks) b = static_cast<unsigned char>(rng() & 0xFF);
  for (auto& s : w.scales) s = static_cast<unsigned char>(120 + rng() % 11);
  return w;
}

struct Mxfp4Model {
  Mxfp4Written in, out;  // gate_up_proj [E, 2F, D], down_proj [E, D, F]
  std::string prefix;    // the fused names' prefix
};

// A one-layer checkpoint of `model_type` whose experts are MXFP4 under transformers' names
// PREFIX experts.{gate_up,down}_proj_{blocks,scales}; gpt-oss adds its router bias and expert
// biases. `mutate` may damage the tensors before they are written.
template <class Mutate>
Mxfp4Model write_mxfp4_model(const ScratchDir& dir, const std::string& model_type,
                             std::uint64_t seed, Mutate mutate) {
  const bool gpt_oss = model_type == "gpt_oss";
  const Json config = {{"model_type", model_type},    {"hidden_size", kD},
                       {"intermediate_size", kF},     {"num_local_experts", kE},
                       {"num_experts_per_tok", 2},    {"num_hidden_layers", 1},
                       {"hidden_act", "silu"}};
  moe::test::write_text(dir.file("config.json"), config.dump(2));
  std::mt19937_64 rng(seed);
  Mxfp4Model model;
  model.prefix = "model.layers.0.mlp.";
  model.in = random_mxfp4(2 * kF, kD, rng);
  model.out = random_mxfp4(kD, kF, rng);
  const std::string p = model.prefix;
  std::vector<TensorToWrite> t;
  t.push_back(moe::test::tensor(p + (gpt_oss ? "router.weight" : "gate.weight"),
                                moe::test::random_matrix<float>(kE, kD, rng, 0.5)));
  if (gpt_oss) {
    t.push_back(moe::test::tensor(p + "router.bias", moe::test::random_matrix<float>(1, kE, rng),
                                  {kE}));
    t.push_back(moe::test::tensor(p + "experts.gate_up_proj_bias",
                                  moe::test::random_matrix<float>(kE, 2 * kF, rng, 0.1)));
    t.push_back(moe::test::tensor(p + "experts.down_proj_bias",
                                  moe::test::random_matrix<float>(kE, kD, rng, 0.1)));
  }
  t.push_back(bytes_tensor(p + "experts.gate_up_proj_blocks", {kE, 2 * kF, kD / 32, 16},
                           model.in.blocks));
  t.push_back(bytes_tensor(p + "experts.gate_up_proj_scales", {kE, 2 * kF, kD / 32},
                           model.in.scales));
  t.push_back(bytes_tensor(p + "experts.down_proj_blocks", {kE, kD, kF / 32, 16},
                           model.out.blocks));
  t.push_back(bytes_tensor(p + "experts.down_proj_scales", {kE, kD, kF / 32}, model.out.scales));
  mutate(t);
  moe::io::write_safetensors(dir.file("model.safetensors"), t);
  return model;
}
Mxfp4Model write_mxfp4_model(const ScratchDir& dir, const std::string& model_type,
                             std::uint64_t seed) {
  return write_mxfp4_model(dir, model_type, seed, [](auto&) {});
}

// Bytes of the MXFP4 expert tensors in the file.
std::size_t mxfp4_file_bytes(const moe::io::ModelCheckpoint& m, const std::string& prefix) {
  std::size_t b = 0;
  for (const char* n : {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks",
                        "down_proj_scales"}) {
    b += m.tensors().info(prefix + "experts." + n).nbytes;
  }
  return b;
}

// Layer 0 loaded three ways: fp32 (the dequantised reference), as stored fast, as stored exact.
struct ThreeLoads {
  Any fp32, fast, exact;
};
ThreeLoads load_fp32_fast_exact(const moe::io::ModelCheckpoint& m) {
  LoadOptions fp32;
  fp32.weights = WeightFormat::fp32;
  LoadOptions exact;
  exact.exact = true;
  return {moe::io::load_any_moe_layer<float>(m, 0, fp32), moe::io::load_any_moe_layer<float>(m, 0),
          moe::io::load_any_moe_layer<float>(m, 0, exact)};
}

TEST(IoStoredMxfp4, GptOssExpertsLoadAsStoredWithTheWeightsWritten) {
  ScratchDir dir;
  const Mxfp4Model written = write_mxfp4_model(dir, "gpt_oss", 31);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  EXPECT_EQ(moe::io::stored_format(m, 0), WeightFormat::mxfp4);

  const auto exact = moe::io::load_compact_experts<moe::Mxfp4, kExact>(m, 0);
  const auto fast = moe::io::load_compact_experts<moe::Mxfp4>(m, 0);
  const auto fp32 = moe::io::load_moe_weights<float>(m, 0);
  EXPECT_EQ(exact.bytes(), mxfp4_file_bytes(m, written.prefix));
  EXPECT_EQ(fast.bytes(), mxfp4_file_bytes(m, written.prefix));

  const std::string down_blocks = written.prefix + "experts.down_proj_blocks";
  const std::string gate_up_blocks = written.prefix + "experts.gate_up_proj_blocks";
  const unsigned char* file_down = m.tensors().file_of(down_blocks).data(down_blocks);
  for (Index e = 0; e < kE; ++e) {
    // Exact mode keeps the stored layout: down_proj is the file's bytes, gate / up copies.
    EXPECT_FALSE(exact.w_out(e).owning());
    EXPECT_EQ(exact.w_out(e).stored().codes, file_down + e * kD * (kF / 32) * 16);
    const auto* gate_codes = exact.gate(e).stored().codes;
    const unsigned char* file_in = m.tensors().file_of(gate_up_blocks).data(gate_up_blocks);
    EXPECT_TRUE(gate_codes < file_in || gate_codes >= file_in + kE * 2 * kF * (kD / 32) * 16);
    EXPECT_EQ(fast.gate(e).layout(), moe::QuantLayout::panels);

    // gate row j is stored row 2j, up row j stored row 2j + 1 (transformers' gpt-oss layout).
    RowMatrix<float> gate(kF, kD), up(kF, kD), down(kD, kF);
    for (Index j = 0; j < kF; ++j) {
      for (Index c = 0; c < kD; ++c) {
        gate(j, c) = written.in.weight(e, 2 * j, c);
        up(j, c) = written.in.weight(e, 2 * j + 1, c);
      }
    }
    for (Index r = 0; r < kD; ++r) {
      for (Index c = 0; c < kF; ++c) down(r, c) = written.out.weight(e, r, c);
    }
    EXPECT_EQ(exact.gate(e).dequantize(), gate) << e;
    EXPECT_EQ(exact.up(e).dequantize(), up) << e;
    EXPECT_EQ(exact.w_out(e).dequantize(), down) << e;
    EXPECT_EQ(fast.gate(e).dequantize(), gate) << e;
    EXPECT_EQ(fast.up(e).dequantize(), up) << e;
    EXPECT_EQ(fast.w_out(e).dequantize(), down) << e;
    // The fp32 loader dequantises to the same weights.
    EXPECT_EQ(RowMatrix<float>(fp32.experts.gate(e)), gate) << e;
    EXPECT_EQ(RowMatrix<float>(fp32.experts.up(e)), up) << e;
    EXPECT_EQ(RowMatrix<float>(fp32.experts.w_out(e)), down) << e;
  }
  // A view outlives the checkpoint object (it shares the mapping).
  RowMatrix<float> before = exact.w_out(2).dequantize();
  {
    auto copy = moe::io::load_compact_experts<moe::Mxfp4, kExact>(
        moe::io::ModelCheckpoint::open(dir.str()), 0);
    EXPECT_EQ(copy.w_out(2).dequantize(), before);
  }
}

// gpt-oss as stored: a compact Mxfp4 block (not fp32) holding the expert biases next to the
// file's MXFP4 bytes and running the clamped GLU. Exact mode is bitwise the fp32 load (the
// dequantised weights; the fp32 load itself is checked against HF's GptOssMLP by io_loader_test's
// gpt_oss / gpt_oss_clamp golden cases) while every expert gets at most small_batch_rows rows;
// fast mode within the int8 activations' bound.
TEST(IoStoredMxfp4, GptOssAsStoredIsACompactBlockEqualToTheFp32Load) {
  ScratchDir dir;
  const Mxfp4Model written = write_mxfp4_model(dir, "gpt_oss", 33);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  const auto [ref, fast, exact] = load_fp32_fast_exact(m);
  using GptOssF32 = Any::Alternative<4>;
  ASSERT_NE(ref.get_if<GptOssF32>(), nullptr);
  const auto* fast_block =
      fast.get_if<moe::io::detail::with_storage_t<GptOssF32, moe::CompactExperts<moe::Mxfp4>>>();
  const auto* exact_block = exact.get_if<
      moe::io::detail::with_storage_t<GptOssF32, moe::CompactExperts<moe::Mxfp4, kExact>>>();
  ASSERT_NE(fast_block, nullptr);
  ASSERT_NE(exact_block, nullptr);
  EXPECT_EQ(fast.weight_format(), WeightFormat::mxfp4);
  EXPECT_EQ(exact.weight_format(), WeightFormat::mxfp4);
  EXPECT_FALSE(ref.config().expert_glu.plain());

  // The biases as the fp32 loader reads them (de-interleaved), and counted in expert_bytes().
  const auto& ref_experts = ref.get_if<GptOssF32>()->experts();
  EXPECT_EQ(exact_block->experts().in_biases(), ref_experts.in_biases());
  EXPECT_EQ(exact_block->experts().out_biases(), ref_experts.out_biases());
  EXPECT_EQ(fast_block->experts().in_biases(), ref_experts.in_biases());
  const std::size_t bias_bytes = std::size_t(kE * (2 * kF + kD)) * sizeof(float);
  EXPECT_EQ(exact.expert_bytes(), mxfp4_file_bytes(m, written.prefix) + bias_bytes);
  EXPECT_EQ(fast.expert_bytes(), mxfp4_file_bytes(m, written.prefix) + bias_bytes);
  EXPECT_EQ(ref.expert_bytes(), std::size_t(kE * 3 * kD * kF) * sizeof(float) + bias_bytes);

  for (Index tokens : {1, 7, 31}) {
    const RowMatrix<float> x = random_tokens(tokens, kD, 500 + tokens);
    moe::Workspace<float> ws;
    RowMatrix<float> want(tokens, kD), got(tokens, kD);
    ref.forward(x, want, ws);
    const auto& counts = ws.plan().counts;
    const Index max_rows = *std::max_element(counts.begin(), counts.begin() + kE);
    exact.forward(x, got, ws);
    if (max_rows <= moe::kernels::small_batch_rows) {
      EXPECT_EQ(got, want) << tokens;
    } else {  // the prefill tiles sum in another order (docs/compact.md)
      EXPECT_LE(nmse(got, want), 1e-11) << tokens;
    }
    EXPECT_LE(nmse(fast.forward(x), want), 1e-3) << tokens;
  }
  // An expert gets at most one row per token: at 1 and 7 tokens the bitwise branch always ran.
}

// The same bytes under a plain SwiGLU family: the whole block as stored, fast and exact.
TEST(IoStoredMxfp4, AsStoredBlockEqualsTheFp32BlockOnTheDequantisedWeights) {
  ScratchDir dir;
  const Mxfp4Model written = write_mxfp4_model(dir, "mixtral", 32);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  const auto [ref, fast, exact] = load_fp32_fast_exact(m);
  EXPECT_EQ(fast.weight_format(), WeightFormat::mxfp4);
  EXPECT_FALSE(fast.exact());
  EXPECT_EQ(exact.weight_format(), WeightFormat::mxfp4);
  EXPECT_TRUE(exact.exact());
  ASSERT_NE((exact.get_if<BlockOf<moe::Mxfp4, kExact>>()), nullptr);
  ASSERT_NE(fast.get_if<BlockOf<moe::Mxfp4>>(), nullptr);
  EXPECT_EQ(exact.expert_bytes(), mxfp4_file_bytes(m, written.prefix));
  EXPECT_EQ(fast.expert_bytes(), mxfp4_file_bytes(m, written.prefix));
  EXPECT_EQ(ref.expert_bytes(), std::size_t(kE * 3 * kD * kF * 4));
  for (Index tokens : {1, 7, 31, 129}) {
    const RowMatrix<float> x = random_tokens(tokens, kD, 300 + tokens);
    const RowMatrix<float> want = ref.forward(x);
    // Exact: bitwise while no expert gets more than 16 rows (the decode path; docs/compact.md),
    // to float rounding beyond (the prefill tiles sum in another order).
    if (tokens <= 7) {
      EXPECT_EQ(exact.forward(x), want) << tokens;
    } else {
      EXPECT_LE(nmse(exact.forward(x), want), 1e-11) << tokens;
    }
    // Fast: int8 activations per block of 32 (README: q8 fast vs fp32 NMSE 1.2-2.5e-4, most of
    // it the activations' rounding), within an order of magnitude of that.
    EXPECT_LE(nmse(fast.forward(x), want), 1e-3) << tokens;
  }
  // Usage counters of the exact block (its down_proj views are mapped ranges).
  ASSERT_NE(exact.residency(), nullptr);
  exact.residency()->reset_usage();
  moe::Workspace<float> ws;
  RowMatrix<float> y(3, kD);
  exact.forward(random_tokens(3, kD, 7), y, ws);
  std::uint64_t rows = 0;
  for (auto n : exact.residency()->usage_counts()) rows += n;
  EXPECT_EQ(rows, 3u * 2u);
}

TEST(IoStoredMxfp4, MalformedTensorsAreIoErrorsNamingThem) {
  const std::string p = "model.layers.0.mlp.experts.";
  auto find = [](std::vector<TensorToWrite>& ts, const std::string& name) -> TensorToWrite& {
    for (auto& t : ts) {
      if (t.name == name) return t;
    }
    throw std::runtime_error("no " + name);
  };
  auto expect_io = [&](auto mutate, const std::string& message_tail) {
    ScratchDir dir;
    write_mxfp4_model(dir, "mixtral", 33, mutate);
    for (WeightFormat f : {WeightFormat::as_stored, WeightFormat::fp32, WeightFormat::q8}) {
      LoadOptions o;
      o.weights = f;
      moe::test::expect_error<moe::io_error>(
          [&] { moe::io::load_any_moe_layer<float>(dir.str(), 0, o); },
          "moe: " + dir.str() + ": layer 0: " + message_tail);
    }
  };
  expect_io([&](std::vector<TensorToWrite>& ts) { find(ts, p + "down_proj_scales").bytes[70] = 0xFF; },
            "MXFP4 scales '" + p + "down_proj_scales' hold 0xFF (NaN in E8M0) at [70]");
  expect_io(
      [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find(ts, p + "gate_up_proj_scales");
        t.shape = {kE, 2 * kF, 1};
        t.bytes.resize(std::size_t(kE * 2 * kF));
      },
      "MXFP4 tensor '" + p + "gate_up_proj_scales' has shape [5 x 64 x 1] of U8, expected "
      "[5 x 64 x 2] of U8");
  expect_io(
      [&](std::vector<TensorToWrite>& ts) {
        for (std::size_t i = 0; i < ts.size(); ++i) {
          if (ts[i].name == p + "down_proj_scales") ts.erase(ts.begin() + std::ptrdiff_t(i));
        }
      },
      "missing tensor '" + p + "down_proj_scales' (MXFP4 experts)");
}

// ---- quantise on load: q8, q4 --------------------------------------------------------------

Json quant_mixtral() {
  Json c = moe::test::mixtral_config(2);
  c["hidden_size"] = 64;
  c["intermediate_size"] = 32;
  c["num_local_experts"] = 7;
  return c;
}

template <class Format>
void expect_quantised_on_load(WeightFormat format, Layout layout) {
  ScratchDir dir;
  moe::test::write_model(dir, quant_mixtral(), layout, 41);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  LoadOptions fp32;
  fp32.weights = WeightFormat::fp32;
  const auto ref = moe::io::load_moe_layer<BlockF32>(m, 1, fp32);
  for (const bool exact : {false, true}) {
    LoadOptions o;
    o.weights = format;
    o.exact = exact;
    const Any any = moe::io::load_any_moe_layer<float>(m, 1, o);
    EXPECT_EQ(any.weight_format(), format);
    EXPECT_EQ(any.exact(), exact);
    // The block quantised from the fp32 block's weights directly (its constructor).
    const RowMatrix<float> x1 = random_tokens(1, 64, 51), x31 = random_tokens(31, 64, 52);
    auto compare = [&](const auto& direct) {
      const auto* loaded = any.get_if<std::decay_t<decltype(direct)>>();
      ASSERT_NE(loaded, nullptr);
      EXPECT_EQ(loaded->expert_bytes(), direct.expert_bytes());
      for (Index e = 0; e < 7; ++e) {
        EXPECT_EQ(loaded->experts().gate(e).dequantize(), direct.experts().gate(e).dequantize());
        EXPECT_EQ(loaded->experts().up(e).dequantize(), direct.experts().up(e).dequantize());
        EXPECT_EQ(loaded->experts().w_out(e).dequantize(), direct.experts().w_out(e).dequantize());
      }
      EXPECT_EQ(loaded->forward(x1), direct.forward(x1));
      EXPECT_EQ(loaded->forward(x31), direct.forward(x31));
    };
    if (exact) {
      compare(BlockOf<Format, kExact>(ref.config(), ref.weights(), ref.gating().options));
    } else {
      compare(BlockOf<Format>(ref.config(), ref.weights(), ref.gating().options));
    }
  }
}

TEST(IoQuantiseOnLoad, Q8PerExpert) { expect_quantised_on_load<moe::Q8>(WeightFormat::q8, Layout::per_expert); }
TEST(IoQuantiseOnLoad, Q8Fused) { expect_quantised_on_load<moe::Q8>(WeightFormat::q8, Layout::fused); }
TEST(IoQuantiseOnLoad, Q4PerExpert) { expect_quantised_on_load<moe::Q4>(WeightFormat::q4, Layout::per_expert); }
TEST(IoQuantiseOnLoad, Mxfp4Fused) {
  expect_quantised_on_load<moe::Mxfp4>(WeightFormat::mxfp4, Layout::fused);
}

// ---- quantise-on-load on several threads (LoadOptions::executor): bitwise the serial load ----

template <class Stack>
void expect_same_stacks(const Stack& a, const Stack& b, const std::string& what) {
  ASSERT_EQ(a.num_experts(), b.num_experts()) << what;
  EXPECT_EQ(a.bytes(), b.bytes()) << what;
  for (Index e = 0; e < a.num_experts(); ++e) {
    EXPECT_EQ(a.gate(e).dequantize(), b.gate(e).dequantize()) << what << ", expert " << e;
    if (a.gated()) {
      EXPECT_EQ(a.up(e).dequantize(), b.up(e).dequantize()) << what << ", expert " << e;
    }
    EXPECT_EQ(a.w_out(e).dequantize(), b.w_out(e).dequantize()) << what << ", expert " << e;
  }
}

// Layer `layer` of m as Format on the calling thread, on 1 worker and on 3 workers: the same bits.
template <class Format, moe::CompactMode Mode = moe::CompactMode::fast>
void expect_any_thread_count_loads_the_same(const moe::io::ModelCheckpoint& m, Index layer,
                                            const std::string& what) {
  const moe::ThreadPool one(1), three(3);
  LoadOptions serial, on_one, on_three;
  on_one.executor = &one;
  on_three.executor = &three;
  const auto a = moe::io::load_compact_experts<Format, Mode>(m, layer, serial);
  const std::string name = what + ", " + Format::name + (Mode == kExact ? " exact" : " fast");
  expect_same_stacks(a, moe::io::load_compact_experts<Format, Mode>(m, layer, on_one), name);
  expect_same_stacks(a, moe::io::load_compact_experts<Format, Mode>(m, layer, on_three), name);
}

void expect_every_format_loads_the_same(const moe::io::ModelCheckpoint& m, Index layer,
                                        const std::string& what) {
  expect_any_thread_count_loads_the_same<moe::Bf16>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Int8>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Fp8E4M3>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Q8>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Q8, kExact>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Q4>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Q4, kExact>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Mxfp4>(m, layer, what);
  expect_any_thread_count_loads_the_same<moe::Mxfp4, kExact>(m, layer, what);
}

TEST(IoQuantiseOnLoad, AnyThreadCountGivesTheSerialBitsInEveryFormatAndLayout) {
  for (const Layout layout : {Layout::per_expert, Layout::fused}) {
    for (const moe::io::Dtype dtype : {moe::io::Dtype::F32, moe::io::Dtype::BF16}) {
      ScratchDir dir;
      moe::test::write_model(dir, quant_mixtral(), layout, 43, dtype);
      const auto m = moe::io::ModelCheckpoint::open(dir.str());
      expect_every_format_loads_the_same(
          m, 1, std::string(layout == Layout::fused ? "fused" : "per expert") + " " +
                    moe::io::dtype_name(dtype));
    }
  }
  // MXFP4 experts converted to every other format (one task per expert).
  ScratchDir dir;
  write_mxfp4_model(dir, "mixtral", 44);
  expect_every_format_loads_the_same(moe::io::ModelCheckpoint::open(dir.str()), 0, "mxfp4 stored");
}

TEST(IoQuantiseOnLoad, OnThreadsTheErrorIsTheSerialLoadsFirst) {
  // Non-finite weights in experts 5 and 2: every executor reports expert 2's, as a serial load.
  ScratchDir dir;
  const Json c = quant_mixtral();
  moe::test::write_text(dir.file("config.json"), c.dump(2));
  const auto spec = moe::io::parse_model_spec(c.dump(), "config.json");
  std::mt19937_64 rng(45);
  std::vector<TensorToWrite> tensors;
  for (Index l = 0; l < 2; ++l) {
    auto w = moe::test::random_layer(spec, rng);
    if (l == 1) {
      w.experts.up(5)(3, 4) = std::numeric_limits<float>::infinity();
      w.experts.w_out(2)(1, 7) = std::numeric_limits<float>::quiet_NaN();
    }
    moe::test::add_moe_layer(tensors, spec.family, l, w, spec.moe, Layout::per_expert);
  }
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors, {{"format", "pt"}});
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  const std::string message = "moe: " + dir.file("model.safetensors") +
                              ": layer 1: tensor 'model.layers.1.block_sparse_moe.experts.2.w2."
                              "weight' has a non-finite value (nan at [1, 7])";
  const moe::ThreadPool three(3);
  for (const moe::Executor* executor : {static_cast<const moe::Executor*>(nullptr),
                                        static_cast<const moe::Executor*>(&three)}) {
    LoadOptions o;
    o.executor = executor;
    moe::test::expect_error<moe::io_error>(
        [&] { moe::io::load_compact_experts<moe::Q4>(m, 1, o); }, message);
  }
}

TEST(IoQuantiseOnLoad, WidthsNotMultipleOf32AreShapeErrors) {
  ScratchDir dir;
  Json c = quant_mixtral();
  c["intermediate_size"] = 7;
  moe::test::write_model(dir, c, Layout::per_expert, 42);
  LoadOptions o;
  o.weights = WeightFormat::q4;
  moe::test::expect_error<moe::shape_error>(
      [&] { moe::io::load_any_moe_layer<float>(dir.str(), 0, o); },
      "moe: q4 d_ff has 7 columns, expected a positive multiple of 32");
}

}  // namespace
