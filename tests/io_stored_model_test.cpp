// Whole models loaded as stored (issue 14): the tiny Hugging Face checkpoints of tests/data
// rewritten as sharded BF16 run through the example's model with views of the mapped files, and
// the memory a mapped model costs: only the experts that are chosen are paged in, and a model
// whose experts exceed a cgroup v2 memory.max runs under it (where the machine lets us set one).
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "moe/io/model.hpp"
#include "moe/io/safetensors.hpp"

#include "../examples/mixtral_model.hpp"
#include "io_test_util.hpp"
#include "test_util.hpp"

namespace {

using moe::Index;
using moe::RowMatrix;
using moe::io::WeightFormat;
using moe::test::Json;
using moe::test::ScratchDir;
using moe::test::TensorToWrite;

const std::vector<Index> kTokens = {1, 42, 7, 255, 128, 3, 99, 200, 17, 64, 2};

// Copies checkpoint `src` into `dst` with every floating tensor rounded to BF16, in two shards
// (alternate tensors) named by model.safetensors.index.json.
void write_bf16_sharded_copy(const std::string& src, const ScratchDir& dst) {
  const auto file = moe::io::SafetensorsFile::open(src + "/model.safetensors");
  std::vector<TensorToWrite> shard[2];
  Json weight_map = Json::object();
  int i = 0;
  for (const auto& name : file.names()) {
    const auto& info = file.info(name);
    RowMatrix<float> m = file.read_matrix<float>(name);
    for (Index k = 0; k < m.size(); ++k) {
      m.data()[k] = moe::kernels::bf16_to_float(moe::kernels::float_to_bf16(m.data()[k]));
    }
    TensorToWrite t = moe::io::make_tensor(name, m, moe::io::Dtype::BF16);
    t.shape = info.shape;
    const std::string shard_name =
        moe::detail::concat("model-0000", i % 2 + 1, "-of-00002.safetensors");
    weight_map[name] = shard_name;
    shard[i++ % 2].push_back(std::move(t));
  }
  for (int s = 0; s < 2; ++s) {
    moe::io::write_safetensors(
        dst.file(moe::detail::concat("model-0000", s + 1, "-of-00002.safetensors")), shard[s]);
  }
  moe::test::write_text(dst.file("model.safetensors.index.json"),
                        Json{{"weight_map", weight_map}}.dump());
  std::ifstream in(src + "/config.json");
  moe::test::write_text(dst.file("config.json"), std::string(std::istreambuf_iterator<char>(in),
                                                             std::istreambuf_iterator<char>()));
}

RowMatrix<float> read_logits(const std::string& path) {
  return moe::io::SafetensorsFile::open(path).read_matrix<float>("logits");
}

class TinyBf16 : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyBf16, AsStoredViewsMatchTheFp32LoadAndHuggingFace) {
  const std::string data = MOE_TEST_DATA_DIR;
  ScratchDir dir;
  write_bf16_sharded_copy(data + "/" + GetParam() + "_tiny", dir);
  moe::io::LoadOptions o;
  const example::ModelWeights stored = example::load_model(dir.str(), o);
  o.weights = WeightFormat::fp32;
  const example::ModelWeights fp32 = example::load_model(dir.str(), o);
  for (const auto& layer : stored.layers) {
    EXPECT_EQ(layer.moe.weight_format(), WeightFormat::bf16);
    ASSERT_NE(layer.moe.residency(), nullptr);
    EXPECT_TRUE(layer.moe.residency()->mapped());
  }
  moe::ThreadPool pool(2);
  moe::Workspace<float> ws;
  const RowMatrix<float> got = example::forward(stored, kTokens, ws, pool);
  const RowMatrix<float> ref = example::forward(fp32, kTokens, ws, pool);
  const RowMatrix<float> hf = read_logits(data + "/" + GetParam() + "_tiny_expected.safetensors");
  const double scale = 1.0 + double(hf.cwiseAbs().maxCoeff());
  // The same bf16 weights in fp32. The fast bf16 path (CompactExperts<Bf16>'s default) also
  // rounds x and the activations to bf16 (2^-9 relative) before its products: through the whole
  // model that gave 1.5e-3 * scale (mixtral) and 5e-4 * scale (qwen2_moe).
  const double to_fp32 = double((got - ref).cwiseAbs().maxCoeff());
  EXPECT_LE(to_fp32, 4e-3 * scale);
  // Against transformers in fp32 on the unrounded weights: bf16's own error.
  const double to_hf = double((got - hf).cwiseAbs().maxCoeff());
  EXPECT_LE(to_hf, 2e-2 * scale);
  std::printf("  %s bf16 as-stored: max |err| vs fp32 load %.3g, vs HF fp32 %.3g (max |ref| %.3g)\n",
              GetParam().c_str(), to_fp32, to_hf, scale - 1.0);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, TinyBf16, ::testing::Values("mixtral", "qwen2_moe"),
                         [](const auto& info) { return info.param; });

