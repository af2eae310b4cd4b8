// Must NOT compile: the storage policy given in the Ffn position (third template argument).
// ctest compile_fail_storage_as_ffn expects the static_assert naming the misplaced argument.
#include "moe/moe.hpp"

int main() {
  moe::MoeConfig c;
  c.d_model = 4;
  c.d_ff = 8;
  c.num_experts = 2;
  c.top_k = 1;
  // error: "moe: SparseMoeBlock<T, Gating, Ffn, Storage>: the third argument (Ffn) is a storage
  // policy; ..."
  const moe::SparseMoeBlock<float, moe::gating::Mixtral, moe::CompactExperts<moe::Bf16>> block(
      c, moe::MoeWeights<float>::zeros(c));
  return 0;
}
