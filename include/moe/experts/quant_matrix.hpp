// moe: one block-quantised weight matrix (Q8, Q4, Mxfp4; kernels/quant_formats.hpp) as a block
// stores it: in the panel layout the fast kernels read (kernels/quant_panels.hpp), or in the
// stored layout (ggml Q8_0 / Q4_0 blocks, gpt-oss MXFP4 blocks + scales) that the exact kernels
// read and that checkpoints hold, so those can be viewed without a copy.
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/gemm_quant_prefill.hpp"
#include "moe/kernels/quant_formats.hpp"
#include "moe/kernels/quant_panels.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Which layout a QuantMatrix holds: panels (the fast products) or the stored layout (the exact
/// products; zero-copy views of checkpoint tensors).
enum class QuantLayout { panels, stored };

/// A block-quantised matrix [rows x cols] in nn.Linear orientation [out x in], cols a multiple of
/// 32. Owning (quantize, repack) with storage shared by its copies, or a non-owning view of
/// stored-layout bytes (view: they must outlive every copy). Immutable; one matrix serves many
/// threads.
template <class Format>
class QuantMatrix {
 public:
  using Panels = kernels::QuantPanels<Format>;
  using Stored = kernels::QuantView<Format>;

  QuantMatrix() = default;

  /// Quantises fp32 weights (round to nearest; scales as kernels::quantize_*_row document) into
  /// `layout`. Throws shape_error unless cols is a positive multiple of 32, value_error on a
  /// non-finite weight or (Q8, Q4) a scale beyond fp16.
  static QuantMatrix quantize(const MatrixRef<float>& w, QuantLayout layout) {
    kernels::check_quant_cols(Format::name, "weight", w.cols());
    auto st = std::make_shared<Storage>();
    const Index rows = w.rows(), cols = w.cols(), nb = cols / 32;
    if constexpr (std::is_same_v<Format, Mxfp4>) {
      st->codes.resize(std::size_t(rows * nb * 16));
      st->scales8.resize(std::size_t(rows * nb));
    } else {
      st->blocks.resize(std::size_t(rows * nb));
    }
    for (Index o = 0; o < rows; ++o) {
      const float* row = w.data() + o * w.outerStride();
      if constexpr (std::is_same_v<Format, Q8>) {
        kernels::quantize_q8_row(row, cols, &st->blocks[std::size_t(o * nb)], o);
      } else if constexpr (std::is_same_v<Format, Q4>) {
        kernels::quantize_q4_row(row, cols, &st->blocks[std::size_t(o * nb)], o);
      } else {
        kernels::quantize_mxfp4_row(row, cols, &st->codes[std::size_t(o * nb * 16)],
                                    &st->scales8[std::size_t(o * nb)], o);
      }
    }
    QuantMatrix m(rows, cols, std::move(st));
    return layout == QuantLayout::panels ? repack(m.stored()) : m;
  }

  /// A view of stored-layout bytes (zero copy). Throws shape_error on cols, value_error on an
  /// Mxfp4 scale 0xFF (NaN).
  static QuantMatrix view(const Stored& w) {
    check_stored(w);
    QuantMatrix m;
    m.rows_ = w.rows;
    m.cols_ = w.cols;
    m.layout_ = QuantLayout::stored;
    m.stored_ = w;
    return m;
  }

  /// An owning Mxfp4 matrix in the stored layout from its split codes (rows * cols / 2 bytes) and
  /// E8M0 scales (rows * cols / 32 bytes), moved in: bytes repacked elsewhere (ggml MXFP4 blocks,
  /// io/gguf_moe.hpp) without a pass through fp32. Throws like view(), and shape_error when the
  /// byte counts do not match rows x cols.
  template <class F = Format, class = std::enable_if_t<std::is_same_v<F, Mxfp4>>>
  // NOLINTNEXTLINE(performance-unnecessary-value-param): both are moved into the storage below
  static QuantMatrix own_stored(std::vector<std::uint8_t> codes, std::vector<std::uint8_t> scales,
                                Index rows, Index cols) {
    kernels::check_quant_cols(Format::name, "weight", cols);
    const std::size_t blocks = std::size_t(rows) * std::size_t(cols / 32);
    if (rows < 0 || codes.size() != blocks * 16 || scales.size() != blocks) {
      throw shape_error(moe::detail::concat(
          "moe: mxfp4 weight [", rows, " x ", cols, "] needs ", blocks * 16, " code bytes and ",
          blocks, " scales, given ", codes.size(), " and ", scales.size()));
    }
    auto st = std::make_shared<Storage>();
    st->codes = std::move(codes);
    st->scales8 = std::move(scales);
    QuantMatrix m(rows, cols, std::move(st));
    check_stored(m.stored_);
    return m;
  }

