// Tests of moe/io/gguf.hpp: round trips of every metadata type (arrays and nested arrays too) and
// of every tensor type with a known layout through the writer and the reader (in memory and
// memory-mapped from disk), the typed accessors and their errors, decoding to float, and one
// malformed file per validation rule, each pinned by its message. Malformed files are built byte
// by byte (ByteBuilder) so that each breaks exactly one rule.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/gguf.hpp"

#include <unistd.h>

namespace {

using moe::io::GgmlType;
using moe::io::GgufFile;
using moe::io::GgufValue;
using moe::io::GgufValueType;
using moe::io::GgufWriter;

/// The message of the io_error `f` throws, or a marker that fails every comparison.
std::string io_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moe::io_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not an io_error: ") + e.what() + ">";
  }
  return "<no exception>";
}

std::string parse_error(std::vector<unsigned char> bytes) {
  return io_error_of([&] { (void)GgufFile::from_buffer(std::move(bytes), "t.gguf"); });
}

/// Little-endian GGUF bytes, field by field.
struct ByteBuilder {
  std::vector<unsigned char> bytes;
  template <class S>
  ByteBuilder& put(S v) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof v);
    return *this;
  }
  ByteBuilder& u32(std::uint32_t v) { return put(v); }
  ByteBuilder& u64(std::uint64_t v) { return put(v); }
  ByteBuilder& str(const std::string& s) {
    u64(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
    return *this;
  }
  ByteBuilder& header(std::uint64_t tensors, std::uint64_t kvs, std::uint32_t version = 3) {
    bytes.insert(bytes.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(tensors).u64(kvs);
  }
  /// A tensor info: name, dims, type, offset.
  ByteBuilder& info(const std::string& name, std::vector<std::uint64_t> dims, std::uint32_t type,
                    std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(dims.size()));
    for (auto d : dims) u64(d);
    return u32(type).u64(offset);
  }
  /// Zero padding to a multiple of `a`, then `n` data bytes.
  ByteBuilder& data(std::size_t n, std::size_t a = 32) {
    bytes.resize((bytes.size() + a - 1) / a * a, 0);
    bytes.resize(bytes.size() + n, 0x5A);
    return *this;
  }
};

std::vector<unsigned char> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<unsigned char> out(n);
  for (auto& b : out) b = static_cast<unsigned char>(rng());
  return out;
}

// ---- metadata ----

TEST(Gguf, EveryScalarTypeRoundTrips) {
  GgufWriter w;
  w.set<std::uint8_t>("u8", 255)
      .set<std::int8_t>("i8", -128)
      .set<std::uint16_t>("u16", 65535)
      .set<std::int16_t>("i16", -32768)
      .set<std::uint32_t>("u32", 4294967295u)
      .set<std::int32_t>("i32", std::numeric_limits<std::int32_t>::min())
      .set<float>("f32", -1.5e-30f)
      .set("bool_t", true)
      .set("bool_f", false)
      .set("str", std::string("caf\xc3\xa9 \0 end", 11))
      .set("empty", "")
      .set<std::uint64_t>("u64", std::numeric_limits<std::uint64_t>::max())
      .set<std::int64_t>("i64", std::numeric_limits<std::int64_t>::min())
      .set<double>("f64", 1.0 / 3.0);
  const auto f = GgufFile::from_buffer(w.to_bytes(), "t.gguf");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get<std::uint8_t>("u8"), 255);
  EXPECT_EQ(f.get<std::int8_t>("i8"), -128);
  EXPECT_EQ(f.get<std::uint16_t>("u16"), 65535);
  EXPECT_EQ(f.get<std::int16_t>("i16"), -32768);
  EXPECT_EQ(f.get_u32("u32"), 4294967295u);
  EXPECT_EQ(f.get_i32("i32"), std::numeric_limits<std::int32_t>::min());
  EXPECT_EQ(f.get_f32("f32"), -1.5e-30f);
  EXPECT_TRUE(f.get_bool("bool_t"));
  EXPECT_FALSE(f.get_bool("bool_f"));
  EXPECT_EQ(f.get_string("str"), std::string("caf\xc3\xa9 \0 end", 11));
  EXPECT_EQ(f.get_string("empty"), "");
  EXPECT_EQ(f.get_u64("u64"), std::numeric_limits<std::uint64_t>::max());
  EXPECT_EQ(f.get<std::int64_t>("i64"), std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(f.get<double>("f64"), 1.0 / 3.0);
  // File order is kept.
  ASSERT_EQ(f.metadata().size(), 14u);
  EXPECT_EQ(f.metadata()[0].key, "u8");
  EXPECT_EQ(f.metadata()[13].key, "f64");
  EXPECT_EQ(f.metadata()[6].value.type(), GgufValueType::FLOAT32);
}

