// Compares one tensor of two safetensors files (float32 logits written by mixtral_forward
// --logits-out against a reference): exit 0 when the shapes agree and
// max |got - ref| <= tol * (1 + max |ref|), else 1. Used by the example's ctest entry.
//
//   compare_logits GOT.safetensors REF.safetensors [--name logits] [--tol 1e-4]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "moe/io/safetensors.hpp"

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: compare_logits GOT REF [--name logits] [--tol 1e-4]\n");
    return 2;
  }
  std::string name = "logits";
  double tol = 1e-4;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--name") {
      name = argv[i + 1];
    } else if (flag == "--tol") {
      tol = std::stod(argv[i + 1]);
    } else {
      std::fprintf(stderr, "compare_logits: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const auto got_file = moe::io::SafetensorsFile::open(argv[1]);
  const auto ref_file = moe::io::SafetensorsFile::open(argv[2]);
  if (got_file.info(name).shape != ref_file.info(name).shape) {
    std::fprintf(stderr, "compare_logits: '%s' has shape %s in %s but %s in %s\n", name.c_str(),
                 moe::io::shape_str(got_file.info(name).shape).c_str(), argv[1],
                 moe::io::shape_str(ref_file.info(name).shape).c_str(), argv[2]);
    return 1;
  }
  const auto got = got_file.read_matrix<double>(name);
  const auto ref = ref_file.read_matrix<double>(name);
  const double err = (got - ref).cwiseAbs().maxCoeff();
  const double scale = ref.cwiseAbs().maxCoeff();
  const bool ok = err <= tol * (1.0 + scale);  // false for NaN
  std::printf("%s: '%s' %s max |err| = %.3g, max |ref| = %.3g, tolerance %.3g\n",
              ok ? "match" : "MISMATCH", name.c_str(),
              moe::io::shape_str(ref_file.info(name).shape).c_str(), err, scale,
              tol * (1.0 + scale));
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "compare_logits: %s\n", e.what());
  return 1;
}
