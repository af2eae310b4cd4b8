// Tests of moe/io/safetensors.hpp and moe/io/checkpoint.hpp: round trips, sharded directories,
// metadata, and one malformed file per validation rule, each pinned by its message.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/checkpoint.hpp"
#include "moe/io/safetensors.hpp"

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using moe::RowMatrix;
using moe::io::Checkpoint;
using moe::io::Dtype;
using moe::io::SafetensorsFile;
using moe::io::TensorToWrite;

/// A fresh directory under the system temp dir, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("moe_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

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

/// A file from raw header text and data bytes; the length prefix is the header's own size
/// unless `declared` overrides it.
std::vector<unsigned char> raw_file(const std::string& header, std::size_t data_bytes,
                                    std::uint64_t declared = ~std::uint64_t{0}) {
  const std::uint64_t n = declared == ~std::uint64_t{0} ? header.size() : declared;
  // Sized once and filled by index: GCC 12 at -O3 reports false -Warray-bounds /
  // -Wfree-nonheap-object on the insert()/push_back() forms of this function.
  std::vector<unsigned char> bytes(8 + header.size() + data_bytes);
  for (std::size_t i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(n >> (8 * i));
  for (std::size_t i = 0; i < header.size(); ++i) bytes[8 + i] = static_cast<unsigned char>(header[i]);
  for (std::size_t i = 0; i < data_bytes; ++i) {
    bytes[8 + header.size() + i] = static_cast<unsigned char>(i);
  }
  return bytes;
}

/// The io_error message of parsing header `header` followed by `data_bytes` bytes of data.
std::string bad(const std::string& header, std::size_t data_bytes) {
  return io_error_of(
      [&] { SafetensorsFile::from_buffer(raw_file(header, data_bytes), "bad.safetensors"); });
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

RowMatrix<double> matrix(int rows, int cols, std::initializer_list<double> values) {
  RowMatrix<double> m(rows, cols);
  std::copy(values.begin(), values.end(), m.data());
  return m;
}

// ---- round trips ----

TEST(IoSafetensors, RoundTripEveryDtype) {
  TempDir dir;
  // Values every dtype holds exactly (BOOL: 0/1; U8: non-negative).
  const RowMatrix<double> signed_values = matrix(2, 3, {0, 1, -2, 3.5, -0.25, 96});
  const RowMatrix<double> integers = matrix(2, 3, {0, 1, -2, 3, -100, 127});
  const RowMatrix<double> unsigned_values = matrix(2, 3, {0, 1, 2, 3, 100, 255});
  const RowMatrix<double> bools = matrix(2, 3, {0, 1, 1, 0, 1, 0});
  const std::map<Dtype, RowMatrix<double>> cases = {{Dtype::F64, signed_values},
                                                    {Dtype::F32, signed_values},
                                                    {Dtype::F16, signed_values},
                                                    {Dtype::BF16, signed_values},
                                                    {Dtype::F8_E4M3, signed_values},
                                                    {Dtype::I64, integers},
                                                    {Dtype::I32, integers},
                                                    {Dtype::I16, integers},
                                                    {Dtype::I8, integers},
                                                    {Dtype::U8, unsigned_values},
                                                    {Dtype::BOOL, bools}};
  std::vector<TensorToWrite> tensors;
  for (const auto& [dtype, m] : cases) {
    tensors.push_back(moe::io::make_tensor(moe::io::dtype_name(dtype), m, dtype));
  }
  const std::string path = dir.file("all.safetensors");
  moe::io::write_safetensors(path, tensors);

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.size(), cases.size());
  std::size_t index = 0;
  for (const auto& [dtype, m] : cases) {
    const TensorToWrite& written = tensors[index++];
    const std::string name = moe::io::dtype_name(dtype);
    SCOPED_TRACE(name);
    const auto& info = f.info(name);
    EXPECT_EQ(info.name, name);
    EXPECT_EQ(info.dtype, dtype);
    EXPECT_EQ(info.shape, (std::vector<std::int64_t>{2, 3}));
    EXPECT_EQ(info.numel(), 6);
    EXPECT_EQ(info.nbytes, 6 * moe::io::dtype_size(dtype));
    EXPECT_EQ(f.read_matrix<double>(name), m);
    EXPECT_EQ(f.read_matrix<float>(name), m.cast<float>());
    const std::vector<double> v = f.read_vector<double>(name);
    EXPECT_EQ(v, std::vector<double>(m.data(), m.data() + 6));
    ASSERT_EQ(written.name, name);
    EXPECT_EQ(std::memcmp(f.data(name), written.bytes.data(), info.nbytes), 0);
  }
  // Integers read into integer types.
  EXPECT_EQ(f.read_vector<std::int64_t>("I16"),
            (std::vector<std::int64_t>{0, 1, -2, 3, -100, 127}));
  EXPECT_EQ(f.read_vector<std::int8_t>("I64"), (std::vector<std::int8_t>{0, 1, -2, 3, -100, 127}));
  EXPECT_EQ(f.read_vector<std::uint8_t>("U8"), (std::vector<std::uint8_t>{0, 1, 2, 3, 100, 255}));
  EXPECT_EQ(f.read_vector<int>("BOOL"), (std::vector<int>{0, 1, 1, 0, 1, 0}));
  // Zero-copy views for the native dtypes.
  EXPECT_EQ(RowMatrix<double>(f.map_matrix<double>("F64")), signed_values);
  EXPECT_EQ(RowMatrix<float>(f.map_matrix<float>("F32")), signed_values.cast<float>());
  EXPECT_EQ(RowMatrix<std::int64_t>(f.map_matrix<std::int64_t>("I64")),
            integers.cast<std::int64_t>());
  EXPECT_EQ(f.map_matrix<double>("F64").data(), reinterpret_cast<const double*>(f.data("F64")));
}

TEST(IoSafetensors, CompactDtypesRoundToNearestEvenOnWrite) {
  TempDir dir;
  RowMatrix<float> m(1, 4);
  m << 0.1f, 1000.0f, 1.0f + 1.0f / 256, -65520.0f;
  const std::string path = dir.file("c.safetensors");
  moe::io::write_safetensors(
      path, {moe::io::make_tensor("h", m, Dtype::F16), moe::io::make_tensor("b", m, Dtype::BF16),
             moe::io::make_tensor("e", m, Dtype::F8_E4M3)});
  const auto f = SafetensorsFile::open(path);
  const RowMatrix<float> h = f.read_matrix<float>("h");
  const RowMatrix<float> b = f.read_matrix<float>("b");
  const RowMatrix<float> e = f.read_matrix<float>("e");
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(h(0, j), moe::io::f16_to_float(moe::io::float_to_f16(m(0, j))));
    EXPECT_EQ(b(0, j), moe::io::bf16_to_float(moe::io::float_to_bf16(m(0, j))));
  }
  EXPECT_EQ(h(0, 3), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(b(0, 2), 1.0f);  // tie to even
  EXPECT_EQ(e(0, 0), 0.1015625f);
  EXPECT_TRUE(std::isnan(e(0, 1)));  // 1000 > 448: NaN, as torch.float8_e4m3fn
}

TEST(IoSafetensors, WriterAlignsEveryTensorWithoutGaps) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  moe::io::write_safetensors(
      path,
      {moe::io::make_tensor("u", RowMatrix<double>(RowMatrix<double>::Ones(1, 3)), Dtype::U8),
       moe::io::make_tensor("d", RowMatrix<double>(RowMatrix<double>::Ones(1, 1)), Dtype::F64),
       moe::io::make_tensor("f", RowMatrix<double>(RowMatrix<double>::Ones(3, 1)), Dtype::F32),
       moe::io::make_tensor("h", RowMatrix<double>(RowMatrix<double>::Ones(1, 1)), Dtype::F16)});
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.data_section_offset() % 8, 0u);
  // Python's order: decreasing element size, then name.
  EXPECT_EQ(f.info("d").offset, 0u);
  EXPECT_EQ(f.info("f").offset, 8u);
  EXPECT_EQ(f.info("h").offset, 20u);
  EXPECT_EQ(f.info("u").offset, 22u);
  EXPECT_EQ(fs::file_size(path), f.data_section_offset() + 25);
}