TEST(Gguf, EveryArrayTypeRoundTripsIncludingEmptyAndNested) {
  GgufWriter w;
  w.set_array<std::uint8_t>("u8", {0, 7, 255})
      .set_array<std::int8_t>("i8", {-1, 0, 127})
      .set_array<std::uint16_t>("u16", {1, 65535})
      .set_array<std::int16_t>("i16", {-300, 300})
      .set_array<std::uint32_t>("u32", {1, 2, 3, 4294967295u})
      .set_array<std::int32_t>("i32", {-7})
      .set_array<float>("f32", {0.5f, -2.25f})
      .set_array<bool>("bool", {true, false, true})
      .set_array<std::string>("str", {"a", "", "blk.0.ffn_gate_exps.weight"})
      .set_array<std::uint64_t>("u64", {1ull << 40})
      .set_array<std::int64_t>("i64", {-(1ll << 40), 5})
      .set_array<double>("f64", {1e300, -0.0})
      .set_array<std::uint32_t>("empty", {});
  std::vector<GgufValue> inner = {GgufValue::array<std::uint32_t>({1, 2}),
                                  GgufValue::array<std::string>({"x", "yz"}),
                                  GgufValue::array_of_arrays({GgufValue::array<float>({3.5f})})};
  w.set_value("nested", GgufValue::array_of_arrays(inner));
  const auto f = GgufFile::from_buffer(w.to_bytes(), "t.gguf");
  EXPECT_EQ(f.get_array<std::uint8_t>("u8"), (std::vector<std::uint8_t>{0, 7, 255}));
  EXPECT_EQ(f.get_array<std::int8_t>("i8"), (std::vector<std::int8_t>{-1, 0, 127}));
  EXPECT_EQ(f.get_array<std::uint16_t>("u16"), (std::vector<std::uint16_t>{1, 65535}));
  EXPECT_EQ(f.get_array<std::int16_t>("i16"), (std::vector<std::int16_t>{-300, 300}));
  EXPECT_EQ(f.get_array<std::uint32_t>("u32"), (std::vector<std::uint32_t>{1, 2, 3, 4294967295u}));
  EXPECT_EQ(f.get_array<std::int32_t>("i32"), (std::vector<std::int32_t>{-7}));
  EXPECT_EQ(f.get_array<float>("f32"), (std::vector<float>{0.5f, -2.25f}));
  EXPECT_EQ(f.get_array<bool>("bool"), (std::vector<bool>{true, false, true}));
  EXPECT_EQ(f.get_array<std::string>("str"),
            (std::vector<std::string>{"a", "", "blk.0.ffn_gate_exps.weight"}));
  EXPECT_EQ(f.get_array<std::uint64_t>("u64"), (std::vector<std::uint64_t>{1ull << 40}));
  EXPECT_EQ(f.get_array<std::int64_t>("i64"), (std::vector<std::int64_t>{-(1ll << 40), 5}));
  EXPECT_EQ(f.get_array<double>("f64"), (std::vector<double>{1e300, -0.0}));
  EXPECT_TRUE(f.get_array<std::uint32_t>("empty").empty());
  const GgufValue& n = f.value("nested");
  EXPECT_EQ(n.type(), GgufValueType::ARRAY);
  EXPECT_EQ(n.array_type(), GgufValueType::ARRAY);
  ASSERT_EQ(n.nested().size(), 3u);
  EXPECT_EQ(*n.nested()[0].get_array<std::uint32_t>(), (std::vector<std::uint32_t>{1, 2}));
  EXPECT_EQ(*n.nested()[1].get_array<std::string>(), (std::vector<std::string>{"x", "yz"}));
  ASSERT_EQ(n.nested()[2].nested().size(), 1u);
  EXPECT_EQ(*n.nested()[2].nested()[0].get_array<float>(), (std::vector<float>{3.5f}));
}