  /// Owning panels repacked from stored-layout bytes (lossless; the source may go after this).
  /// Throws like view().
  static QuantMatrix repack(const Stored& w) {
    check_stored(w);
    auto st = std::make_shared<Storage>();
    st->codes.resize(kernels::panel_code_bytes<Format>(w.rows, w.cols));
    st->panel_scales.resize(kernels::panel_scale_count(w.rows, w.cols));
    kernels::pack_panels<Format>(w, 0, w.rows, st->codes.data(), st->panel_scales.data());
    QuantMatrix m;
    m.rows_ = w.rows;
    m.cols_ = w.cols;
    m.layout_ = QuantLayout::panels;
    m.panels_ = Panels{st->codes.data(), st->panel_scales.data(), w.rows, w.cols};
    m.storage_ = std::move(st);
    return m;
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  QuantLayout layout() const { return layout_; }
  bool empty() const { return rows_ == 0 && cols_ == 0; }
  /// The first code byte (nullptr for an empty matrix): whether weights are set.
  const void* codes() const {
    return layout_ == QuantLayout::panels ? static_cast<const void*>(panels_.codes)
                                          : stored_codes();
  }
  /// Bytes of codes and scales (the same in both layouts).
  std::size_t bytes() const { return layout_ == QuantLayout::panels ? panels_.bytes() : stored_.bytes(); }
  /// The kernel views; each valid only in its layout (MOE_ASSERT).
  const Panels& panels() const {
    MOE_ASSERT(layout_ == QuantLayout::panels);
    return panels_;
  }
  const Stored& stored() const {
    MOE_ASSERT(layout_ == QuantLayout::stored);
    return stored_;
  }

  /// `m` holding `owner` alive as long as m or a copy lives: a view of bytes that `owner` keeps
  /// (a mapped checkpoint file, a buffer of stored-layout bytes).
  static QuantMatrix with_owner(QuantMatrix m, const std::shared_ptr<const void>& owner) {
    m.owner_ = owner;
    return m;
  }

  /// Whether the matrix owns its bytes (quantize, repack) rather than viewing them.
  bool owning() const { return storage_ != nullptr; }

  /// The dequantised matrix (exact in fp32). Allocates.
  RowMatrix<float> dequantize() const {
    RowMatrix<float> out(rows_, cols_);
    if (rows_ == 0) return out;
    if (layout_ == QuantLayout::panels) {
      kernels::dequantize_panel_rows(panels_, 0, rows_, out.data());
    } else {
      kernels::dequantize_stored_rows<Format>(stored_, 0, rows_, out.data());
    }
    return out;
  }

 private:
  struct Storage {
    std::vector<std::conditional_t<std::is_same_v<Format, Q8>, kernels::BlockQ8, kernels::BlockQ4>>
        blocks;                               // Q8 / Q4 stored layout
    std::vector<std::uint8_t> codes;          // Mxfp4 stored codes, or panel codes
    std::vector<std::uint8_t> scales8;        // Mxfp4 stored scales
    std::vector<kernels::panel_scale_t<Format>> panel_scales;
  };

  QuantMatrix(Index rows, Index cols, std::shared_ptr<const Storage> st)
      : rows_(rows), cols_(cols), layout_(QuantLayout::stored), storage_(std::move(st)) {
    if constexpr (std::is_same_v<Format, Mxfp4>) {
      stored_ = Stored{storage_->codes.data(), storage_->scales8.data(), rows, cols};
    } else {
      stored_ = Stored{storage_->blocks.data(), rows, cols};
    }
  }

  const void* stored_codes() const {
    if constexpr (std::is_same_v<Format, Mxfp4>) {
      return stored_.codes;
    } else {
      return stored_.blocks;
    }
  }

  static void check_stored(const Stored& w) {
    kernels::check_quant_cols(Format::name, "weight", w.cols);
    if constexpr (std::is_same_v<Format, Mxfp4>) kernels::check_mxfp4_scales(w, "weight");
  }

  Index rows_ = 0, cols_ = 0;
  QuantLayout layout_ = QuantLayout::panels;
  Panels panels_{};
  Stored stored_{};
  std::shared_ptr<const Storage> storage_;
  std::shared_ptr<const void> owner_;  ///< keeps a view's bytes alive (with_owner)
};

}  // namespace moe
