// A user's project: includes the installed headers, runs one Mixtral-style block.
#include <moe/moe.hpp>

int main() {
  moe::MoeConfig config{/*d_model=*/8, /*d_ff=*/16, /*num_experts=*/4, /*top_k=*/2};
  auto weights = moe::MoeWeights<float>::zeros(config);
  weights.router.setConstant(0.5f);
  moe::SparseMoeBlock<float> block(config, std::move(weights));
  moe::Workspace<float> workspace;
  moe::RowMatrix<float> x = moe::RowMatrix<float>::Ones(3, 8), y(3, 8);
  block.forward(x, y, workspace);
  return y.allFinite() && workspace.stats().assignments == 6 ? 0 : 1;
}