TEST(Gguf, TypedAccessorsNameTheKeyAndBothTypes) {
  GgufWriter w;
  w.set<std::int32_t>("n", -3).set<std::uint64_t>("big", 9).set("s", "x");
  w.set_array<std::int32_t>("arr", {1});
  const auto f = GgufFile::from_buffer(w.to_bytes(), "t.gguf");
  EXPECT_EQ(io_error_of([&] { (void)f.get_u32("missing"); }),
            "moe: t.gguf: no metadata key 'missing'");
  EXPECT_EQ(io_error_of([&] { (void)f.get_u32("n"); }),
            "moe: t.gguf: metadata key 'n' is INT32, expected UINT32");
  EXPECT_EQ(io_error_of([&] { (void)f.get_string("big"); }),
            "moe: t.gguf: metadata key 'big' is UINT64, expected STRING");
  EXPECT_EQ(io_error_of([&] { (void)f.get_array<std::uint32_t>("arr"); }),
            "moe: t.gguf: metadata key 'arr' is ARRAY of INT32, expected ARRAY of UINT32");
  EXPECT_EQ(io_error_of([&] { (void)f.get_array<std::uint32_t>("s"); }),
            "moe: t.gguf: metadata key 's' is STRING, expected ARRAY of UINT32");
  EXPECT_EQ(io_error_of([&] { (void)f.get_unsigned("n"); }),
            "moe: t.gguf: metadata key 'n' is negative, expected a count");
  EXPECT_EQ(io_error_of([&] { (void)f.get_unsigned("s"); }),
            "moe: t.gguf: metadata key 's' is STRING, expected an unsigned integer");
  EXPECT_EQ(f.get_unsigned("big"), 9u);
  EXPECT_EQ(f.find("missing"), nullptr);
  EXPECT_TRUE(f.contains_key("s"));
}

// ---- tensors ----

struct TypeCase {
  GgmlType type;
  std::int64_t cols;  // a multiple of the block size
};

TEST(Gguf, EveryTensorTypeWithAKnownLayoutRoundTripsItsBytes) {
  const TypeCase cases[] = {
      {GgmlType::F32, 7},       {GgmlType::F16, 31},     {GgmlType::BF16, 129},
      {GgmlType::F64, 1},       {GgmlType::I8, 7},       {GgmlType::I16, 7},
      {GgmlType::I32, 7},       {GgmlType::I64, 7},      {GgmlType::Q8_0, 64},
      {GgmlType::Q4_0, 32},     {GgmlType::Q4_1, 32},    {GgmlType::Q5_0, 32},
      {GgmlType::Q5_1, 32},     {GgmlType::Q8_1, 32},    {GgmlType::MXFP4, 96},
      {GgmlType::Q2_K, 256},    {GgmlType::Q3_K, 256},   {GgmlType::Q4_K, 512},
      {GgmlType::Q5_K, 256},    {GgmlType::Q6_K, 256},   {GgmlType::Q8_K, 256},
      {GgmlType::IQ2_XXS, 256}, {GgmlType::IQ2_XS, 256}, {GgmlType::IQ3_XXS, 256},
      {GgmlType::IQ1_S, 256},   {GgmlType::IQ4_NL, 32},  {GgmlType::IQ3_S, 256},
      {GgmlType::IQ2_S, 256},   {GgmlType::IQ4_XS, 256}, {GgmlType::IQ1_M, 256},
      {GgmlType::TQ1_0, 256},   {GgmlType::TQ2_0, 256}};
  for (std::uint32_t alignment : {32u, 1u, 64u}) {
    GgufWriter w;
    if (alignment != 32) w.set_alignment(alignment);
    std::vector<std::vector<unsigned char>> payloads;
    unsigned seed = 0;
    for (const auto& c : cases) {
      const auto t = moe::io::ggml_type_traits(c.type);
      const std::int64_t rows = 3, experts = 2;
      const std::size_t n =
          static_cast<std::size_t>(c.cols / t.block_size * rows * experts) * t.type_size;
      payloads.push_back(random_bytes(n, ++seed));
      w.add_tensor(std::string("t.") + t.name, c.type, {c.cols, rows, experts},
                   payloads.back().data(), n);
    }
    const auto f = GgufFile::from_buffer(w.to_bytes(), "t.gguf");
    EXPECT_EQ(f.alignment(), alignment);
    EXPECT_EQ(f.data_section_offset() % alignment, 0u);
    ASSERT_EQ(f.tensors().size(), std::size(cases));
    for (std::size_t i = 0; i < std::size(cases); ++i) {
      const auto& info = f.tensors()[i];
      const auto name = std::string("t.") + moe::io::ggml_type_name(cases[i].type);
      SCOPED_TRACE(name);
      EXPECT_EQ(info.name, name);
      EXPECT_EQ(&f.tensor(name), &info);
      EXPECT_EQ(info.type, cases[i].type);
      EXPECT_EQ(info.dims, (std::vector<std::int64_t>{cases[i].cols, 3, 2}));
      EXPECT_EQ(info.shape(), (std::vector<std::int64_t>{2, 3, cases[i].cols}));
      EXPECT_EQ(info.rows(), 6);
      EXPECT_EQ(info.cols(), cases[i].cols);
      EXPECT_EQ(info.offset % alignment, 0u);
      ASSERT_EQ(info.nbytes, payloads[i].size());
      EXPECT_EQ(std::vector<unsigned char>(f.data(info), f.data(info) + info.nbytes), payloads[i]);
    }
  }
}

