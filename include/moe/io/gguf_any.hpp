// moe/io: a sparse layer of a GGUF file as an AnyMoeBlock, the gating policy chosen at run time
// from the file's architecture and keys (the GGUF counterpart of load_any_moe_layer).
//
//   const auto file = moe::io::GgufFile::open("Qwen3-30B-A3B-Q8_0.gguf");
//   const moe::io::AnyMoeBlock<float> block = moe::io::load_gguf_any_moe_layer<float>(file, 3);
//   moe::RowMatrix<float> y = block.forward(x);
#pragma once

#include "moe/error.hpp"
#include "moe/io/gguf_moe.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/io/load_block.hpp"

namespace moe::io {

/// Sparse layer `layer` of `file` as the AnyMoeBlock<T> alternative its routing needs:
/// SoftmaxTopK (llama/Mixtral, qwen2moe, qwen3moe, olmoe), DeepSeekV2 (deepseek2 with softmax
/// gating), GroupLimitedTopK (deepseek2 with sigmoid gating, glm4moe) or ScoredTopK (gpt-oss,
/// llama4). Same errors as
/// load_gguf_moe_layer.
template <class T>
AnyMoeBlock<T> load_gguf_any_moe_layer(const GgufFile& file, const GgufMoeSpec& spec, Index layer) {
  using Any = AnyMoeBlock<T>;
  switch (spec.routing) {
    case GgufRouting::softmax_top_k:
      return load_gguf_moe_layer<typename Any::template Alternative<0>>(file, spec, layer);
    case GgufRouting::deepseek_v2:
      return load_gguf_moe_layer<typename Any::template Alternative<1>>(file, spec, layer);
    case GgufRouting::deepseek_v3:
      return load_gguf_moe_layer<typename Any::template Alternative<2>>(file, spec, layer);
    case GgufRouting::scored_top_k:
      return load_gguf_moe_layer<typename Any::template Alternative<4>>(file, spec, layer);
  }
  throw value_error("moe: unknown GgufRouting");
}

/// Reads the spec of `file` and loads one layer (see above).
template <class T>
AnyMoeBlock<T> load_gguf_any_moe_layer(const GgufFile& file, Index layer) {
  return load_gguf_any_moe_layer<T>(file, read_gguf_moe_spec(file), layer);
}

#ifdef MOE_EXTERN_ANY_BLOCK
// Defined once, in the translation unit that includes moe/io/any_block_instances.hpp (see
// any_block.hpp).
extern template AnyMoeBlock<float> load_gguf_any_moe_layer<float>(const GgufFile&,
                                                                  const GgufMoeSpec&, Index);
extern template AnyMoeBlock<double> load_gguf_any_moe_layer<double>(const GgufFile&,
                                                                    const GgufMoeSpec&, Index);
#endif

}  // namespace moe::io
