// Must NOT compile: forward() refuses a column-major y at compile time (it cannot bind to the
// row-major output view). ctest compile_fail_col_major_y expects the static_assert message below.
#include <Eigen/Core>

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
  Eigen::MatrixXf y(3, 4);  // column-major
  block.forward(x, y, ws);  // error: "moe: y must be row-major [num_tokens x d_model] ..."
  return 0;
}
