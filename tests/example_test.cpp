// The example's whole-model forward (examples/mixtral_model.hpp) on the tiny Hugging Face
// checkpoints against the logits, hidden states and router logits transformers 5.17 computed
// (FORMAT.md section 8). Tolerance 1e-4 * (1 + max|ref|), float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/safetensors.hpp"

#include "../examples/mixtral_model.hpp"

namespace {

using example::Index;

/// max |a - b| after checking the shapes agree.
double max_abs_diff(const moe::RowMatrix<float>& a, const moe::RowMatrix<float>& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  if (a.rows() != b.rows() || a.cols() != b.cols()) return INFINITY;
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

void expect_close(const std::string& what, const moe::RowMatrix<float>& got,
                  const moe::RowMatrix<float>& ref) {
  const double s = static_cast<double>(ref.cwiseAbs().maxCoeff());
  const double err = max_abs_diff(got, ref);
  EXPECT_LE(err, 1e-4 * (1.0 + s)) << what;
  ::testing::Test::RecordProperty(what + "_max_abs_err", std::to_string(err));
  std::printf("  %-20s max |err| = %.3g (max |ref| = %.3g)\n", what.c_str(), err, s);
}

class TinyCheckpoint : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyCheckpoint, MatchesHuggingFace) {
  const std::string name = GetParam();
  const std::string data = MOE_TEST_DATA_DIR;
  const example::ModelWeights model = example::load_model(data + "/" + name + "_tiny");
  const auto expected =
      moe::io::SafetensorsFile::open(data + "/" + name + "_tiny_expected.safetensors");
  const std::vector<std::int64_t> ids64 = expected.read_vector<std::int64_t>("input_ids");
  const std::vector<Index> ids(ids64.begin(), ids64.end());
  ASSERT_EQ(ids.size(), 11u);

  moe::Workspace<float> ws;
  example::ForwardTrace trace;
  const example::Matrix logits = example::forward(model, ids, ws, moe::serial_executor(), &trace);
  expect_close("logits", logits, expected.read_matrix<float>("logits"));
  ASSERT_EQ(trace.hidden_states.size(), 3u);
  expect_close("hidden_states.0", trace.hidden_states[0],
               expected.read_matrix<float>("hidden_states.0"));
  expect_close("hidden_states.1", trace.hidden_states[1],
               expected.read_matrix<float>("hidden_states.1"));
  ASSERT_EQ(trace.router_logits.size(), 2u);
  for (std::size_t l = 0; l < 2; ++l) {
    const std::string key = "router_logits." + std::to_string(l);
    expect_close(key, trace.router_logits[l], expected.read_matrix<float>(key));
  }

  // Same logits with a thread pool (the block's result does not depend on the executor).
  moe::ThreadPool pool(2);
  EXPECT_EQ(example::forward(model, ids, ws, pool), logits);
}

INSTANTIATE_TEST_SUITE_P(Example, TinyCheckpoint, ::testing::Values("mixtral", "qwen2_moe"),
                         [](const auto& info) { return info.param; });

TEST(Example, LoadModelErrors) {
  EXPECT_THROW(example::load_model("/nonexistent/dir"), moe::io_error);
  const example::ModelWeights model =
      example::load_model(std::string(MOE_TEST_DATA_DIR) + "/mixtral_tiny");
  moe::Workspace<float> ws;
  try {
    example::forward(model, {1, 256}, ws, moe::serial_executor());
    ADD_FAILURE() << "expected an error for token id 256";
  } catch (const moe::error& e) {
    EXPECT_EQ(std::string(e.what()), "example: token id 256 outside [0, 256)");
  }
}

}  // namespace
