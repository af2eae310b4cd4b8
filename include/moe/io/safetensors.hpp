// moe/io: the safetensors format, reader and writer (see safetensors_reader.hpp for the format and
// the validation of untrusted files, safetensors_writer.hpp for the layout written).
#pragma once

#include "moe/io/safetensors_reader.hpp"
#include "moe/io/safetensors_writer.hpp"
