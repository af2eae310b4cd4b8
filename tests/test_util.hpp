// Shared helpers of the unit tests: seeded random data, error checks.
#pragma once

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "moe/moe.hpp"

namespace moe::test {

/// Every test binary that includes this header makes MOE_ASSERT throw moe::error instead of
/// aborting (the library default), so a broken invariant fails one test rather than the run.
/// An inline variable: initialised once per program, before main.
inline const detail::assert_handler previous_assert_handler =
    set_assert_handler(&detail::throwing_assert_handler);

/// N(0, scale^2) matrix from a seeded generator (never Matrix::Random: not seedable).
template <class T>
RowMatrix<T> random_matrix(Index rows, Index cols, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

/// Random weights for a block of `config`.
template <class T>
MoeWeights<T> random_weights(const MoeConfig& config, std::mt19937_64& rng, bool gated = true,
                             bool with_bias = false, bool with_noise = false) {
  auto w = MoeWeights<T>::zeros(config, gated, with_bias, with_noise);
  w.router = random_matrix<T>(config.num_experts, config.d_model, rng, 0.5);
  if (with_bias) w.router_bias = random_matrix<T>(config.num_experts, 1, rng, 0.1);
  if (with_noise) w.router_noise = random_matrix<T>(config.num_experts, config.d_model, rng, 0.2);
  w.experts.stacked_in() = random_matrix<T>(w.experts.stacked_in().rows(), config.d_model, rng, 0.2);
  w.experts.stacked_out() =
      random_matrix<T>(w.experts.stacked_out().rows(), config.d_ff, rng, 0.2);
  if (config.shared_d_ff > 0) {
    w.shared.stacked_in() = random_matrix<T>(w.shared.stacked_in().rows(), config.d_model, rng, 0.2);
    w.shared.stacked_out() = random_matrix<T>(config.d_model, config.shared_d_ff, rng, 0.2);
    if (config.shared_expert_gate) w.shared_gate = random_matrix<T>(1, config.d_model, rng, 0.3);
  }
  return w;
}

/// Normalised mean squared error of got against ref (in double): |got - ref|^2 / |ref|^2, or
/// |got - ref|^2 when ref is zero.
template <class T>
double nmse(const RowMatrix<T>& got, const RowMatrix<T>& ref) {
  const double num = (got.template cast<double>() - ref.template cast<double>()).squaredNorm();
  const double den = ref.template cast<double>().squaredNorm();
  return den > 0 ? num / den : num;
}

/// Expects `f()` to throw exactly E with exactly `message`.
template <class E, class F>
void expect_error(F&& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "expected an exception with message: " << message;
  } catch (const E& e) {
    EXPECT_EQ(std::string(e.what()), message);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type, message: " << e.what();
  }
}

}  // namespace moe::test
