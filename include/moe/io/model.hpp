// moe/io: a Hugging Face MoE model directory (config.json + safetensors) mapped onto our blocks.
// Umbrella of the checkpoint headers:
//
//   json.hpp              strict JSON parsing of untrusted text, value descriptions for messages
//   tensor_info.hpp       TensorInfo, the per-dtype element loop
//   safetensors_reader.hpp / safetensors_writer.hpp (safetensors.hpp includes both)
//   checkpoint.hpp        a directory's tensors, single file or sharded by an index
//   families.hpp          THE per-family table: model_type, keys and aliases, HF tensor names
//   model_spec.hpp        config.json -> ModelSpec
//   model_checkpoint.hpp  ModelCheckpoint (spec + tensors), LoadOptions, the checked layer reader
//   load_weights.hpp      load_moe_weights, load_moe_shard (expert subsets), load_dense_ffn,
//                         gating_options, check_ffn
//   load_block.hpp        load_moe_layer, AnyMoeBlock, load_any_moe_layer
//
//   auto model = moe::io::ModelCheckpoint::open("Mixtral-8x7B-v0.1");
//   // the block type named by the caller (compile-time family):
//   auto block = moe::io::load_moe_layer<moe::SparseMoeBlock<float>>(model, 3);
//   // or chosen at run time from config.json "model_type":
//   moe::io::AnyMoeBlock<float> any = moe::io::load_any_moe_layer<float>(model, 3);
//   any.forward(x, y, ws);
#pragma once

#include "moe/io/checkpoint.hpp"
#include "moe/io/families.hpp"
#include "moe/io/load_block.hpp"
#include "moe/io/load_experts.hpp"
#include "moe/io/load_weights.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/io/safetensors.hpp"
