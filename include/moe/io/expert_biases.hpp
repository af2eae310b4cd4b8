// moe/io: the routed experts' biases of a sparse layer (gpt-oss: experts.gate_up_proj_bias
// [E, 2F], gate and up entries interleaved like its columns, and experts.down_proj_bias [E, D]),
// read in our layout (gate entries, then up): what the fp32 loader puts in ExpertStack and what a
// compact block keeps next to its stored experts.
#pragma once

#include <cstdint>
#include <string>

#include "moe/error.hpp"
#include "moe/io/families.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

namespace detail {

/// The prefix of sparse layer `layer`'s tensor names as found in the files: the hub prefix, or
/// transformers v5's in-memory one when only that holds the router.
inline std::string sparse_names_prefix(const ModelCheckpoint& m, const LayerReader& r,
                                       Index layer) {
  const FamilyRow& row = m.spec().row();
  std::string p = m.spec().moe_prefix(layer);
  if (row.sparse_prefix_v5 != nullptr && !r.has(p + row.router)) {
    const std::string v5 = expand_name(row.sparse_prefix_v5, layer);
    if (r.has(v5 + row.router)) p = v5;
  }
  return p;
}

/// Expert e's biases (names under prefix p, shapes checked by the caller) into in [in_rows]
/// (gate entries, then up entries when gated) and out [d_model of the experts].
template <class T>
void read_expert_biases(const ModelCheckpoint& m, const LayerReader& r, const std::string& p,
                        Index e, T* in, T* out) {
  const FamilyRow& row = m.spec().row();
  const Index I = m.spec().moe.d_ff, He = m.spec().moe.expert_d_model();
  const Index in_rows = (row.gated_experts ? 2 : 1) * I;
  RowMatrix<T> b_in(1, in_rows);
  r.read_rows_into<T>(p + row.expert_in_bias, e, MutMap<T>(b_in.data(), 1, in_rows));
  r.read_rows_into<T>(p + row.expert_out_bias, e, MutMap<T>(out, 1, He));
  const bool interleaved = row.fused_layout == FusedLayout::in_out_interleaved;
  for (Index i = 0; i < in_rows; ++i) {
    // gpt-oss interleaves gate and up entries (like its columns); ours are gate, then up.
    in[i] = b_in(0, interleaved ? (i < I ? 2 * i : 2 * (i - I) + 1) : i);
  }
}

}  // namespace detail

/// The routed experts' biases of a sparse layer, in ExpertStack's layout.
template <class T>
struct ExpertBiases {
  RowMatrix<T> in;   ///< [E x in_rows]: gate entries, then up entries (gated)
  RowMatrix<T> out;  ///< [E x d_model of the experts]
};

/// Every routed expert's biases of sparse layer `layer`, from the family row's expert_in_bias /
/// expert_out_bias names; empty matrices for a family without them. Throws io_error for a
/// missing tensor or a non-finite value, shape_error for a shape config.json does not imply
/// (each naming the tensor), config_error for a dense layer.
template <class T>
ExpertBiases<T> load_expert_biases(const ModelCheckpoint& m, Index layer) {
  const ModelSpec& s = m.spec();
  const FamilyRow& row = s.row();
  ExpertBiases<T> b;
  if (row.expert_in_bias == nullptr) return b;
  if (!s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a dense layer, not a sparse MoE layer"));
  }
  const detail::LayerReader r(m, layer);
  const std::string p = detail::sparse_names_prefix(m, r, layer);
  const std::int64_t E = s.moe.num_experts, He = s.moe.expert_d_model();
  const std::int64_t in_rows = (row.gated_experts ? 2 : 1) * s.moe.d_ff;
  r.check(p + row.expert_in_bias, {E, in_rows});
  r.check(p + row.expert_out_bias, {E, He});
  b.in.resize(E, in_rows);
  b.out.resize(E, He);
  for (Index e = 0; e < E; ++e) {
    detail::read_expert_biases<T>(m, r, p, e, b.in.data() + e * in_rows, b.out.data() + e * He);
  }
  return b;
}

}  // namespace moe::io
