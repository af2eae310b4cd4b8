// moe/io: gpt-oss's MXFP4 expert tensors. Its checkpoints keep each fused expert projection W
// [E, rows, cols] (nn.Linear orientation [out x in]) as two U8 tensors:
//   W_blocks [E, rows, cols / 32, 16]  two e2m1 codes per byte (the even element in the low nibble)
//   W_scales [E, rows, cols / 32]      one E8M0 exponent byte per block of 32 weights
// with W = experts.gate_up_proj (rows 2 d_ff, gate and up rows interleaved: row 2j is gate row j,
// row 2j + 1 up row j, as transformers' gpt-oss dequantisation makes the even columns of its
// [E, d_model, 2 d_ff] gate) and experts.down_proj (rows d_model, cols d_ff). Per row this is
// exactly kernels::Mxfp4View's stored layout, so expert e's rows are a view of the mapped file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/error.hpp"
#include "moe/experts/quant_matrix.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// The two tensors of an MXFP4-stored projection `name` (name + "_blocks", name + "_scales").
struct Mxfp4Tensor {
  std::string blocks, scales;
  explicit Mxfp4Tensor(const std::string& name)
      : blocks(name + "_blocks"), scales(name + "_scales") {}
};

/// Whether projection `name` is stored as MXFP4 (its `_blocks` tensor is present).
inline bool has_mxfp4(const ModelCheckpoint& m, const std::string& name) {
  return m.tensors().contains(Mxfp4Tensor(name).blocks);
}

/// Checks the MXFP4 tensors of projection `name` of sparse layer `layer` against config.json: E
/// experts of [rows x cols]. Throws io_error naming the tensor when one is missing, not U8, has
/// the wrong shape, or cols is not a multiple of 32; and for a scale byte 0xFF (NaN in E8M0), at
/// its flat index (reads the scales, 1/16 of the bytes; the codes are not read).
inline void check_mxfp4(const ModelCheckpoint& m, Index layer, const std::string& name,
                        std::int64_t E, std::int64_t rows, std::int64_t cols) {
  const Mxfp4Tensor t(name);
  const std::string where = moe::detail::concat("moe: ", m.directory(), ": layer ", layer, ": ");
  if (cols % 32 != 0) {
    throw io_error(moe::detail::concat(where, "MXFP4 tensor '", t.blocks, "' holds rows of ", cols,
                                       " weights, expected a multiple of 32"));
  }
  const std::vector<std::int64_t> blocks{E, rows, cols / 32, 16}, scales{E, rows, cols / 32};
  for (const auto& [tensor, shape] : {std::pair{t.blocks, blocks}, std::pair{t.scales, scales}}) {
    if (!m.tensors().contains(tensor)) {
      throw io_error(moe::detail::concat(where, "missing tensor '", tensor, "' (MXFP4 experts)"));
    }
    const TensorInfo& info = m.tensors().info(tensor);
    if (info.dtype != Dtype::U8 || info.shape != shape) {
      throw io_error(moe::detail::concat(where, "MXFP4 tensor '", tensor, "' has shape ",
                                         shape_str(info.shape), " of ", dtype_name(info.dtype),
                                         ", expected ", shape_str(shape), " of U8"));
    }
  }
  const std::uint8_t* s = m.tensors().file_of(t.scales).data(t.scales);
  const std::size_t n = std::size_t(E * rows * (cols / 32));
  for (std::size_t k = 0; k < n; ++k) {
    if (s[k] == 0xFF) {
      throw io_error(moe::detail::concat(where, "MXFP4 scales '", t.scales,
                                         "' hold 0xFF (NaN in E8M0) at [", k, "]"));
    }
  }
}

/// Rows [first_row, first_row + rows) of MXFP4 projection `name` (checked by check_mxfp4), cols
/// wide, as a view of the mapped bytes (valid while the file is mapped).
inline kernels::Mxfp4View mxfp4_rows(const ModelCheckpoint& m, const std::string& name,
                                     Index first_row, Index rows, Index cols) {
  const Mxfp4Tensor t(name);
  const Index nb = cols / 32;
  kernels::Mxfp4View v;
  v.codes = m.tensors().file_of(t.blocks).data(t.blocks) + std::size_t(first_row * nb * 16);
  v.scales = m.tensors().file_of(t.scales).data(t.scales) + std::size_t(first_row * nb);
  v.rows = rows;
  v.cols = cols;
  return v;
}

/// Every other row of `w` starting at `first` (0: gpt-oss's gate rows, 1: its up rows) as an
/// owning stored-layout matrix: a byte copy (17 bytes per 32 weights), lossless.
inline QuantMatrix<Mxfp4> mxfp4_strided_rows(const kernels::Mxfp4View& w, Index first) {
  struct Bytes {
    std::vector<std::uint8_t> codes, scales;
  };
  auto bytes = std::make_shared<Bytes>();
  const Index rows = w.rows / 2, nb = w.blocks_per_row();
  bytes->codes.resize(std::size_t(rows * nb * 16));
  bytes->scales.resize(std::size_t(rows * nb));
  for (Index o = 0; o < rows; ++o) {
    const Index from = 2 * o + first;
    std::copy_n(w.codes + from * nb * 16, nb * 16, bytes->codes.data() + o * nb * 16);
    std::copy_n(w.scales + from * nb, nb, bytes->scales.data() + o * nb);
  }
  const kernels::Mxfp4View v{bytes->codes.data(), bytes->scales.data(), rows, w.cols};
  return QuantMatrix<Mxfp4>::with_owner(QuantMatrix<Mxfp4>::view(v), bytes);
}

/// Expert e's gate, up and down projections of an MXFP4 layer (checked by check_mxfp4) as fp32
/// [d_ff x d_model], [d_ff x d_model], [d_model x d_ff] into the given maps (T's rounding of the
/// exact fp32 values; a large scale may give inf, which the caller's finiteness check reports).
template <class T>
void read_mxfp4_expert(const ModelCheckpoint& m, const std::string& fused_in,
                       const std::string& fused_out, Index e, Index d_model, Index d_ff,
                       MutMap<T> gate, MutMap<T> up, MutMap<T> down) {
  RowMatrix<float> in(2 * d_ff, d_model), out(d_model, d_ff);
  kernels::dequantize_stored_rows<Mxfp4>(mxfp4_rows(m, fused_in, e * 2 * d_ff, 2 * d_ff, d_model),
                                         0, 2 * d_ff, in.data());
  kernels::dequantize_stored_rows<Mxfp4>(mxfp4_rows(m, fused_out, e * d_model, d_model, d_ff), 0,
                                         d_model, out.data());
  for (Index i = 0; i < d_ff; ++i) {
    gate.row(i) = in.row(2 * i).cast<T>();
    up.row(i) = in.row(2 * i + 1).cast<T>();
  }
  down = out.cast<T>();
}

}  // namespace moe::io