// Resident bytes of this process's mappings of `path` (the Rss lines of /proc/self/smaps for
// the mappings named by that path), or -1 without /proc/self/smaps. Only the checkpoint's pages:
// the process's RssFile also counts the test binary's code pages that a first load faults in
// (about 1.1 MiB under ASan), which says nothing about the experts.
long long mapped_rss_bytes(const std::string& path) {
  std::ifstream in("/proc/self/smaps");
  if (!in) return -1;
  const std::string want = std::filesystem::canonical(path).string();
  long long total = 0;
  bool ours = false;
  std::string line;
  while (std::getline(in, line)) {
    const std::size_t space = line.find(' ');
    const std::string first = line.substr(0, space);
    if (first.find('-') != std::string::npos && first.back() != ':') {  // "start-end perms ..."
      const std::size_t slash = line.find('/');
      ours = slash != std::string::npos && line.compare(slash, std::string::npos, want) == 0;
    } else if (ours && first == "Rss:") {
      total += std::stoll(line.substr(space)) * 1024;
    }
  }
  return total;
}

// A 32-expert layer of 1.5 MiB bf16 experts (48 MiB): loading maps them without reading; each
// forward pages in only the chosen experts; the outputs equal a bf16 block quantised in memory
// from the same weights, bit for bit.
TEST(IoStoredMemory, OnlyChosenExpertsArePagedIn) {
  ScratchDir dir;
  Json c = moe::test::mixtral_config(1);
  c["hidden_size"] = 256;
  c["intermediate_size"] = 1024;
  c["num_local_experts"] = 32;
  moe::test::write_text(dir.file("config.json"), c.dump());
  const auto spec = moe::io::parse_model_spec(c.dump(), "config.json");
  std::mt19937_64 rng(5);
  auto w = moe::test::random_layer(spec, rng);
  std::vector<TensorToWrite> tensors;
  moe::test::add_moe_layer(tensors, spec.family, 0, w, spec.moe, moe::test::Layout::per_expert);
  for (auto& t : tensors) {  // experts BF16 (rounded), router F32
    if (t.name.find(".experts.") == std::string::npos) continue;
    RowMatrix<float> m(t.shape[0], t.shape[1]);
    std::memcpy(m.data(), t.bytes.data(), t.bytes.size());
    for (Index k = 0; k < m.size(); ++k) {
      m.data()[k] = moe::kernels::bf16_to_float(moe::kernels::float_to_bf16(m.data()[k]));
    }
    t = moe::io::make_tensor(t.name, m, moe::io::Dtype::BF16);
  }
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  const std::size_t expert_bytes = 32 * 3 * 256 * 1024 * 2;
  // Linux maps up to fault_around_bytes (64 KiB by default) of cached pages around a fault,
  // so each touched expert may bring in that much of its neighbours on either side.
  // The bound is 1 MiB: under one expert (1.5 MiB) and far under the layer's 48 MiB that
  // reading the experts would add.
  const long long fault_around = 64 << 10, slack = 16 * fault_around;
  const std::string file = dir.file("model.safetensors");
  const auto rss_file_bytes = [&] { return mapped_rss_bytes(file); };

  if (mapped_rss_bytes(file) < 0) GTEST_SKIP() << "no /proc/self/smaps";
  const long long before = rss_file_bytes();
  const moe::io::AnyMoeBlock<float> block = moe::io::load_any_moe_layer<float>(dir.str(), 0);
  ASSERT_EQ(block.expert_bytes(), expert_bytes);
  const long long after_load = rss_file_bytes();
  EXPECT_LE(after_load - before, slack) << "loading read expert pages";

  moe::io::LoadOptions fp32;
  fp32.weights = WeightFormat::fp32;
  const auto ref = moe::io::load_any_moe_layer<float>(dir.str(), 0, fp32).get<0>();
  using BlockBf16 = moe::io::detail::with_storage_t<std::decay_t<decltype(ref)>,
                                                   moe::CompactExperts<moe::Bf16>>;
  const BlockBf16 in_memory(ref.config(), ref.weights(), ref.gating().options);

  moe::Workspace<float> ws;
  std::mt19937_64 xr(6);
  std::vector<bool> touched(32, false);
  for (int step = 0; step < 6; ++step) {
    const RowMatrix<float> x = moe::test::random_matrix<float>(1, 256, xr, 1.0);
    RowMatrix<float> y(1, 256);
    block.forward(x, y, ws);
    for (Index e = 0; e < 32; ++e) {
      if (ws.plan().counts[std::size_t(e)] > 0) touched[std::size_t(e)] = true;
    }
    EXPECT_EQ(y, in_memory.forward(x)) << step;
    const long long n_touched = std::count(touched.begin(), touched.end(), true);
    const long long chosen = n_touched * (long long)(expert_bytes / 32);
    const long long grown = rss_file_bytes() - after_load;
    EXPECT_LE(grown, chosen + n_touched * 6 * fault_around + slack) << step;
    EXPECT_GE(grown, chosen * 9 / 10) << step;  // the measurement sees the pages we read
  }
  const auto usage = block.residency()->usage_counts();
  EXPECT_EQ(std::accumulate(usage.begin(), usage.end(), std::uint64_t(0)), 6u * 2u);
}