TEST(Gguf, OpenMapsAFileWrittenToDisk) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("moe_gguf_test_" + std::to_string(::getpid()) + ".gguf"))
                               .string();
  const std::vector<float> x = {1, -2, 3.5f, 0, 0.25f, -8};
  GgufWriter w;
  w.set("general.architecture", "qwen3moe").set<std::uint32_t>("qwen3moe.expert_count", 8);
  w.add_f32("blk.0.ffn_gate_inp.weight", x.data(), 2, 3);
  w.write(path);
  {
    const auto f = GgufFile::open(path);
    EXPECT_EQ(f.path(), path);
    EXPECT_EQ(f.get_string("general.architecture"), "qwen3moe");
    const auto m = moe::io::gguf_to_float(f, "blk.0.ffn_gate_inp.weight");
    ASSERT_EQ(m.rows(), 2);
    ASSERT_EQ(m.cols(), 3);
    EXPECT_EQ(std::vector<float>(m.data(), m.data() + 6), x);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(f.data("blk.0.ffn_gate_inp.weight")) % 32, 0u);
  }
  std::remove(path.c_str());
  EXPECT_EQ(io_error_of([&] { (void)GgufFile::open(path); }),
            "moe: " + path + ": cannot open: No such file or directory");
  const std::string dir = std::filesystem::temp_directory_path().string();
  EXPECT_EQ(io_error_of([&] { (void)GgufFile::open(dir); }),
            "moe: " + dir + ": not a regular file");
}

TEST(Gguf, DecodesFloatAndQuantisedTypesToFloat) {
  std::mt19937 rng(11);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(256 * 3);
  for (auto& v : x) v = g(rng);
  GgufWriter w;
  std::vector<std::uint16_t> f16(x.size()), bf16(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    f16[i] = moe::io::float_to_f16(x[i]);
    bf16[i] = moe::io::float_to_bf16(x[i]);
  }
  w.add_tensor("f16", GgmlType::F16, {256, 3}, f16.data(), f16.size() * 2);
  w.add_tensor("bf16", GgmlType::BF16, {256, 3}, bf16.data(), bf16.size() * 2);
  std::vector<unsigned char> q6(3 * 210);
  moe::kernels::quantize_q6_k(x.data(), 768, q6.data());
  w.add_tensor("q6k", GgmlType::Q6_K, {256, 3}, q6.data(), q6.size());
  std::vector<unsigned char> iq(3 * 66, 0);
  w.add_tensor("iq", GgmlType::IQ2_XXS, {256, 3}, iq.data(), iq.size());
  const auto f = GgufFile::from_buffer(w.to_bytes(), "t.gguf");
  const auto a = moe::io::gguf_to_float(f, "f16");
  const auto b = moe::io::gguf_to_float(f, "bf16");
  const auto c = moe::io::gguf_to_float(f, "q6k");
  std::vector<float> q6_ref(768);
  moe::kernels::dequantize_q6_k(q6.data(), 768, q6_ref.data());
  for (std::size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(a.data()[i], moe::io::f16_to_float(f16[i]));
    EXPECT_EQ(b.data()[i], moe::io::bf16_to_float(bf16[i]));
    EXPECT_EQ(c.data()[i], q6_ref[i]);
  }
  EXPECT_EQ(io_error_of([&] { (void)moe::io::gguf_to_float(f, "iq"); }),
            "moe: t.gguf: tensor 'iq' has ggml type IQ2_XXS (16), which moe does not decode (it "
            "decodes F32, F16, BF16, F64, Q8_0, Q4_0, MXFP4, Q4_K, Q5_K, Q6_K)");
  EXPECT_EQ(io_error_of([&] { (void)f.tensor("nope"); }), "moe: t.gguf: no tensor named 'nope'");
}

