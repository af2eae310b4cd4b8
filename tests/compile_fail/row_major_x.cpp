// Must compile: the control of the compile-fail tests (same code, row-major float x), so that
// their failure is known to come from the static_assert and not from the harness.
#include "moe/moe.hpp"

int main() {
  moe::MoeConfig c;
  c.d_model = 4;
  c.d_ff = 8;
  c.num_experts = 2;
  c.top_k = 1;
  const moe::SparseMoeBlock<float> block(c, moe::MoeWeights<float>::zeros(c));
  moe::Workspace<float> ws;
  const moe::RowMatrix<float> x = moe::RowMatrix<float>::Zero(3, 4);
  moe::RowMatrix<float> y(3, 4);
  block.forward(x, y, ws);
  return 0;
}