// ---- under a memory limit (cgroup v2 memory.max) ---------------------------------------------

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
bool write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.flush();
  return bool(out);
}

// A fresh cgroup v2 group with memory.max = limit (and no swap), removed at scope exit; `reason`
// says why none could be made (then path is empty). Tries a child of this process's own group,
// then of the hierarchy's root (root only). Touches nothing when /sys/fs/cgroup is not cgroup v2
// with the memory controller.
struct MemoryCgroup {
  std::string path, reason;
  bool no_swap = false;  // anonymous pages cannot escape the limit into swap
  explicit MemoryCgroup(long long limit) {
    const std::string root = "/sys/fs/cgroup";
    const std::string controllers = read_file(root + "/cgroup.controllers");
    if (controllers.find("memory") == std::string::npos) {
      reason = "/sys/fs/cgroup is not a cgroup v2 hierarchy with the memory controller";
      return;
    }
    std::string own = read_file("/proc/self/cgroup");  // "0::/PATH\n"
    own = own.substr(0, own.find('\n'));
    std::vector<std::string> parents;
    if (own.rfind("0::", 0) == 0) parents.push_back(root + own.substr(3));
    parents.push_back(root);
    for (const std::string& parent : parents) {
      const std::string subtree = read_file(parent + "/cgroup.subtree_control");
      if (subtree.find("memory") == std::string::npos &&
          !write_file(parent + "/cgroup.subtree_control", "+memory")) {
        continue;
      }
      const std::string dir = moe::detail::concat(parent, "/moe_io_limit_", ::getpid());
      if (::mkdir(dir.c_str(), 0755) != 0) continue;
      if (!write_file(dir + "/memory.max", std::to_string(limit))) {
        ::rmdir(dir.c_str());
        continue;
      }
      // memory.swap.max is absent without swap accounting; then only a machine without swap
      // keeps anonymous pages under the limit.
      const std::string swaps = read_file("/proc/swaps");
      no_swap = write_file(dir + "/memory.swap.max", "0") ||
                std::count(swaps.begin(), swaps.end(), '\n') <= 1;
      path = dir;
      return;
    }
    reason = "cannot create a group with memory.max under " + parents.front() + " or " + root +
             " (not root, or the no-internal-process rule)";
  }
  ~MemoryCgroup() {
    if (!path.empty()) ::rmdir(path.c_str());
  }
};