TEST(Gguf, WriterRefusesInconsistentTensors) {
  GgufWriter w;
  std::vector<unsigned char> b(144);
  EXPECT_EQ(io_error_of([&] { w.add_tensor("a", GgmlType::Q4_K, {100}, b.data(), 144); }),
            "moe: GGUF writer: tensor 'a' has rows of 100 elements, not a multiple of the Q4_K "
            "block size 256");
  EXPECT_EQ(io_error_of([&] {
              w.add_tensor("a", GgmlType::Q4_K, {256, 2}, b.data(), 144);
            }),
            "moe: GGUF writer: tensor 'a' has 144 bytes, expected 288 for Q4_K dims [256, 2]");
  w.add_tensor("a", GgmlType::Q4_K, {256}, b.data(), 144);
  EXPECT_EQ(io_error_of([&] { w.add_tensor("a", GgmlType::Q4_K, {256}, b.data(), 144); }),
            "moe: GGUF writer: tensor 'a' was added twice");
  EXPECT_THROW(w.set_alignment(48), moe::config_error);
}

// ---- malformed files: one rule each ----

TEST(GgufMalformed, TruncatedHeader) {
  EXPECT_EQ(parse_error({'G', 'G', 'U', 'F', 3, 0, 0}),
            "moe: t.gguf: file has 7 bytes, too few for the 24-byte GGUF header");
}

TEST(GgufMalformed, BadMagicAndVersion) {
  ByteBuilder b;
  b.header(0, 0);
  b.bytes[0] = 'g';
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: not a GGUF file: the first 4 bytes are 0x67475546, expected \"GGUF\"");
  EXPECT_EQ(parse_error(ByteBuilder().header(0, 0, 1).bytes),
            "moe: t.gguf: GGUF version 1 is not supported (2 and 3 are)");
  EXPECT_EQ(parse_error(ByteBuilder().header(0, 0, 0x03000000).bytes),
            "moe: t.gguf: GGUF version 50331648 is not supported (2 and 3 are; a big-endian "
            "file?)");
  EXPECT_NO_THROW((void)GgufFile::from_buffer(ByteBuilder().header(0, 0, 2).bytes, "v2"));
}

TEST(GgufMalformed, HugeCounts) {
  EXPECT_EQ(parse_error(ByteBuilder().header(0, std::uint64_t{1} << 62).bytes),
            "moe: t.gguf: metadata count 4611686018427387904 cannot fit in the 0 bytes that "
            "follow the header");
  ByteBuilder b;
  b.header(1000, 0).data(100, 1);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: tensor count 1000 cannot fit in the 100 bytes that follow the header");
}

TEST(GgufMalformed, StringLengthsPastTheEnd) {
  ByteBuilder key;
  key.header(0, 1).u64(1000).u32(0).u32(0);
  EXPECT_EQ(parse_error(key.bytes),
            "moe: t.gguf: metadata key #0: key length 1000 runs past the end of the file (8 "
            "bytes remain at offset 32)");
  ByteBuilder value;
  value.header(0, 1).str("general.name").u32(8).u64(std::uint64_t{1} << 63);
  EXPECT_EQ(parse_error(value.bytes),
            "moe: t.gguf: metadata key 'general.name': string length 9223372036854775808 runs "
            "past the end of the file (0 bytes remain at offset 56)");
  ByteBuilder name;
  name.header(1, 0).u64(50).u32(1).u32(0).u64(0).u64(0);
  EXPECT_EQ(parse_error(name.bytes),
            "moe: t.gguf: tensor info #0: name length 50 runs past the end of the file (24 bytes "
            "remain at offset 32)");
}

TEST(GgufMalformed, TruncatedValue) {
  ByteBuilder b;
  b.header(0, 1).str("k").u32(10).u32(7);  // UINT64 with 4 of its 8 bytes
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'k': UINT64 needs 8 bytes at offset 37, only 4 remain");
}

