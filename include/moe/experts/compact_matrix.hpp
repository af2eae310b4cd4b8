// moe: a compact weight matrix (bf16, int8 with per-row scales, fp8 e4m3 with block scales):
// quantisation from fp32, dequantisation, zero-copy views of checkpoint tensors. The formats and
// their decode are in moe/kernels/compact_format.hpp, the products in moe/kernels/gemm_compact.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "moe/error.hpp"
#include "moe/kernels/compact_format.hpp"
#include "moe/tensor.hpp"

namespace moe {
namespace detail {

/// Storage of a CompactMatrix, shared (immutable) between its copies: the codes and scales when
/// owning (empty for a view), and fp8's kernel scales (scale * 2^8) in both cases.
template <class Code>
struct CompactStorage {
  std::vector<Code> codes;
  std::vector<float> scales;
  std::vector<float> kernel_scales;
};

}  // namespace detail

/// A compact weight matrix [rows x cols] in nn.Linear orientation [out x in], row-major codes with
/// row stride cols. Format is Bf16, Int8 or Fp8E4M3.
///
/// Scales: Bf16 none; Int8 scales()[o], one per row; Fp8E4M3 a row-major grid
/// [scale_grid_rows() x scale_grid_cols()] of blocks [block_rows() x block_cols()], the scale of
/// w[o, i] being scales()[(o / block_rows) * scale_grid_cols + i / block_cols].
///
/// Ownership: quantize() returns an owning matrix (storage shared by its copies, immutable);
/// view() is non-owning: the codes and scales (e.g. a memory-mapped checkpoint, see
/// kernels::SafetensorsFile::data) must outlive every copy of it. Immutable, so one matrix serves
/// many threads.
template <class Format>
class CompactMatrix {
 public:
  using code_type = typename Format::code_type;

  CompactMatrix() = default;

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  /// Row-major codes, row stride cols().
  const code_type* codes() const { return codes_; }
  /// Int8: rows() per-row scales; Fp8E4M3: the block grid; Bf16: nullptr.
  const float* scales() const { return scales_; }
  Index block_rows() const { return block_rows_; }
  Index block_cols() const { return block_cols_; }
  Index scale_grid_rows() const {
    return block_rows_ > 0 ? (rows_ + block_rows_ - 1) / block_rows_ : 0;
  }
  Index scale_grid_cols() const {
    return block_cols_ > 0 ? (cols_ + block_cols_ - 1) / block_cols_ : 0;
  }
  Index num_scales() const {
    if constexpr (std::is_same_v<Format, Int8>) return rows_;
    if constexpr (std::is_same_v<Format, Fp8E4M3>) return scale_grid_rows() * scale_grid_cols();
    return 0;
  }
  /// True when this matrix owns its codes and scales (quantize), false for a view.
  bool owning() const { return owning_; }
  /// Fp8E4M3 with simple(): the scale grid times 2^8 (the SIMD decode's exponent rebias folded
  /// in; exact), held by the matrix itself (4 bytes per block, not counted in bytes()); else
  /// nullptr.
  const float* kernel_scales() const { return kernel_scales_; }
  /// Fp8E4M3: column c is in scale block c >> block_cols_shift() (block_cols is a power of two,
  /// or the whole width: then a shift that gives 0).
  int block_cols_shift() const { return block_cols_shift_; }
  /// Fp8E4M3 only: no NaN code and every |scale| below 2^100, so the SIMD kernel may fold its
  /// exponent rebias (2^8) into the scale (see kernels/gemm_compact.hpp). Always true for other
  /// formats.
  bool simple() const { return simple_; }
  /// Bytes of codes and scales.
  std::size_t bytes() const {
    return std::size_t(rows_ * cols_) * sizeof(code_type) +
           std::size_t(num_scales()) * sizeof(float);
  }

  /// Scale of weight (o, i) (1 for Bf16).
  float scale(Index o, Index i) const {
    if constexpr (std::is_same_v<Format, Int8>) {
      (void)i;
      return scales_[o];
    } else if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      return scales_[(o / block_rows_) * scale_grid_cols() + i / block_cols_];
    } else {
      (void)o, (void)i;
      return 1.0f;
    }
  }

