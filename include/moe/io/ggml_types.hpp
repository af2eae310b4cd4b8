// moe/io: the tensor types of ggml (the `type` field of a GGUF tensor info): ids, names and the
// block layout that fixes a tensor's byte size.
//
// A ggml tensor stores each row (ggml's dimension 0) as blocks of `block_size` elements taking
// `type_size` bytes each, so a row of n elements takes n / block_size * type_size bytes, and n
// must be a multiple of block_size. Ids and layouts follow ggml/include/ggml.h and
// ggml/src/ggml-common.h of llama.cpp; the ids are append-only, with gaps where types were removed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace moe::io {

/// A ggml tensor type id, as stored in a GGUF tensor info (u32). Every id ggml has assigned is
/// named, so that an unsupported one is reported by name; ids of removed types (4, 5, 31-33,
/// 36-38) and ids past the last known one are not enumerators.
enum class GgmlType : std::uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

/// Name and block layout of a ggml type. `block_size` elements take `type_size` bytes; both are 0
/// for a type whose layout this library does not know (the file cannot be laid out then).
struct GgmlTypeTraits {
  const char* name;
  std::size_t block_size;
  std::size_t type_size;
};

/// Traits of a type id; nullopt for an id ggml never assigned or has removed.
/// Sizes: ggml-common.h (block_q4_K = 2 halves + 12 scale bytes + 128 quant bytes = 144, ...).
inline std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t id) {
  switch (id) {
    case 0:
      return GgmlTypeTraits{"F32", 1, 4};
    case 1:
      return GgmlTypeTraits{"F16", 1, 2};
    case 2:
      return GgmlTypeTraits{"Q4_0", 32, 18};
    case 3:
      return GgmlTypeTraits{"Q4_1", 32, 20};
    case 6:
      return GgmlTypeTraits{"Q5_0", 32, 22};
    case 7:
      return GgmlTypeTraits{"Q5_1", 32, 24};
    case 8:
      return GgmlTypeTraits{"Q8_0", 32, 34};
    case 9:
      return GgmlTypeTraits{"Q8_1", 32, 36};
    case 10:
      return GgmlTypeTraits{"Q2_K", 256, 84};
    case 11:
      return GgmlTypeTraits{"Q3_K", 256, 110};
    case 12:
      return GgmlTypeTraits{"Q4_K", 256, 144};
    case 13:
      return GgmlTypeTraits{"Q5_K", 256, 176};
    case 14:
      return GgmlTypeTraits{"Q6_K", 256, 210};
    case 15:
      return GgmlTypeTraits{"Q8_K", 256, 292};
    case 16:
      return GgmlTypeTraits{"IQ2_XXS", 256, 66};
    case 17:
      return GgmlTypeTraits{"IQ2_XS", 256, 74};
    case 18:
      return GgmlTypeTraits{"IQ3_XXS", 256, 98};
    case 19:
      return GgmlTypeTraits{"IQ1_S", 256, 50};
    case 20:
      return GgmlTypeTraits{"IQ4_NL", 32, 18};
    case 21:
      return GgmlTypeTraits{"IQ3_S", 256, 110};
    case 22:
      return GgmlTypeTraits{"IQ2_S", 256, 82};
    case 23:
      return GgmlTypeTraits{"IQ4_XS", 256, 136};
    case 24:
      return GgmlTypeTraits{"I8", 1, 1};
    case 25:
      return GgmlTypeTraits{"I16", 1, 2};
    case 26:
      return GgmlTypeTraits{"I32", 1, 4};
    case 27:
      return GgmlTypeTraits{"I64", 1, 8};
    case 28:
      return GgmlTypeTraits{"F64", 1, 8};
    case 29:
      return GgmlTypeTraits{"IQ1_M", 256, 56};
    case 30:
      return GgmlTypeTraits{"BF16", 1, 2};
    case 34:
      return GgmlTypeTraits{"TQ1_0", 256, 54};
    case 35:
      return GgmlTypeTraits{"TQ2_0", 256, 66};
    case 39:
      return GgmlTypeTraits{"MXFP4", 32, 17};
    // Newer than the GGUF specification: named, layout not taken on here.
    case 40:
      return GgmlTypeTraits{"NVFP4", 0, 0};
    case 41:
      return GgmlTypeTraits{"Q1_0", 0, 0};
    default:
      return std::nullopt;
  }
}

/// Traits of an enumerator (always known).
inline GgmlTypeTraits ggml_type_traits(GgmlType type) {
  return *ggml_type_traits(static_cast<std::uint32_t>(type));
}

/// "Q4_K", "BF16", ...
inline const char* ggml_type_name(GgmlType type) { return ggml_type_traits(type).name; }

/// "Q4_K (12)" for a known id, "99 (unknown)" otherwise: the spelling of a type in messages.
inline std::string ggml_type_label(std::uint32_t id) {
  const auto t = ggml_type_traits(id);
  return t ? std::string(t->name) + " (" + std::to_string(id) + ")"
           : std::to_string(id) + " (unknown)";
}

}  // namespace moe::io
