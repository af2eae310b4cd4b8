// moe_reference_test: replays every golden case (FORMAT.md) found in tests/data/reference and in
// the directories of $MOE_REFERENCE_DIR (colon-separated), one line per case:
//   REFERENCE <file> <family> PASS|FAIL|SKIP max_abs=<x> max_rel=<y> [extra=<x> ...]
// max_rel is the largest error divided by (1 + max |reference|), the form of FORMAT.md's
// tolerances. Exit status 1 if any case FAILs; an unreadable case is a FAIL, never a crash.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "reference/golden_backward.hpp"
#include "reference/golden_case.hpp"
#include "reference/golden_families.hpp"
#include "reference/golden_v2_runner.hpp"
#include <dirent.h>

namespace {

std::vector<std::string> list_cases(const std::string& dir, bool& ok) {
  std::vector<std::string> files;
  DIR* d = opendir(dir.c_str());
  if (!d) {
    std::printf("REFERENCE %s - FAIL cannot open directory\n", dir.c_str());
    ok = false;
    return files;
  }
  while (const dirent* entry = readdir(d)) {
    const std::string name = entry->d_name;
    const std::string ext = ".safetensors";
    if (name.size() > ext.size() && name.compare(name.size() - ext.size(), ext.size(), ext) == 0) {
      files.push_back(dir + "/" + name);
    }
  }
  closedir(d);
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

int main() {
  std::vector<std::string> dirs = {std::string(MOE_TEST_DATA_DIR) + "/reference",
                                   std::string(MOE_TEST_DATA_DIR) + "/reference/v2"};
  if (const char* extra = std::getenv("MOE_REFERENCE_DIR")) {
    std::string list = extra;
    std::size_t start = 0;
    while (start <= list.size()) {
      const std::size_t end = std::min(list.find(':', start), list.size());
      if (end > start) dirs.push_back(list.substr(start, end - start));
      start = end + 1;
    }
  }
  bool ok = true;
  int passed = 0, failed = 0, skipped = 0;
  for (const std::string& dir : dirs) {
    for (const std::string& path : list_cases(dir, ok)) {
      const std::string file = path.substr(path.find_last_of('/') + 1);
      std::string family = "-";
      try {
        if (moe::io::SafetensorsFile::open(path).metadata().count("schema") != 0 &&
            moe::io::SafetensorsFile::open(path).metadata().at("schema") == "moe-golden-v2") {
          const moe::golden::v2::Case c(path);
          family = c.family();
          moe::golden::Report report;
          std::string skip_reason;
          if (!moe::golden::v2::run_case(c, path, report, skip_reason)) {
            std::printf("REFERENCE %s %s SKIP %s\n", file.c_str(), family.c_str(),
                        skip_reason.c_str());
            ++skipped;
            continue;
          }
          std::printf("REFERENCE %s %s %s max_abs=%.3g max_rel=%.3g", file.c_str(), family.c_str(),
                      report.passed() ? "PASS" : "FAIL", report.max_abs, report.max_rel);
          for (const auto& [name, value] : report.extra)
            std::printf(" %s=%.3g", name.c_str(), value);
          std::printf("\n");
          for (const std::string& why : report.failures) std::printf("  %s\n", why.c_str());
          (report.passed() ? passed : failed) += 1;
          if (!report.passed()) ok = false;
          continue;
        }
        const moe::golden::Case c(path);
        family = c.meta_or("family", "-");
        if (family == "-") {
          std::printf("REFERENCE %s - SKIP no 'family' metadata: not a block case\n", file.c_str());
          ++skipped;
          continue;
        }
        moe::golden::Report report;
        std::string skip_reason;
        if (!moe::golden::run_family(c, report, skip_reason)) {
          std::printf("REFERENCE %s %s SKIP %s\n", file.c_str(), family.c_str(),
                      skip_reason.c_str());
          ++skipped;
          continue;
        }
        moe::golden::check_losses_and_gradients(c, report);
        std::printf("REFERENCE %s %s %s max_abs=%.3g max_rel=%.3g", file.c_str(), family.c_str(),
                    report.passed() ? "PASS" : "FAIL", report.max_abs, report.max_rel);
        for (const auto& [name, value] : report.extra) std::printf(" %s=%.3g", name.c_str(), value);
        std::printf("\n");
        for (const std::string& why : report.failures) std::printf("  %s\n", why.c_str());
        if (report.passed()) {
          ++passed;
        } else {
          ++failed;
          ok = false;
        }
      } catch (const std::exception& e) {
        std::printf("REFERENCE %s %s FAIL %s\n", file.c_str(), family.c_str(), e.what());
        ++failed;
        ok = false;
      }
    }
  }
  std::printf("reference cases: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return ok ? 0 : 1;
}