  /// Weight (o, i) as fp32: decode (exact) times its scale (one rounding). What the kernels use.
  float operator()(Index o, Index i) const { return decode(codes_[o * cols_ + i], scale(o, i)); }

  /// The fp32 value of `code` with scale `s`, exactly as every kernel computes it: bf16 exact;
  /// int8 float(q) * s; fp8 e4m3_to_float(code) * s (Format::decode).
  static float decode(code_type code, float s) { return Format::decode(code, s); }

  /// The plain view the kernels read (moe/kernels/compact_format.hpp), valid while this matrix
  /// (or, for a view, the viewed arrays) lives.
  kernels::CompactView<Format> kernel_view() const {
    kernels::CompactView<Format> v;
    v.codes = codes_;
    v.scales = scales_;
    v.kernel_scales = kernel_scales_;
    v.rows = rows_;
    v.cols = cols_;
    v.block_rows = block_rows_;
    v.block_cols = block_cols_;
    v.block_cols_shift = block_cols_shift_;
    v.simple = simple_;
    return v;
  }

  /// out [row_end - row_begin x cols] row-major (row stride cols) = the fp32 weights of rows
  /// [row_begin, row_end). Cost: one pass over the rows' codes (auto-vectorised for bf16 and
  /// int8, a 1 KiB table lookup for fp8). No allocation.
  void dequantize_rows(Index row_begin, Index row_end, float* out) const {
    kernels::dequantize_rows(kernel_view(), row_begin, row_end, out);
  }

  /// The whole matrix in fp32 (allocates; for tests and tools).
  RowMatrix<float> dequantize() const {
    RowMatrix<float> m(rows_, cols_);
    dequantize_rows(0, rows_, m.data());
    return m;
  }

  /// Quantises fp32 weights [rows x cols].
  ///  Bf16: round to nearest even, NaN stays NaN, overflow to +-inf as IEEE.
  ///  Int8: scale = max|row| / 127 over the row, q = round-half-even(w / scale) saturated to
  ///        +-127 (+-inf saturate); throws value_error on NaN (int8 has no NaN).
  ///  Fp8E4M3: one scale per block [block_rows x block_cols] (default 128 x 128; pass
  ///        block_rows = rows and block_cols = cols for per-tensor; block_cols a power of two
  ///        >= 16 or >= cols), scale = max|finite block| /
  ///        448, code = e4m3(w / scale) round to nearest even, saturating at +-448 (inf too); NaN
  ///        gives the NaN code. An all-zero block has scale 0.
  /// Cost: one pass, a few ns per weight (exact double-based rounding of
  /// kernels/float_formats.hpp).
  static CompactMatrix quantize(const MatrixRef<float>& w, Index block_rows = fp8_block,
                                Index block_cols = fp8_block) {
    CompactMatrix m;
    auto st = std::make_shared<detail::CompactStorage<code_type>>();
    const Index rows = w.rows(), cols = w.cols();
    st->codes.resize(std::size_t(rows * cols));
    if constexpr (std::is_same_v<Format, Bf16>) {
      (void)block_rows, (void)block_cols;
      for (Index o = 0; o < rows; ++o) {
        for (Index i = 0; i < cols; ++i)
          st->codes[std::size_t(o * cols + i)] = kernels::float_to_bf16(w(o, i));
      }
    } else if constexpr (std::is_same_v<Format, Int8>) {
      (void)block_rows, (void)block_cols;
      st->scales.resize(std::size_t(rows));
      for (Index o = 0; o < rows; ++o) {
        float amax = 0.0f;
        for (Index i = 0; i < cols; ++i) {
          const float v = w(o, i);
          if (std::isnan(v)) {
            throw value_error(
                detail::concat("moe: cannot quantise NaN to int8 (row ", o, ", column ", i, ")"));
          }
          if (std::isfinite(v)) amax = std::max(amax, std::abs(v));
        }
        const float s = amax / 127.0f;
        st->scales[std::size_t(o)] = s;
        for (Index i = 0; i < cols; ++i) {
          st->codes[std::size_t(o * cols + i)] = int8_code(w(o, i), s);
        }
      }
    } else {
      check_blocks(block_rows, block_cols, rows, cols);
      m.block_rows_ = block_rows;
      m.block_cols_ = block_cols;
      const Index gr = (rows + block_rows - 1) / block_rows,
                  gc = (cols + block_cols - 1) / block_cols;
      st->scales.resize(std::size_t(gr * gc));
      for (Index br = 0; br < gr; ++br) {
        for (Index bc = 0; bc < gc; ++bc) {
          const Index o0 = br * block_rows, o1 = std::min(rows, o0 + block_rows);
          const Index i0 = bc * block_cols, i1 = std::min(cols, i0 + block_cols);
          float amax = 0.0f;
          for (Index o = o0; o < o1; ++o) {
            for (Index i = i0; i < i1; ++i) {
              if (std::isfinite(w(o, i))) amax = std::max(amax, std::abs(w(o, i)));
            }
          }
          const float s = amax / 448.0f;
          st->scales[std::size_t(br * gc + bc)] = s;
          for (Index o = o0; o < o1; ++o) {
            for (Index i = i0; i < i1; ++i)
              st->codes[std::size_t(o * cols + i)] = fp8_code(w(o, i), s);
          }
        }
      }
    }
    m.adopt(std::move(st), rows, cols);
    return m;
  }

