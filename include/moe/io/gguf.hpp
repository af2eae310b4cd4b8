// moe/io: GGUF, llama.cpp's model format: the reader (gguf_reader.hpp), the writer
// (gguf_writer.hpp), metadata values (gguf_value.hpp), ggml tensor types (ggml_types.hpp) and
// the decoding of tensors to float (gguf_decode.hpp).
#pragma once

#include "moe/io/ggml_types.hpp"
#include "moe/io/gguf_decode.hpp"
#include "moe/io/gguf_reader.hpp"
#include "moe/io/gguf_value.hpp"
#include "moe/io/gguf_writer.hpp"