TEST(IoSafetensors, MetadataNamesAndContains) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "a \"quoted\" é"}};
  moe::io::write_safetensors(
      path,
      {moe::io::make_tensor("zeta", RowMatrix<float>(RowMatrix<float>::Zero(1, 1))),
       moe::io::make_tensor("alpha", RowMatrix<float>(RowMatrix<float>::Zero(1, 1)))},
      meta);
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"alpha", "zeta"}));
  EXPECT_TRUE(f.contains("alpha"));
  EXPECT_FALSE(f.contains("__metadata__"));
  EXPECT_FALSE(f.contains("beta"));

  const auto g = SafetensorsFile::from_buffer(raw_file("{}", 0), "empty");
  EXPECT_TRUE(g.metadata().empty());
  EXPECT_TRUE(g.names().empty());
}

TEST(IoSafetensors, ShapesOfEveryRank) {
  const std::string header =
      R"({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},)"
      R"( "v": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]},)"
      R"( "t": {"dtype": "U8", "shape": [2, 3, 4], "data_offsets": [16, 40]},)"
      R"( "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [40, 40]},)"
      R"( "z": {"dtype": "F64", "shape": [4611686018427387904, 0], "data_offsets": [40, 40]}})";
  const auto f = SafetensorsFile::from_buffer(raw_file(header, 40), "ranks");
  EXPECT_EQ(f.read_matrix<double>("s").rows(), 1);
  EXPECT_EQ(f.read_matrix<double>("s").cols(), 1);
  const RowMatrix<double> v = f.read_matrix<double>("v");
  EXPECT_EQ(v.rows(), 1);
  EXPECT_EQ(v.cols(), 3);
  const RowMatrix<int> t = f.read_matrix<int>("t");
  EXPECT_EQ(t.rows(), 6);
  EXPECT_EQ(t.cols(), 4);
  EXPECT_EQ(t(5, 3), 16 + 23);  // raw_file fills byte i of the data with i
  EXPECT_EQ(f.read_vector<float>("t").size(), 24u);
  EXPECT_EQ(f.read_matrix<float>("e").rows(), 0);
  EXPECT_EQ(f.read_matrix<float>("e").cols(), 5);
  EXPECT_EQ(f.info("z").numel(), 0);
  EXPECT_EQ(f.read_vector<double>("z").size(), 0u);
}