TEST(GgufMalformed, UnknownValueAndElementTypes) {
  ByteBuilder b;
  b.header(0, 1).str("k").u32(13).u64(0);
  EXPECT_EQ(parse_error(b.bytes), "moe: t.gguf: metadata key 'k': unknown value type 13");
  ByteBuilder a;
  a.header(0, 1).str("k").u32(9).u32(99).u64(0);
  EXPECT_EQ(parse_error(a.bytes),
            "moe: t.gguf: metadata key 'k': array has unknown element type 99");
}

TEST(GgufMalformed, ArrayCountsPastTheEnd) {
  ByteBuilder b;
  b.header(0, 1).str("tokens").u32(9).u32(8).u64(std::uint64_t{1} << 61).u64(0);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'tokens': array of 2305843009213693952 STRING values "
            "cannot fit in the 8 bytes that remain");
  ByteBuilder f;
  f.header(0, 1).str("scores").u32(9).u32(6).u64(3).u32(0).u32(0);
  EXPECT_EQ(parse_error(f.bytes),
            "moe: t.gguf: metadata key 'scores': array of 3 FLOAT32 values cannot fit in the 8 "
            "bytes that remain");
}

TEST(GgufMalformed, BadBooleans) {
  ByteBuilder b;
  b.header(0, 1).str("flag").u32(7).put<std::uint8_t>(2);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'flag': BOOL value 2 is neither 0 nor 1");
  ByteBuilder a;
  a.header(0, 1)
      .str("flags")
      .u32(9)
      .u32(7)
      .u64(3)
      .put<std::uint8_t>(1)
      .put<std::uint8_t>(0)
      .put<std::uint8_t>(255);
  EXPECT_EQ(parse_error(a.bytes),
            "moe: t.gguf: metadata key 'flags': BOOL array element 2 = 255 is neither 0 nor 1");
}

TEST(GgufMalformed, ArraysNestedTooDeep) {
  ByteBuilder b;
  b.header(0, 1).str("deep").u32(9);
  for (int i = 0; i < 9; ++i) b.u32(9).u64(1);
  b.u32(4).u64(0);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'deep': arrays nest deeper than 8 levels");
}

TEST(GgufMalformed, TooManyNestedArrays) {
  // 2^20 + 1 empty arrays in one array: 12 MiB of file that would become ~140 MiB of values.
  ByteBuilder b;
  const std::uint64_t n = (std::uint64_t{1} << 20) + 1;
  b.header(0, 1).str("many").u32(9).u32(9).u64(n);
  for (std::uint64_t i = 0; i < n; ++i) b.u32(4).u64(0);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'many': the file nests more than 1048576 arrays in arrays");
}

TEST(GgufMalformed, DuplicateKeysAndTensors) {
  ByteBuilder b;
  b.header(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2);
  EXPECT_EQ(parse_error(b.bytes), "moe: t.gguf: metadata key 'k' appears twice");
  ByteBuilder t;
  t.header(2, 0).info("w", {8}, 0, 0).info("w", {8}, 0, 32).data(64);
  EXPECT_EQ(parse_error(t.bytes), "moe: t.gguf: tensor 'w' appears twice");
}

TEST(GgufMalformed, BadAlignment) {
  ByteBuilder b;
  b.header(0, 1).str("general.alignment").u32(5).u32(32);
  EXPECT_EQ(parse_error(b.bytes),
            "moe: t.gguf: metadata key 'general.alignment' is INT32, expected UINT32");
  ByteBuilder z;
  z.header(0, 1).str("general.alignment").u32(4).u32(24);
  EXPECT_EQ(parse_error(z.bytes), "moe: t.gguf: general.alignment = 24 is not a power of two");
}

