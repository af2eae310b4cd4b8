// Central differences for the gradient checks of the backward tests.
#pragma once

#include <utility>

namespace moe::test {

/// (loss() with v + h, loss() with v - h), v restored afterwards: the two sides of a central
/// difference in the parameter or input entry v.
template <class Loss>
std::pair<double, double> around(double& v, double h, const Loss& loss) {
  const double orig = v;
  v = orig + h;
  const double plus = loss();
  v = orig - h;
  const double minus = loss();
  v = orig;
  return {plus, minus};
}

}  // namespace moe::test