TEST(IoSafetensors, UnalignedTensorsReadButDoNotMap) {
  // Pad the header so that the data section starts 1 byte past a multiple of 4.
  std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while ((8 + header.size()) % 4 != 1) header += ' ';
  std::vector<unsigned char> bytes = raw_file(header, 0);
  const float values[2] = {1.5f, -2.0f};
  bytes.insert(bytes.end(), reinterpret_cast<const unsigned char*>(values),
               reinterpret_cast<const unsigned char*>(values) + 8);
  const auto f = SafetensorsFile::from_buffer(bytes, "odd.safetensors");
  ASSERT_EQ(f.data_section_offset() % 4, 1u);
  EXPECT_EQ(f.read_vector<float>("w"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(io_error_of([&] { f.map_matrix<float>("w"); }),
            "moe: odd.safetensors: tensor 'w' is not aligned to 4 bytes in the file, cannot map "
            "it (use read_matrix)");
}

TEST(IoSafetensors, ConversionErrors) {
  const std::string header = R"({"f": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                             R"( "i": {"dtype": "I16", "shape": [2], "data_offsets": [4, 8]}})";
  std::vector<unsigned char> bytes = raw_file(header, 0);
  const float one = 1.0f;
  const std::int16_t ints[2] = {5, 300};
  bytes.insert(bytes.end(), reinterpret_cast<const unsigned char*>(&one),
               reinterpret_cast<const unsigned char*>(&one) + 4);
  bytes.insert(bytes.end(), reinterpret_cast<const unsigned char*>(ints),
               reinterpret_cast<const unsigned char*>(ints) + 4);
  const auto f = SafetensorsFile::from_buffer(bytes, "c.safetensors");
  EXPECT_EQ(io_error_of([&] { f.read_vector<int>("f"); }),
            "moe: c.safetensors: tensor 'f' is F32, cannot convert it to an integer type");
  EXPECT_EQ(io_error_of([&] { f.read_vector<std::int8_t>("i"); }),
            "moe: c.safetensors: tensor 'i' element 1 = 300 does not fit the requested integer "
            "type");
  EXPECT_EQ(f.read_vector<std::int16_t>("i"), (std::vector<std::int16_t>{5, 300}));
  EXPECT_EQ(io_error_of([&] { f.map_matrix<double>("f"); }),
            "moe: c.safetensors: tensor 'f' is F32, cannot map it as F64 (use read_matrix to "
            "convert)");
  EXPECT_EQ(io_error_of([&] { f.info("x"); }), "moe: c.safetensors: no tensor named 'x'");
  EXPECT_EQ(io_error_of([&] { f.data("x"); }), "moe: c.safetensors: no tensor named 'x'");
  EXPECT_EQ(io_error_of([&] { f.read_matrix<float>("x"); }),
            "moe: c.safetensors: no tensor named 'x'");
}

TEST(IoSafetensors, MoveKeepsTheMapping) {
  TempDir dir;
  const std::string path = dir.file("mv.safetensors");
  moe::io::write_safetensors(
      path, {moe::io::make_tensor("w", RowMatrix<double>(RowMatrix<double>::Ones(2, 2)))});
  SafetensorsFile a = SafetensorsFile::open(path);
  const unsigned char* p = a.data("w");
  SafetensorsFile b = std::move(a);
  EXPECT_EQ(b.data("w"), p);
  SafetensorsFile c = SafetensorsFile::from_buffer(raw_file("{}", 0), "x");
  c = std::move(b);
  EXPECT_EQ(c.read_matrix<double>("w"), RowMatrix<double>::Ones(2, 2));
}

// ---- malformed files, one rule each ----

TEST(IoSafetensorsMalformed, FileShorterThanTheLengthPrefix) {
  EXPECT_EQ(io_error_of([] {
              SafetensorsFile::from_buffer({1, 2, 3, 4, 5}, "bad.safetensors");
            }),
            "moe: bad.safetensors: file has 5 bytes, too few for the 8-byte header length");
}

TEST(IoSafetensorsMalformed, HeaderLengthBeyondTheFile) {
  EXPECT_EQ(
      io_error_of([] { SafetensorsFile::from_buffer(raw_file("{}", 0, 1000), "bad.safetensors"); }),
      "moe: bad.safetensors: header length 1000 exceeds the 2 bytes that follow it");
  EXPECT_EQ(io_error_of([] {
              SafetensorsFile::from_buffer(raw_file("{}", 0, ~std::uint64_t{0} - 1),
                                           "bad.safetensors");
            }),
            "moe: bad.safetensors: header length 18446744073709551614 exceeds the limit of "
            "100000000 bytes");
}

TEST(IoSafetensorsMalformed, TruncatedData) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 20),
            "moe: bad.safetensors: tensor 'w' data_offsets [0, 24] end beyond the data section "
            "of 20 bytes");
}