  /// Fp8E4M3 with one given per-tensor scale: code = e4m3(w / scale), saturating at +-448 (so
  /// |w| > 448 * scale gives +-448). Throws value_error unless scale > 0 and finite.
  static CompactMatrix quantize_per_tensor(const MatrixRef<float>& w, float scale) {
    static_assert(std::is_same_v<Format, Fp8E4M3>, "moe: quantize_per_tensor is for Fp8E4M3");
    if (!(scale > 0.0f) || !std::isfinite(scale)) {
      throw value_error(
          detail::concat("moe: fp8 per-tensor scale must be > 0 and finite, got ", scale));
    }
    const Index rows = w.rows(), cols = w.cols();
    auto st = std::make_shared<detail::CompactStorage<code_type>>();
    st->codes.resize(std::size_t(rows * cols));
    st->scales.assign(1, scale);
    for (Index o = 0; o < rows; ++o) {
      for (Index i = 0; i < cols; ++i)
        st->codes[std::size_t(o * cols + i)] = fp8_code(w(o, i), scale);
    }
    CompactMatrix m;
    m.block_rows_ = std::max<Index>(rows, 1);
    m.block_cols_ = std::max<Index>(cols, 1);
    m.adopt(std::move(st), rows, cols);
    return m;
  }

  /// Zero-copy view of codes (row-major [rows x cols], row stride cols) and scales stored
  /// elsewhere, e.g. a checkpoint's BF16 tensor, or an F8_E4M3 weight with its F32
  /// weight_scale_inv [ceil(rows / 128) x ceil(cols / 128)] (block 128 x 128; pass block_rows =
  /// rows, block_cols = cols and one scale for per-tensor). Both arrays must outlive the view
  /// and every copy of it. Int8: scales has rows entries. Fp8: block_cols must be a power of two
  /// >= 16 or >= cols (16-lane chunks never straddle a block; the kernel finds a chunk's block
  /// by a shift). Fp8 scans the codes once for NaN (see simple()) and keeps a small copy of the
  /// scales (kernel_scales()). Throws config_error on bad sizes.
  static CompactMatrix view(const code_type* codes, Index rows, Index cols,
                            const float* scales = nullptr, Index block_rows = fp8_block,
                            Index block_cols = fp8_block) {
    if (rows < 0 || cols < 0) {
      throw config_error(
          detail::concat("moe: compact matrix sizes must be >= 0, got [", rows, " x ", cols, "]"));
    }
    CompactMatrix m;
    m.rows_ = rows;
    m.cols_ = cols;
    m.codes_ = codes;
    m.scales_ = scales;
    if constexpr (!std::is_same_v<Format, Bf16>) {
      if (scales == nullptr && rows * cols > 0) {
        throw config_error(detail::concat("moe: ", Format::name, " weights need scales"));
      }
    }
    if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      check_blocks(block_rows, block_cols, rows, cols);
      m.block_rows_ = block_rows;
      m.block_cols_ = block_cols;
      m.finish(std::make_shared<detail::CompactStorage<code_type>>());
    }
    return m;
  }

  /// `m` (a view) sharing ownership of `owner`, whatever holds the viewed codes and scales (a
  /// memory-mapped checkpoint file, io::Checkpoint::share_file): the owner lives as long as any
  /// copy of the returned matrix, so the view can never dangle.
  static CompactMatrix with_owner(CompactMatrix m, const std::shared_ptr<const void>& owner) {
    m.owner_ = owner;
    return m;
  }

 private:
  static void check_blocks(Index block_rows, Index block_cols, Index rows, Index cols) {
    const bool pow2 = block_cols >= 16 && (block_cols & (block_cols - 1)) == 0;
    if (block_rows < 1 || block_cols < 1 || (!pow2 && block_cols < cols)) {
      throw config_error(detail::concat("moe: fp8 scale block [", block_rows, " x ", block_cols,
                                        "] is invalid for a [", rows, " x ", cols,
                                        "] matrix: sides must be >= 1 and block_cols a power of "
                                        "two >= 16 or >= cols"));
    }
  }

  static std::int8_t int8_code(float v, float s) {
    if (s == 0.0f) return 0;
    const double q = std::nearbyint(double(v) / double(s));
    return std::int8_t(std::clamp(q, -127.0, 127.0));  // +-inf saturate too
  }

  static std::uint8_t fp8_code(float v, float s) {
    if (std::isnan(v)) return kernels::float_to_e4m3(v);
    if (s == 0.0f) return std::isinf(v) ? kernels::double_to_e4m3(double(v), true) : 0;
    return kernels::double_to_e4m3(double(v) / double(s), /*saturate=*/true);
  }

  bool compute_simple() const {
    if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      for (Index k = 0; k < num_scales(); ++k) {
        if (!(std::abs(scales_[k]) < 0x1p100f)) return false;
      }
      const std::size_t count = std::size_t(rows_ * cols_);
      for (std::size_t k = 0; k < count; ++k) {
        if ((codes_[k] & 0x7f) == 0x7f) return false;
      }
    }
    return true;
  }

  void adopt(std::shared_ptr<detail::CompactStorage<code_type>> st, Index rows, Index cols) {
    rows_ = rows;
    cols_ = cols;
    codes_ = st->codes.data();
    scales_ = st->scales.empty() ? nullptr : st->scales.data();
    owning_ = true;
    finish(std::move(st));
  }

  // simple_, the fp8 block shift and kernel scales (st: the storage to keep them in).
  void finish(std::shared_ptr<detail::CompactStorage<code_type>> st) {
    simple_ = compute_simple();
    if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      int shift = 62;  // one block across: every column index >> 62 is 0
      if (block_cols_ < cols_) {
        shift = 0;
        while ((Index(1) << shift) < block_cols_) ++shift;
      }
      block_cols_shift_ = shift;
      if (simple_) {
        st->kernel_scales.resize(std::size_t(num_scales()));
        for (Index k = 0; k < num_scales(); ++k)
          st->kernel_scales[std::size_t(k)] = scales_[k] * 0x1p8f;
        kernel_scales_ = st->kernel_scales.data();
      }
    }
    storage_ = std::move(st);
  }

  Index rows_ = 0, cols_ = 0;
  const code_type* codes_ = nullptr;
  const float* scales_ = nullptr;
  Index block_rows_ = 0, block_cols_ = 0;
  int block_cols_shift_ = 0;
  const float* kernel_scales_ = nullptr;
  bool simple_ = true, owning_ = false;
  std::shared_ptr<const detail::CompactStorage<code_type>> storage_;
  std::shared_ptr<const void> owner_;  ///< keeps a view's codes and scales alive (with_owner)
};

}  // namespace moe
