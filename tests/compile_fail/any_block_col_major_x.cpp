// Must NOT compile: AnyMoeBlock::forward refuses a column-major x at compile time, as the blocks
// do, instead of copying it silently. ctest compile_fail_any_block_col_major_x expects the
// static_assert message below.
#include <Eigen/Core>

#include "moe/io/load_block.hpp"

int main() {
  moe::MoeConfig c;
  c.d_model = 4;
  c.d_ff = 8;
  c.num_experts = 2;
  c.top_k = 1;
  const moe::io::AnyMoeBlock<float> any(
      moe::SparseMoeBlock<float>(c, moe::MoeWeights<float>::zeros(c)));
  moe::Workspace<float> ws;
  const Eigen::MatrixXf x = Eigen::MatrixXf::Zero(3, 4);  // column-major
  moe::RowMatrix<float> y(3, 4);
  any.forward(x, y, ws);  // error: "moe: x must be row-major [num_tokens x d_model] ..."
  return 0;
}