TEST(IoSafetensorsMalformed, OutOfRangeOffsets) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[100,104]}})", 8),
            "moe: bad.safetensors: tensor 'w' data_offsets [100, 104] end beyond the data "
            "section of 8 bytes");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 8),
            "moe: bad.safetensors: tensor 'w' data_offsets [8, 4] end before they begin");
  EXPECT_EQ(
      bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}})", 8),
      "moe: bad.safetensors: tensor 'w' data_offsets [0, 18446744073709551615] end beyond the "
      "data section of 8 bytes");
}

TEST(IoSafetensorsMalformed, OverlappingTensors) {
  EXPECT_EQ(bad(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
                R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                12),
            "moe: bad.safetensors: tensors 'a' data_offsets [0, 8] and 'b' data_offsets [4, 12] "
            "overlap");
  // Identical ranges overlap too; empty tensors occupy nothing.
  EXPECT_EQ(bad(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},)"
                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                4),
            "moe: bad.safetensors: tensors 'a' data_offsets [0, 4] and 'b' data_offsets [0, 4] "
            "overlap");
  EXPECT_EQ(bad(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},)"
                R"("b":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}})",
                4),
            "<no exception>");
}

TEST(IoSafetensorsMalformed, ShapeAndByteCountDisagree) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})", 12),
            "moe: bad.safetensors: tensor 'w' data_offsets [0, 12] hold 12 bytes, but shape "
            "[2 x 3] of F32 needs 24");
  EXPECT_EQ(bad(R"({"w":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}})", 4),
            "moe: bad.safetensors: tensor 'w' data_offsets [0, 4] hold 4 bytes, but shape [] of "
            "BF16 needs 2");
}