// Runs f() in a child process moved into `group` first; f's return value is the child's exit
// status. Returns the waitpid status, or -1 when the child could not join the group (exit 3).
template <class F>
int run_in_cgroup(const std::string& group, F f) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (!write_file(group + "/cgroup.procs", "0")) ::_exit(3);
    int code = 1;
    try {
      code = f();
    } catch (...) {
      code = 2;
    }
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

// Drops the file's clean pages from the page cache, so that the child reads (and is charged
// for) what it touches.
void evict(const std::string& file) {
  const int fd = ::open(file.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// 64 bf16 experts of 144 KiB (9 MiB), top-1, under a 4 MiB memory.max: as stored, the layer
// runs and writes the same outputs as without the limit; loaded fp32 (18 MiB of copies) the
// same child is killed, which shows the limit binds.
TEST(IoStoredMemory, RunsUnderACgroupLimitSmallerThanItsExperts) {
  constexpr long long kLimit = 4 << 20;
  ScratchDir dir;
  Json c = moe::test::mixtral_config(1);
  c["hidden_size"] = 128;
  c["intermediate_size"] = 192;
  c["num_local_experts"] = 64;
  c["num_experts_per_tok"] = 1;
  moe::test::write_text(dir.file("config.json"), c.dump());
  const auto spec = moe::io::parse_model_spec(c.dump(), "config.json");
  std::mt19937_64 rng(8);
  const auto w = moe::test::random_layer(spec, rng);
  std::vector<TensorToWrite> tensors;
  moe::test::add_moe_layer(tensors, spec.family, 0, w, spec.moe, moe::test::Layout::fused,
                           moe::io::Dtype::BF16);
  moe::io::write_safetensors(dir.file("model.safetensors"), tensors);
  const RowMatrix<float> x = moe::test::random_matrix<float>(4, 128, rng, 1.0);
  const std::string out = dir.file("y.bin");
  auto run = [&](WeightFormat f) {
    return [&, f] {
      moe::io::LoadOptions o;
      o.weights = f;
      const auto block = moe::io::load_any_moe_layer<float>(dir.str(), 0, o);
      const RowMatrix<float> y = block.forward(x);
      std::ofstream(out, std::ios::binary)
          .write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * 4));
      return 0;
    };
  };
  const auto unlimited = moe::io::load_any_moe_layer<float>(dir.str(), 0);
  ASSERT_GT(unlimited.expert_bytes(), std::size_t(2 * kLimit));
  const RowMatrix<float> want = unlimited.forward(x);

  MemoryCgroup group(kLimit);
  if (group.path.empty()) GTEST_SKIP() << "no memory limit test: " << group.reason;
  evict(dir.file("model.safetensors"));
  const int stored = run_in_cgroup(group.path, run(WeightFormat::as_stored));
  if (WIFEXITED(stored) && WEXITSTATUS(stored) == 3) GTEST_SKIP() << "cannot join " << group.path;
  ASSERT_TRUE(WIFEXITED(stored) && WEXITSTATUS(stored) == 0)
      << "as-stored child under " << kLimit << " bytes: status " << stored;
  RowMatrix<float> got(4, 128);
  std::ifstream(out, std::ios::binary)
      .read(reinterpret_cast<char*>(got.data()), std::streamsize(got.size() * 4));
  EXPECT_EQ(got, want);

  if (!group.no_swap) {
    std::printf("  swap without swap accounting: the fp32 control run is skipped\n");
    return;
  }
  evict(dir.file("model.safetensors"));
  const int fp32 = run_in_cgroup(group.path, run(WeightFormat::fp32));
  EXPECT_TRUE(WIFSIGNALED(fp32) && WTERMSIG(fp32) == SIGKILL)
      << "an fp32 load (" << unlimited.expert_bytes() * 2 << " bytes of copies) was not stopped by "
      << "memory.max = " << kLimit << ": status " << fp32;
}

}  // namespace
