// Loading checkpoints as they are stored (issue 14): bf16 experts as zero-copy views of the
// mapped file, fp8 + weight_scale_inv (DeepSeek's layout) as fp8 views, quantise-on-load, the
// run-time choice of storage (AnyMoeBlock), the lifetime of views, usage counters, and malformed
// block scales.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

using BlockF32 = moe::SparseMoeBlock<float, moe::gating::SoftmaxTopK, moe::SwiGLU>;
// The exact bf16 products (fp32 activations): the views must give the fp32 block's output up to
// summation order. The fast path's own error is tested in quant_block_test and below.
using BlockBf16 = moe::io::detail::with_storage_t<
    BlockF32, moe::CompactExperts<moe::Bf16, moe::CompactMode::exact>>;
using Any = moe::io::AnyMoeBlock<float>;

// Mixtral-style config with awkward sizes.
Json awkward_mixtral(Index layers = 2) {
  Json c = moe::test::mixtral_config(layers);
  c["hidden_size"] = 31;
  c["intermediate_size"] = 7;
  c["num_local_experts"] = 7;
  return c;
}

// Every value rounded to bf16 (so that a BF16 file holds exactly these weights).
void round_to_bf16(RowMatrix<float>& m) {
  for (Index i = 0; i < m.size(); ++i) {
    m.data()[i] = moe::kernels::bf16_to_float(moe::kernels::float_to_bf16(m.data()[i]));
  }
}
void round_to_bf16(moe::MoeWeights<float>& w) {
  round_to_bf16(w.router);
  for (Index e = 0; e < w.experts.num_experts(); ++e) {
    RowMatrix<float> a = w.experts.w_in(e), b = w.experts.w_out(e);
    round_to_bf16(a);
    round_to_bf16(b);
    w.experts.w_in(e) = a;
    w.experts.w_out(e) = b;
  }
}

// config.json + model.safetensors with every tensor BF16 (values rounded first).
void write_bf16_model(const ScratchDir& dir, const Json& config, Layout layout,
                      std::uint64_t seed) {
  moe::test::write_text(dir.file("config.json"), config.dump(2));
  const auto spec = moe::io::parse_model_spec(config.dump(), "config.json");
  std::mt19937_64 rng(seed);
  std::vector<TensorToWrite> tensors;
  for (Index l = 0; l < spec.total_layers(); ++l) {
    auto w = moe::test::random_layer(spec, rng);
    round_to_bf16(w);
    moe::test::add_moe_layer(tensors, spec.family, l, w, spec.moe, layout, moe::io::Dtype::BF16);
  }
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
}

RowMatrix<float> random_tokens(Index n, Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  return moe::test::random_matrix<float>(n, d, rng, 1.0);
}

double nmse(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
  return (got - ref).squaredNorm() / std::max(1e-30, double(ref.squaredNorm()));
}

// Sum of the bytes of the routed-expert tensors of `layer` in the files (weights and scales).
std::size_t expert_file_bytes(const moe::io::ModelCheckpoint& m, Index layer) {
  const auto n = moe::io::expert_tensor_names(m, layer);
  std::size_t bytes = 0;
  auto add = [&](const std::string& name) {
    bytes += m.tensors().info(name).nbytes;
    if (m.tensors().contains(name + "_scale_inv"))
      bytes += m.tensors().info(name + "_scale_inv").nbytes;
  };
  if (n.fused) {
    add(n.fused_in);
    add(n.fused_out);
    return bytes;
  }
  for (Index e = 0; e < m.spec().moe.num_experts; ++e) {
    add(n.gate(e));
    if (m.spec().row().gated_experts) add(n.up(e));
    add(n.down(e));
  }
  return bytes;
}

// ---- bf16 ---------------------------------------------------------------------------------

class Bf16Stored : public ::testing::TestWithParam<Layout> {};