TEST(GgufMalformed, DimensionsAndTypes) {
  auto one = [](std::vector<std::uint64_t> dims, std::uint32_t type, std::uint64_t offset = 0) {
    ByteBuilder b;
    b.header(1, 0).info("w", std::move(dims), type, offset).data(64);
    return parse_error(b.bytes);
  };
  EXPECT_EQ(one({1, 1, 1, 1, 1}, 0),
            "moe: t.gguf: tensor 'w': has 5 dimensions, at most 4 are allowed");
  EXPECT_EQ(one({std::uint64_t{1} << 63}, 0),
            "moe: t.gguf: tensor 'w': dimension 0 = 9223372036854775808 exceeds 2^63 - 1");
  EXPECT_EQ(one({std::uint64_t{1} << 32, std::uint64_t{1} << 32}, 0),
            "moe: t.gguf: tensor 'w': dimensions [4294967296, 4294967296] overflow: the product "
            "of the non-zero ones exceeds 2^63 - 1");
  // A zero dim makes the tensor empty but does not excuse the others (rows() multiplies them).
  EXPECT_EQ(one({0, std::uint64_t{1} << 32, std::uint64_t{1} << 32}, 0),
            "moe: t.gguf: tensor 'w': dimensions [0, 4294967296, 4294967296] overflow: the "
            "product of the non-zero ones exceeds 2^63 - 1");
  EXPECT_EQ(one({std::uint64_t{1} << 40, 1 << 20}, 0),
            "moe: t.gguf: tensor 'w': dimensions [1099511627776, 1048576] of F32 need more bytes "
            "than the file's 160");
  EXPECT_EQ(one({32}, 99), "moe: t.gguf: tensor 'w': unknown ggml type 99");
  EXPECT_EQ(one({32}, 4), "moe: t.gguf: tensor 'w': unknown ggml type 4");
  EXPECT_EQ(one({64}, 40),
            "moe: t.gguf: tensor 'w': ggml type NVFP4 (40) has a block layout this reader does "
            "not know");
  EXPECT_EQ(one({100, 2}, 12),
            "moe: t.gguf: tensor 'w': rows of 100 elements (dimension 0) are not a multiple of the "
            "Q4_K block size 256");
  // Zero-sized tensors are valid (ggml allows empty dims), even with huge other dims.
  ByteBuilder z;
  z.header(1, 0).info("w", {0, std::uint64_t{1} << 62}, 0, 0).data(0);
  const auto f = GgufFile::from_buffer(z.bytes, "z");
  EXPECT_EQ(f.tensor("w").numel(), 0);
  EXPECT_EQ(f.tensor("w").nbytes, 0u);
}

TEST(GgufMalformed, MisalignedOverlappingAndOutOfRangeData) {
  ByteBuilder mis;
  mis.header(1, 0).info("w", {8}, 0, 16).data(64);
  EXPECT_EQ(parse_error(mis.bytes),
            "moe: t.gguf: tensor 'w': offset 16 is not a multiple of the alignment 32");
  ByteBuilder over;
  over.header(2, 0).info("a", {16}, 0, 0).info("b", {16}, 0, 32).data(128);
  EXPECT_EQ(parse_error(over.bytes), "moe: t.gguf: tensors 'a' [0, 64) and 'b' [32, 96) overlap");
  ByteBuilder past;
  past.header(1, 0).info("w", {16}, 0, 32).data(80);
  EXPECT_EQ(parse_error(past.bytes),
            "moe: t.gguf: tensor 'w': data [32, 96) runs past the end of the data section (80 "
            "bytes)");
  ByteBuilder far;
  far.header(1, 0).info("w", {16}, 0, std::uint64_t{1} << 62).data(64);
  EXPECT_EQ(parse_error(far.bytes),
            "moe: t.gguf: tensor 'w': offset 4611686018427387904 lies past the end of the file "
            "(128 bytes)");
  ByteBuilder cut;  // tensor infos end mid-file, data section missing entirely
  cut.header(1, 0).info("w", {4}, 0, 0);
  EXPECT_EQ(parse_error(cut.bytes),
            "moe: t.gguf: data section starts at offset 64, past the end of the file (57 bytes)");
}

TEST(GgufMalformed, EveryStrictPrefixOfAValidFileIsRejected) {
  GgufWriter w;
  w.set("general.architecture", "olmoe").set_array<std::string>("tok", {"a", "bc"});
  w.set_value("nest", GgufValue::array_of_arrays({GgufValue::array<std::int16_t>({1, 2})}));
  const std::vector<float> x(64, 1.0f);
  w.add_f32("a", x.data(), 2, 32);
  w.add_tensor("b", GgmlType::Q8_0, {32}, std::vector<unsigned char>(34).data(), 34);
  const auto bytes = w.to_bytes();
  ASSERT_NO_THROW((void)GgufFile::from_buffer(bytes, "full"));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    const std::string e = parse_error(std::vector<unsigned char>(bytes.begin(), bytes.begin() + n));
    EXPECT_EQ(e.rfind("moe: t.gguf: ", 0), 0u) << n << ": " << e;
  }
}

}  // namespace
