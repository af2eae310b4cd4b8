// moe/io: the definitions of the instantiations that MOE_EXTERN_ANY_BLOCK declares extern (see
// any_block.hpp): include this header in exactly one translation unit of a program whose other
// translation units define MOE_EXTERN_ANY_BLOCK. Its compile options (defines, -march) must be
// those of the rest of the program, as for any inline code.
#pragma once

#include "moe/io/any_block.hpp"
#include "moe/io/gguf_any.hpp"
#include "moe/io/load_block.hpp"

namespace moe::io {

template class AnyMoeBlock<float>;
template class AnyMoeBlock<double>;
template AnyMoeBlock<float> load_any_moe_layer<float>(const ModelCheckpoint&, Index,
                                                      const LoadOptions&);
template AnyMoeBlock<double> load_any_moe_layer<double>(const ModelCheckpoint&, Index,
                                                        const LoadOptions&);
template AnyMoeBlock<float> load_gguf_any_moe_layer<float>(const GgufFile&, const GgufMoeSpec&,
                                                           Index);
template AnyMoeBlock<double> load_gguf_any_moe_layer<double>(const GgufFile&, const GgufMoeSpec&,
                                                             Index);

}  // namespace moe::io