TEST_P(Bf16Stored, ViewsTheFileAndMatchesTheFp32Block) {
  ScratchDir dir;
  write_bf16_model(dir, awkward_mixtral(), GetParam(), 11);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  EXPECT_EQ(moe::io::stored_format(m, 1), WeightFormat::bf16);

  const auto stored = moe::io::load_moe_layer<BlockBf16>(m, 1);
  LoadOptions fp32;
  fp32.weights = WeightFormat::fp32;
  const auto ref = moe::io::load_moe_layer<BlockF32>(m, 1, fp32);

  // Zero-copy: the codes are the file's bytes.
  const auto names = moe::io::expert_tensor_names(m, 1);
  const auto& e3 = stored.experts().gate(3);
  EXPECT_FALSE(e3.owning());
  const unsigned char* file_bytes = m.tensors().file_of(names.input(3)).data(names.input(3));
  const Index offset = names.fused ? 3 * 2 * 7 * 31 * 2 : 0;
  EXPECT_EQ(reinterpret_cast<const unsigned char*>(e3.codes()), file_bytes + offset);
  EXPECT_EQ(stored.expert_bytes(), expert_file_bytes(m, 1));
  EXPECT_EQ(stored.expert_bytes() * 2, ref.expert_bytes());

  // The same weights, bit for bit, and the same outputs to float rounding.
  for (Index e = 0; e < 7; ++e) {
    EXPECT_EQ(stored.experts().gate(e).dequantize(), RowMatrix<float>(ref.experts().gate(e)));
    EXPECT_EQ(stored.experts().up(e).dequantize(), RowMatrix<float>(ref.experts().up(e)));
    EXPECT_EQ(stored.experts().w_out(e).dequantize(), RowMatrix<float>(ref.experts().w_out(e)));
  }
  for (Index tokens : {1, 7, 31, 129}) {
    const RowMatrix<float> x = random_tokens(tokens, 31, 100 + tokens);
    EXPECT_LE(nmse(stored.forward(x), ref.forward(x)), 1e-11) << tokens;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, Bf16Stored, ::testing::Values(Layout::per_expert, Layout::fused),
                         [](const auto& info) {
                           return info.param == Layout::fused ? "fused" : "per_expert";
                         });

TEST(IoStored, AViewKeepsTheMappingAlive) {
  ScratchDir dir;
  write_bf16_model(dir, awkward_mixtral(), Layout::per_expert, 12);
  const RowMatrix<float> x = random_tokens(5, 31, 1);
  RowMatrix<float> want;
  std::unique_ptr<BlockBf16> block;
  {
    const auto m = moe::io::ModelCheckpoint::open(dir.str());
    block = std::make_unique<BlockBf16>(moe::io::load_moe_layer<BlockBf16>(m, 0));
    want = block->forward(x);
  }  // the checkpoint is gone; the block's views hold the file
  std::filesystem::remove(dir.file("model.safetensors"));  // unlinked: the mapping stays
  EXPECT_EQ(block->forward(x), want);
  const BlockBf16 copy = *block;
  block.reset();
  EXPECT_EQ(copy.forward(x), want);
}

TEST(IoStored, ShardedBf16ViewsEveryShard) {
  ScratchDir one, sharded;
  write_bf16_model(one, awkward_mixtral(), Layout::per_expert, 13);
  // The same tensors in two shards, split by name.
  const auto file = moe::io::SafetensorsFile::open(one.file("model.safetensors"));
  std::vector<TensorToWrite> a, b;
  Json weight_map = Json::object();
  for (const auto& name : file.names()) {
    const auto& info = file.info(name);
    TensorToWrite t{name, info.dtype, info.shape,
                    std::vector<unsigned char>(file.data(name), file.data(name) + info.nbytes)};
    const bool first = name.find("experts.3.") == std::string::npos &&
                       name.find("experts.5.") == std::string::npos;
    (first ? a : b).push_back(std::move(t));
    weight_map[name] = first ? "model-00001-of-00002.safetensors"
                             : "model-00002-of-00002.safetensors";
  }
  moe::io::write_safetensors(sharded.file("model-00001-of-00002.safetensors"), a);
  moe::io::write_safetensors(sharded.file("model-00002-of-00002.safetensors"), b);
  moe::test::write_text(sharded.file("model.safetensors.index.json"),
                        Json{{"weight_map", weight_map}}.dump());
  moe::test::write_text(sharded.file("config.json"), awkward_mixtral().dump());

  const auto from_one = moe::io::load_any_moe_layer<float>(one.str(), 1);
  const auto from_shards = moe::io::load_any_moe_layer<float>(sharded.str(), 1);
  EXPECT_EQ(from_shards.weight_format(), WeightFormat::bf16);
  EXPECT_EQ(from_shards.family_index(), 0u);
  EXPECT_EQ(from_shards.index(), Any::num_families);  // bf16 storage, family 0
  const RowMatrix<float> x = random_tokens(9, 31, 2);
  EXPECT_EQ(from_shards.forward(x), from_one.forward(x));
  EXPECT_EQ(from_shards.expert_bytes(), from_one.expert_bytes());
}

// ---- the storage chosen at run time ---------------------------------------------------------

TEST(IoStored, AnyBlockChoosesTheStorage) {
  ScratchDir dir;
  write_bf16_model(dir, awkward_mixtral(), Layout::per_expert, 14);
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  const RowMatrix<float> x = random_tokens(31, 31, 3);
  LoadOptions o;
  o.weights = WeightFormat::fp32;
  const Any f32 = moe::io::load_any_moe_layer<float>(m, 0, o);
  EXPECT_EQ(f32.index(), 0u);
  EXPECT_EQ(f32.weight_format(), WeightFormat::fp32);
  EXPECT_EQ(f32.residency(), nullptr);
  const RowMatrix<float> ref = f32.forward(x);
  // Quantised on load from the bf16 file, expert by expert: the format's error only.
  const struct {
    WeightFormat f;
    double bound;
    std::size_t bytes;
  } cases[] = {// bf16 runs the fast path: x and activations rounded to bf16 (NMSE ~1e-5).
               {WeightFormat::as_stored, 3e-5, 7 * 3 * 7 * 31 * 2},
               {WeightFormat::bf16, 3e-5, 7 * 3 * 7 * 31 * 2},
               {WeightFormat::int8, 1e-3, 7 * (3 * 7 * 31 + 4 * (7 + 7 + 31))},
               {WeightFormat::fp8, 5e-3, 7 * (3 * 7 * 31 + 4 * 3)}};
  for (const auto& c : cases) {
    o.weights = c.f;
    const Any b = moe::io::load_any_moe_layer<float>(m, 0, o);
    EXPECT_EQ(b.family_index(), 0u);
    EXPECT_EQ(b.weight_format(),
              c.f == WeightFormat::as_stored ? WeightFormat::bf16 : c.f);
    EXPECT_EQ(b.expert_bytes(), c.bytes) << moe::io::weight_format_name(c.f);
    EXPECT_LE(nmse(b.forward(x), ref), c.bound) << moe::io::weight_format_name(c.f);
    ASSERT_NE(b.residency(), nullptr);
    // Views are recorded as mapped ranges; quantised experts are owned.
    EXPECT_EQ(b.residency()->mapped(), c.f == WeightFormat::as_stored || c.f == WeightFormat::bf16);
  }
  // A double block converts; compact formats need float.
  EXPECT_EQ(moe::io::load_any_moe_layer<double>(m, 0).weight_format(), WeightFormat::fp32);
  o.weights = WeightFormat::bf16;
  moe::test::expect_error<moe::config_error>(
      [&] { moe::io::load_any_moe_layer<double>(m, 0, o); },
      "moe: LoadOptions::weights = bf16 needs a float block (compact experts are float)");
}

TEST(IoStored, UsageCountsCountTheRoutedRows) {
  ScratchDir dir;
  write_bf16_model(dir, awkward_mixtral(), Layout::per_expert, 15);
  const Any b = moe::io::load_any_moe_layer<float>(dir.str(), 0);
  ASSERT_NE(b.residency(), nullptr);
  EXPECT_TRUE(b.residency()->mapped());
  const RowMatrix<float> x = random_tokens(13, 31, 4);
  RowMatrix<float> y(13, 31);
  moe::Workspace<float> ws;
  b.forward(x, y, ws);
  b.forward(x, y, ws);
  const auto usage = b.residency()->usage_counts();
  ASSERT_EQ(usage.size(), 7u);
  std::uint64_t total = 0;
  for (Index e = 0; e < 7; ++e) {
    EXPECT_EQ(usage[std::size_t(e)], 2 * std::uint64_t(ws.plan().counts[std::size_t(e)])) << e;
    total += usage[std::size_t(e)];
  }
  EXPECT_EQ(total, 2u * 13u * 2u);  // two calls, 13 tokens, top-2
  // Each expert's ranges are its three bf16 matrices in the file.
  EXPECT_EQ(b.residency()->ranges(2).size(), 3u);
  b.residency()->reset_usage();
  EXPECT_EQ(b.residency()->usage_counts()[0], 0u);
}

// ---- fp8 in DeepSeek's layout ----------------------------------------------------------------

// A DeepSeek-V3 layer whose experts are F8_E4M3 + weight_scale_inv (128 x 128 blocks, F32), as
// our writer lays them out; the rest F32.
Json fp8_config() {
  Json c = moe::test::deepseek_v3_config();
  c["hidden_size"] = 160;             // scale grid 2 x 2 per expert matrix
  c["moe_intermediate_size"] = 136;
  c["n_routed_experts"] = 8;
  c["num_hidden_layers"] = 2;
  return c;
}

struct Fp8Model {
  std::vector<moe::CompactExpertStack<moe::Fp8E4M3>> experts;  // per layer, as written
};

TensorToWrite raw(const std::string& name, moe::io::Dtype dtype, std::vector<std::int64_t> shape,
                  const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  return TensorToWrite{name, dtype, std::move(shape), std::vector<unsigned char>(p, p + bytes)};
}

// `mutate(tensors)` may damage the tensors before they are written.
template <class Mutate>
Fp8Model write_fp8_model(const ScratchDir& dir, std::uint64_t seed, Mutate mutate) {
  const Json config = fp8_config();
  moe::test::write_text(dir.file("config.json"), config.dump(2));
  const auto spec = moe::io::parse_model_spec(config.dump(), "config.json");
  std::mt19937_64 rng(seed);
  std::vector<TensorToWrite> tensors;
  Fp8Model out;
  for (Index l = 0; l < spec.total_layers(); ++l) {
    auto w = moe::test::random_layer(spec, rng);
    if (!spec.is_moe_layer(l)) {
      out.experts.emplace_back();
      continue;
    }
    auto stack = moe::CompactExpertStack<moe::Fp8E4M3>::from(w.experts);
    // Router, bias and shared expert as F32, then the experts by hand.
    std::vector<TensorToWrite> layer;
    moe::test::add_moe_layer(layer, spec.family, l, w, spec.moe, Layout::per_expert);
    for (auto& t : layer) {
      if (t.name.find(".experts.") == std::string::npos) tensors.push_back(std::move(t));
    }
    const std::string p = moe::detail::concat("model.layers.", l, ".mlp.experts.");
    for (Index e = 0; e < stack.num_experts(); ++e) {
      auto put = [&](const std::string& proj, const moe::CompactMatrix<moe::Fp8E4M3>& q) {
        const std::string name = moe::detail::concat(p, e, '.', proj, ".weight");
        tensors.push_back(raw(name, moe::io::Dtype::F8_E4M3, {q.rows(), q.cols()}, q.codes(),
                              std::size_t(q.rows() * q.cols())));
        tensors.push_back(raw(name + "_scale_inv", moe::io::Dtype::F32,
                              {q.scale_grid_rows(), q.scale_grid_cols()}, q.scales(),
                              std::size_t(q.num_scales()) * 4));
      };
      put("gate_proj", stack.gate(e));
      put("up_proj", stack.up(e));
      put("down_proj", stack.w_out(e));
    }
    out.experts.push_back(std::move(stack));
  }
  mutate(tensors);
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  return out;
}

using BlockV3 = moe::SparseMoeBlock<float, moe::gating::GroupLimitedTopK, moe::SwiGLU>;
using BlockV3Fp8 = moe::io::detail::with_storage_t<BlockV3, moe::CompactExperts<moe::Fp8E4M3>>;

TEST(IoStoredFp8, LoadsAsFp8AndMatchesTheDequantisedBlockBitwise) {
  ScratchDir dir;
  const Fp8Model written = write_fp8_model(dir, 21, [](auto&) {});
  const auto m = moe::io::ModelCheckpoint::open(dir.str());
  EXPECT_EQ(moe::io::stored_format(m, 1), WeightFormat::fp8);
  const Any any = moe::io::load_any_moe_layer<float>(m, 1);
  EXPECT_EQ(any.weight_format(), WeightFormat::fp8);
  const BlockV3Fp8* stored = any.get_if<BlockV3Fp8>();
  ASSERT_NE(stored, nullptr);
  EXPECT_EQ(stored->expert_bytes(), expert_file_bytes(m, 1));
  EXPECT_FALSE(stored->experts().gate(0).owning());

  LoadOptions fp32;
  fp32.weights = WeightFormat::fp32;
  const auto ref = moe::io::load_moe_layer<BlockV3>(m, 1, fp32);
  // Views decode to exactly the weights the fp32 loader dequantises.
  for (Index e = 0; e < 8; ++e) {
    EXPECT_EQ(stored->experts().gate(e).dequantize(), RowMatrix<float>(ref.experts().gate(e)));
    EXPECT_EQ(stored->experts().up(e).dequantize(), RowMatrix<float>(ref.experts().up(e)));
    EXPECT_EQ(stored->experts().w_out(e).dequantize(), RowMatrix<float>(ref.experts().w_out(e)));
  }
  // The block over the file equals, bitwise, the block over the codes and scales as written.
  moe::MoeWeights<float> others = ref.weights();
  others.experts = moe::ExpertStack<float>();
  const BlockV3Fp8 written_block(ref.config(), others, written.experts[1],
                                 ref.gating().options);
  for (Index tokens : {1, 7, 31, 129}) {
    const RowMatrix<float> x = random_tokens(tokens, 160, 200 + tokens);
    const RowMatrix<float> got = stored->forward(x);
    EXPECT_EQ(got, written_block.forward(x)) << tokens;
    EXPECT_LE(nmse(got, ref.forward(x)), 1e-11) << tokens;
  }
}

TEST(IoStoredFp8, MalformedScalesAreIoErrorsNamingTheTensor) {
  const std::string w = "model.layers.1.mlp.experts.2.up_proj.weight";
  const std::string s = w + "_scale_inv";
  auto expect_io = [&](auto mutate, auto message_of_dir) {
    ScratchDir dir;
    write_fp8_model(dir, 22, mutate);
    for (WeightFormat f : {WeightFormat::as_stored, WeightFormat::fp32, WeightFormat::int8}) {
      LoadOptions o;
      o.weights = f;
      moe::test::expect_error<moe::io_error>(
          [&] { moe::io::load_any_moe_layer<float>(dir.str(), 1, o); }, message_of_dir(dir));
    }
  };
  auto find = [](std::vector<TensorToWrite>& ts, const std::string& name) -> TensorToWrite& {
    for (auto& t : ts) {
      if (t.name == name) return t;
    }
    throw std::runtime_error("no " + name);
  };
  // Wrong shape: [2 x 1] instead of [2 x 2].
  expect_io(
      [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find(ts, s);
        t.shape = {2, 1};
        t.bytes.resize(8);
      },
      [&](const ScratchDir& dir) {
        return "moe: " + dir.str() + ": block scales '" + s +
               "' have shape [2 x 1] of F32, expected [2 x 2] (a floating dtype) for weight "
               "[136 x 160] in 128 x 128 blocks";
      });
  // Non-finite.
  expect_io(
      [&](std::vector<TensorToWrite>& ts) {
        const float inf = INFINITY;
        std::memcpy(find(ts, s).bytes.data() + 4, &inf, 4);
      },
      [&](const ScratchDir& dir) {
        return "moe: " + dir.file("model.safetensors") + ": layer 1: block scales '" + s +
               "' have a non-finite value (inf at [1])";
      });
  // Missing: an io_error for fp8 views (the fp32 path reads a scale-less F8_E4M3 tensor as its
  // values, as before).
  ScratchDir dir;
  write_fp8_model(dir, 23, [&](std::vector<TensorToWrite>& ts) {
    for (std::size_t i = 0; i < ts.size(); ++i) {
      if (ts[i].name == s) ts.erase(ts.begin() + std::ptrdiff_t(i));
    }
  });
  moe::test::expect_error<moe::io_error>(
      [&] { moe::io::load_any_moe_layer<float>(dir.str(), 1); },
      "moe: " + dir.str() + ": layer 1: F8_E4M3 tensor '" + w +
          "' has no block scales: missing tensor '" + s + "'");
}

}  // namespace