TEST(IoSafetensorsMalformed, UnknownDtype) {
  const char* known = " (known: F64, F32, F16, BF16, F8_E4M3, I64, I32, I16, I8, U8, BOOL)";
  EXPECT_EQ(bad(R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", 1),
            std::string("moe: bad.safetensors: tensor 'w' has unknown dtype \"F7\"") + known);
  EXPECT_EQ(bad(R"({"w":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[0,1]}})", 1),
            std::string("moe: bad.safetensors: tensor 'w' has unknown dtype \"F8_E5M2\"") + known);
  EXPECT_EQ(bad(R"({"w":{"dtype":32,"shape":[1],"data_offsets":[0,1]}})", 1),
            "moe: bad.safetensors: tensor 'w' dtype is a JSON number, expected a string");
}

TEST(IoSafetensorsMalformed, HeaderIsNotJson) {
  EXPECT_EQ(bad(R"({"w": nope})", 0).rfind("moe: bad.safetensors: header is not valid JSON: ", 0),
            0u);
  EXPECT_EQ(bad("", 0).rfind("moe: bad.safetensors: header is not valid JSON: ", 0), 0u);
  EXPECT_EQ(bad("{} trailing", 0).rfind("moe: bad.safetensors: header is not valid JSON: ", 0), 0u);
  EXPECT_EQ(bad("\xff\xfe", 0).rfind("moe: bad.safetensors: header is not valid JSON: ", 0), 0u);
  EXPECT_EQ(bad("[1, 2]", 0), "moe: bad.safetensors: header is a JSON array, expected an object");
  EXPECT_EQ(bad(R"({"w": [[[[[[[[[[1]]]]]]]]]]})", 0),
            "moe: bad.safetensors: header nests deeper than 8 levels");
  // Trailing spaces (the writer's padding) are fine.
  EXPECT_EQ(bad("{}      ", 0), "<no exception>");
}

TEST(IoSafetensorsMalformed, DuplicateNames) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                2),
            "moe: bad.safetensors: header: tensor 'w' appears twice");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", 1),
            "moe: bad.safetensors: header: key 'dtype' appears twice in 'w'");
  EXPECT_EQ(bad(R"({"__metadata__":{"k":"a","k":"b"}})", 0),
            "moe: bad.safetensors: header: key 'k' appears twice in '__metadata__'");
}

TEST(IoSafetensorsMalformed, BadShapeEntries) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})", 0),
            "moe: bad.safetensors: tensor 'w' shape[1] is -1, expected a non-negative integer");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", 2),
            "moe: bad.safetensors: tensor 'w' shape[0] is 2.0, expected a non-negative integer");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", 2),
            "moe: bad.safetensors: tensor 'w' shape[0] is \"2\", expected a non-negative integer");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[[2]],"data_offsets":[0,2]}})", 2),
            "moe: bad.safetensors: tensor 'w' shape[0] is a JSON array, expected a non-negative "
            "integer");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,2]}})", 2),
            "moe: bad.safetensors: tensor 'w' shape[0] is 9223372036854775808, expected a "
            "non-negative integer");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":2,"data_offsets":[0,2]}})", 2),
            "moe: bad.safetensors: tensor 'w' shape is a JSON number, expected an array of "
            "non-negative integers");
}

TEST(IoSafetensorsMalformed, ShapeProductOverflows) {
  EXPECT_EQ(bad(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
            "moe: bad.safetensors: tensor 'w' shape [4294967296 x 4294967296] has more elements "
            "than a 64-bit count can hold");
  // A zero does not excuse the others: read_matrix multiplies the leading dims.
  EXPECT_EQ(
      bad(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0),
      "moe: bad.safetensors: tensor 'w' shape [4294967296 x 4294967296 x 0] has more "
      "elements than a 64-bit count can hold");
  // numel fits in 64 bits but numel * 8 does not.
  EXPECT_EQ(bad(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8),
            "moe: bad.safetensors: tensor 'w' data_offsets [0, 8] hold 8 bytes, but shape "
            "[4611686018427387904] of F64 needs more than 2^64");
}

TEST(IoSafetensorsMalformed, BadEntries) {
  EXPECT_EQ(bad(R"({"w": 3})", 0),
            "moe: bad.safetensors: tensor 'w' entry is a JSON number, expected an object with "
            "dtype, shape and data_offsets");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","data_offsets":[0,0]}})", 0),
            "moe: bad.safetensors: tensor 'w' has no 'shape'");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1),
            "moe: bad.safetensors: tensor 'w' data_offsets is an array of 1 JSON values, "
            "expected [begin, end] as two non-negative integers");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1, 0]}})", 1),
            "moe: bad.safetensors: tensor 'w' data_offsets is an array of 2 JSON values, "
            "expected [begin, end] as two non-negative integers");
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":"0-1"}})", 1),
            "moe: bad.safetensors: tensor 'w' data_offsets is a JSON string, expected [begin, "
            "end] as two non-negative integers");
  // Unknown extra keys are ignored, as by the reference implementation.
  EXPECT_EQ(bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", 1),
            "<no exception>");
}

