// Must NOT compile: a double x handed to a float block (no silent conversion).
// ctest compile_fail_wrong_scalar_x expects the static_assert message below.
#include "moe/moe.hpp"

int main() {
  moe::MoeConfig c;
  c.d_model = 4;
  c.d_ff = 8;
  c.num_experts = 2;
  c.top_k = 1;
  const moe::SparseMoeBlock<float> block(c, moe::MoeWeights<float>::zeros(c));
  moe::Workspace<float> ws;
  const moe::RowMatrix<double> x = moe::RowMatrix<double>::Zero(3, 4);
  moe::RowMatrix<float> y(3, 4);
  block.forward(x, y, ws);  // error: "moe: x has the wrong scalar"
  return 0;
}