TEST(IoSafetensorsMalformed, BadMetadata) {
  EXPECT_EQ(bad(R"({"__metadata__":{"k":1}})", 0),
            "moe: bad.safetensors: __metadata__ value of 'k' is a JSON number, expected a string");
  EXPECT_EQ(bad(R"({"__metadata__":["k"]})", 0),
            "moe: bad.safetensors: __metadata__ is a JSON array, expected an object of strings");
}

TEST(IoSafetensorsMalformed, MissingFile) {
  TempDir dir;
  const std::string path = dir.file("absent.safetensors");
  EXPECT_EQ(io_error_of([&] { SafetensorsFile::open(path); }),
            "moe: " + path + ": cannot open: No such file or directory");
  EXPECT_EQ(io_error_of([&] { SafetensorsFile::open(dir.str()); }),
            "moe: " + dir.str() + ": not a regular file");
  write_bytes(path, {});
  EXPECT_EQ(io_error_of([&] { SafetensorsFile::open(path); }),
            "moe: " + path + ": file has 0 bytes, too few for the 8-byte header length");
}

// ---- writer errors ----

TEST(IoSafetensorsWrite, RejectsInconsistentTensors) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  const std::string where = "moe: " + path + ": ";
  TensorToWrite t{"w", Dtype::F32, {2, 3}, std::vector<unsigned char>(20)};
  EXPECT_EQ(io_error_of([&] { moe::io::write_safetensors(path, {t}); }),
            where + "tensor 'w' has 20 bytes, but shape [2 x 3] of F32 needs 24");
  t.shape = {4294967296, 4294967296};
  EXPECT_EQ(io_error_of([&] { moe::io::write_safetensors(path, {t}); }),
            where +
                "tensor 'w' has 20 bytes, but shape [4294967296 x 4294967296] of F32 needs "
                "more than 2^64");
  t.shape = {-5};
  EXPECT_EQ(io_error_of([&] { moe::io::write_safetensors(path, {t}); }),
            where + "tensor 'w' has a negative dim in shape [-5]");
  t = {"w", Dtype::U8, {1}, {7}};
  TensorToWrite u = t;
  u.dtype = Dtype::I8;
  EXPECT_EQ(io_error_of([&] {
              moe::io::write_safetensors(path, {t, u});
            }),
            where + "tensor 'w' given twice");
  t.name = "__metadata__";
  EXPECT_EQ(io_error_of([&] { moe::io::write_safetensors(path, {t}); }),
            where + "'__metadata__' is not a tensor name");
  EXPECT_FALSE(fs::exists(path));
  EXPECT_EQ(io_error_of([&] {
              moe::io::write_safetensors(dir.file("no/such/dir"), {});
            }).rfind("moe: " + dir.file("no/such/dir") + ": cannot create", 0),
            0u);
}

TEST(IoSafetensorsWrite, MakeTensorRejectsInexactIntegers) {
  EXPECT_EQ(io_error_of([] {
              moe::io::make_tensor("w", matrix(1, 2, {1, 1.5}), Dtype::I32);
            }),
            "moe: tensor 'w': element 1 = 1.5 cannot be stored exactly as I32");
  EXPECT_EQ(io_error_of([] {
              moe::io::make_tensor("w", matrix(1, 2, {1, 200}), Dtype::I8);
            }),
            "moe: tensor 'w': element 1 = 200 cannot be stored exactly as I8");
  EXPECT_EQ(io_error_of([] { moe::io::make_tensor("w", matrix(1, 1, {-1}), Dtype::U8); }),
            "moe: tensor 'w': element 0 = -1 cannot be stored exactly as U8");
  EXPECT_EQ(io_error_of([] { moe::io::make_tensor("w", matrix(1, 1, {2}), Dtype::BOOL); }),
            "moe: tensor 'w': element 0 = 2 cannot be stored exactly as BOOL");
  RowMatrix<std::int64_t> big(1, 1);
  big << std::numeric_limits<std::int64_t>::min();
  const TensorToWrite t = moe::io::make_tensor("big", big);
  EXPECT_EQ(t.dtype, Dtype::I64);
  std::int64_t back;
  std::memcpy(&back, t.bytes.data(), 8);
  EXPECT_EQ(back, big(0, 0));
}

// ---- checkpoint directories ----

TEST(IoCheckpoint, ShardedDirectoryWithIndex) {
  TempDir dir;
  const RowMatrix<double> a = matrix(2, 2, {1, 2, 3, 4});
  const RowMatrix<double> b = matrix(1, 3, {5, 6, 7});
  const RowMatrix<double> c = matrix(3, 1, {8, 9, 10});
  moe::io::write_safetensors(dir.file("model-00001-of-00002.safetensors"),
                             {moe::io::make_tensor("layer.a", a, Dtype::F32),
                              moe::io::make_tensor("layer.b", b, Dtype::BF16)});
  moe::io::write_safetensors(dir.file("model-00002-of-00002.safetensors"),
                             {moe::io::make_tensor("layer.c", c, Dtype::F64),
                              moe::io::make_tensor("unlisted", c, Dtype::F64)});
  write_text(dir.file("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 48},
    "weight_map": {
      "layer.a": "model-00001-of-00002.safetensors",
      "layer.b": "model-00001-of-00002.safetensors",
      "layer.c": "model-00002-of-00002.safetensors"
    }
  })");
  Checkpoint ck = Checkpoint::open_directory(dir.str());
  EXPECT_EQ(ck.directory(), dir.str());
  EXPECT_EQ(ck.num_files(), 2u);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"layer.a", "layer.b", "layer.c"}));
  EXPECT_TRUE(ck.contains("layer.c"));
  EXPECT_FALSE(ck.contains("unlisted"));
  EXPECT_EQ(ck.file_of("layer.b").path(), dir.file("model-00001-of-00002.safetensors"));
  EXPECT_EQ(ck.file_of("layer.c").path(), dir.file("model-00002-of-00002.safetensors"));
  EXPECT_EQ(&ck.file_of("layer.a"), &ck.file_of("layer.b"));
  EXPECT_EQ(ck.read_matrix<double>("layer.a"), a);
  EXPECT_EQ(ck.read_matrix<float>("layer.b"), b.cast<float>());
  EXPECT_EQ(ck.read_vector<double>("layer.c"), (std::vector<double>{8, 9, 10}));
  EXPECT_EQ(RowMatrix<double>(ck.map_matrix<double>("layer.c")), c);
  EXPECT_EQ(ck.info("layer.b").dtype, Dtype::BF16);
  EXPECT_EQ(io_error_of([&] { ck.file_of("layer.d"); }),
            "moe: " + dir.str() + ": no tensor named 'layer.d'");
  EXPECT_EQ(io_error_of([&] { ck.read_matrix<float>("unlisted"); }),
            "moe: " + dir.str() + ": no tensor named 'unlisted'");
  // Moving keeps the files (and references to them) alive.
  const SafetensorsFile* before = &ck.file_of("layer.a");
  Checkpoint moved = std::move(ck);
  EXPECT_EQ(&moved.file_of("layer.a"), before);
}

TEST(IoCheckpoint, SingleFileDirectory) {
  TempDir dir;
  moe::io::write_safetensors(dir.file("model.safetensors"),
                             {moe::io::make_tensor("w", matrix(1, 2, {1, 2}))});
  const Checkpoint ck = Checkpoint::open_directory(dir.str());
  EXPECT_EQ(ck.num_files(), 1u);
  EXPECT_EQ(ck.names(), std::vector<std::string>{"w"});
  EXPECT_EQ(ck.read_matrix<double>("w"), matrix(1, 2, {1, 2}));
  EXPECT_EQ(ck.file_of("w").path(), dir.file("model.safetensors"));
}

TEST(IoCheckpoint, IndexErrorsNameTheIndexFile) {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  const auto open_with = [&](const std::string& text) {
    write_text(index, text);
    return io_error_of([&] { Checkpoint::open_directory(dir.str()); });
  };
  moe::io::write_safetensors(dir.file("s1.safetensors"),
                             {moe::io::make_tensor("a", matrix(1, 1, {1}))});
  EXPECT_EQ(open_with(R"({"metadata": {}})"), "moe: " + index + ": index has no 'weight_map'");
  EXPECT_EQ(open_with(R"({"weight_map": ["a"]})"),
            "moe: " + index +
                ": 'weight_map' is a JSON array, expected an object of tensor name -> shard file");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": 1}})"),
            "moe: " + index +
                ": 'weight_map' entry of 'a' is a JSON number, expected a shard "
                "file name");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "../s1.safetensors"}})"),
            "moe: " + index +
                ": 'weight_map' entry of 'a' is \"../s1.safetensors\", expected a "
                "file name in the same directory");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "s2.safetensors"}})"),
            "moe: " + index + ": shard 's2.safetensors' of tensor 'a' does not exist");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})"),
            "moe: " + index +
                ": tensor 'b' is listed in shard 's1.safetensors', which does not "
                "contain it");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}})"),
            "moe: " + index + ": key 'a' appears twice in 'weight_map'");
  EXPECT_EQ(open_with(R"({"weight_map": {}, "weight_map": {}})"),
            "moe: " + index + ": key 'weight_map' appears twice");
  EXPECT_EQ(open_with("[]"), "moe: " + index + ": index is a JSON array, expected an object");
  EXPECT_EQ(open_with("").rfind("moe: " + index + " is not valid JSON: ", 0), 0u);
  // A malformed shard reports the shard.
  write_bytes(dir.file("s3.safetensors"), {1, 2, 3});
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "s3.safetensors"}})"),
            "moe: " + dir.file("s3.safetensors") +
                ": file has 3 bytes, too few for the 8-byte header length");
  EXPECT_EQ(open_with(R"({"weight_map": {"a": "s1.safetensors"}})"), "<no exception>");
}

TEST(IoCheckpoint, LargeWeightMapParsesInLinearTime) {
  // DeepSeek-V3's index lists about 90k names; duplicate detection must not be quadratic.
  std::string text = R"({"weight_map": {)";
  for (int i = 0; i < 100000; ++i) {
    if (i) text += ',';
    text += "\"model.layers." + std::to_string(i) + ".w\": \"model-0000" + std::to_string(i % 7) +
            ".safetensors\"";
  }
  text += "}}";
  const auto map = moe::io::parse_weight_map(text, "big.index.json");
  ASSERT_EQ(map.size(), 100000u);
  EXPECT_EQ(map.at("model.layers.12345.w"), "model-00004.safetensors");
}

TEST(IoSafetensors, ManyTensors) {
  TempDir dir;
  std::vector<TensorToWrite> tensors;
  for (int i = 0; i < 5000; ++i) {
    tensors.push_back(moe::io::make_tensor("t" + std::to_string(i), matrix(1, 2, {1.0 * i, -1.0}),
                                           i % 2 ? Dtype::F32 : Dtype::BF16));
  }
  const std::string path = dir.file("many.safetensors");
  moe::io::write_safetensors(path, tensors);
  const auto f = SafetensorsFile::open(path);
  ASSERT_EQ(f.size(), 5000u);
  EXPECT_EQ(f.read_vector<double>("t4321"), (std::vector<double>{4321, -1}));
  EXPECT_EQ(f.read_vector<double>("t254"), (std::vector<double>{254, -1}));  // exact in bf16
}

TEST(IoCheckpoint, EmptyDirectory) {
  TempDir dir;
  EXPECT_EQ(
      io_error_of([&] { Checkpoint::open_directory(dir.str()); }),
      "moe: " + dir.str() + ": neither model.safetensors.index.json nor model.safetensors exists");
}

// ---- a real file written by the Python library ----

TEST(IoSafetensors, ReadsTheMixtralReferenceFile) {
  const std::string path = std::string(MOE_TEST_DATA_DIR) + "/reference/mixtral.safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << path << " is not there yet";
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata().at("family"), "mixtral");
  const auto& router = f.info("router.weight");
  EXPECT_EQ(router.dtype, Dtype::F64);
  EXPECT_EQ(router.shape, (std::vector<std::int64_t>{8, 64}));
  const RowMatrix<double> w = f.read_matrix<double>("router.weight");
  EXPECT_EQ(RowMatrix<double>(f.map_matrix<double>("router.weight")), w);
  EXPECT_EQ(f.read_matrix<float>("router.weight"), w.cast<float>());
  EXPECT_GT(w.cwiseAbs().maxCoeff(), 0.0);
  const RowMatrix<std::int64_t> idx = f.read_matrix<std::int64_t>("topk_idx");
  EXPECT_EQ(idx.rows(), 37);
  EXPECT_EQ(idx.cols(), 2);
  EXPECT_GE(idx.minCoeff(), 0);
  EXPECT_LT(idx.maxCoeff(), 8);
}

}  // namespace
