// moe: the weight operands (experts/operand.hpp) of the fast decode paths: block-quantised
// weights (Q8, Q4, Mxfp4) with int8 activations, and bf16 weights with bf16 activations, plus
// the exact mode of the quantised formats (fp32 activations, weights decoded in registers).
//
// The fast operands read their input rows converted once per job, not once per product: such an
// operand "prepares its input" (prepares_input = true). The FFN tasks (ffn_tasks.hpp) call
// prepare_rows on the job's x before the input phase (gate and up share it) and prepare_cols on
// each block of activation columns right after computing it, for the output phase: every
// column block of a product then reads the converted rows. Column blocks of the input phase are
// multiples of `granule` (32: one quantisation block). Prefill (more than small_batch_rows rows)
// decodes weight tiles to fp32 and multiplies with Eigen's GEMM, as the other compact formats do.
#pragma once

#include <algorithm>
#include <cstdint>

#include "moe/error.hpp"
#include "moe/kernels/compact_format.hpp"
#include "moe/kernels/gemm_compact.hpp"
#include "moe/kernels/gemm_quant_prefill.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/kernels/gemv_bf16.hpp"
#include "moe/kernels/gemv_quant.hpp"
#include "moe/kernels/gemv_quant_exact.hpp"
#include "moe/kernels/quant_activations.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Block-quantised weights (Format = Q8, Q4 or Mxfp4) for float blocks. Fast mode (panels): the
/// int8 products of kernels/gemv_quant.hpp on `input`, this job's rows quantised by
/// prepare_rows / prepare_cols. Exact mode (stored layout): kernels::gemv_quant_nt_exact on fp32
/// x, bitwise the fp32 product on the dequantised weights.
template <class Format>
struct QuantOperand {
  static constexpr bool prepares_input = true;
  static constexpr Index granule = kernels::quant_block;

  kernels::QuantPanels<Format> panels{};  ///< fast mode
  kernels::QuantView<Format> stored{};    ///< exact mode
  bool exact = false;
  Index cols = 0;
  /// Fast mode: this job's input rows as int8 (buffers owned by the caller's workspace).
  kernels::ActivationsI8 input{};

  /// Bytes per weight for task sizing, rounded up (0.53 to 1.06 stored).
  Index weight_bytes() const { return 1; }
  bool streams(Index n) const { return n <= kernels::small_batch_rows; }
  Index scratch_floats(Index n) const {
    return streams(n) ? 0 : kernels::gemm_quant_scratch_floats(cols);
  }
  /// Whether this operand's products read `input` for n rows (fast mode, streaming).
  bool reads_input(Index n) const { return !exact && streams(n); }
  /// Bytes of converted input per row of `in` columns, and binding of a region of n rows.
  static Index input_bytes_per_row(Index in) { return Index(kernels::activations_i8_bytes(1, in)); }
  void bind_input(unsigned char* region, Index n, Index in) {
    input = kernels::make_activations_i8(region, n, in);
  }
  /// input = x's n rows [n x cols] (row stride ldx) quantised; no-op when not reads_input(n).
  void prepare_rows(const float* x, Index n, Index ldx) const {
    if (!reads_input(n)) return;
    kernels::ActivationsI8 a = input;
    kernels::quantize_activations_i8(x, ldx, kernels::quant_offset<Format>, a);
  }
  /// The blocks of input in columns [a, b) (multiples of granule) from x [n x cols].
  void prepare_cols(const float* x, Index n, Index ldx, Index a, Index b) const {
    if (!reads_input(n)) return;
    kernels::quantize_activations_i8_cols(x, ldx, kernels::quant_offset<Format>, input, a, b);
  }
  void product(const float* x, Index n, Index ldx, Index c0, Index c1, float* out, Index ldo,
               float* scratch, Index scratch_size) const {
    if (c1 <= c0 || n == 0) return;
    if (!streams(n)) {
      if (exact) {
        kernels::gemm_quant_nt_prefill(x, n, ldx, stored, c0, c1, out, ldo, scratch,
                                       scratch_size);
      } else {
        kernels::gemm_quant_nt_prefill(x, n, ldx, panels, c0, c1, out, ldo, scratch,
                                       scratch_size);
      }
    } else if (exact) {
      kernels::gemv_quant_nt_exact<Format>(x, n, ldx, stored, c0, c1, out, ldo);
    } else {
      MOE_ASSERT(input.rows == n);
      kernels::gemv_quant_nt<Format>(input, panels, c0, c1, out, ldo);
    }
  }
};

/// Bf16 weights with bf16 activations (the fast mode of CompactExperts<Bf16>): streaming
/// products on kernels::gemv_bf16_nt over `input`, this job's rows rounded to bf16 once; prefill
/// as CompactOperand<Bf16>.
struct Bf16FastOperand {
  static constexpr bool prepares_input = true;
  static constexpr Index granule = 16;

  kernels::CompactView<Bf16> w{};
  /// This job's input rows as bf16, row stride ld_input (kernels::bf16_padded_cols(cols)).
  std::uint16_t* input = nullptr;
  Index ld_input = 0;

  Index weight_bytes() const { return 2; }
  bool streams(Index n) const { return n <= kernels::small_batch_rows; }
  Index scratch_floats(Index n) const {
    return streams(n) ? 0 : kernels::gemm_compact_scratch_floats(w.cols);
  }
  bool reads_input(Index n) const { return streams(n); }
  static Index input_bytes_per_row(Index in) { return 2 * kernels::bf16_padded_cols(in); }
  void bind_input(unsigned char* region, Index n, Index in) {
    (void)n;
    input = reinterpret_cast<std::uint16_t*>(region);
    ld_input = kernels::bf16_padded_cols(in);
  }
  void prepare_rows(const float* x, Index n, Index ldx) const {
    if (!reads_input(n)) return;
    kernels::activations_to_bf16(x, n, w.cols, ldx, input, ld_input);
  }
  void prepare_cols(const float* x, Index n, Index ldx, Index a, Index b) const {
    if (!reads_input(n)) return;
    for (Index r = 0; r < n; ++r) {
      for (Index i = a; i < b; ++i) {
        input[r * ld_input + i] = kernels::float_to_bf16_rne(x[r * ldx + i]);
      }
      if (b == w.cols) {
        for (Index i = b; i < ld_input; ++i) input[r * ld_input + i] = 0;
      }
    }
  }
  void product(const float* x, Index n, Index ldx, Index c0, Index c1, float* out, Index ldo,
               float* scratch, Index scratch_size) const {
    if (c1 <= c0 || n == 0) return;
    if (streams(n)) {
      kernels::gemv_bf16_nt(input, n, ld_input, w.codes, w.cols, w.cols, c0, c1, out, ldo);
    } else {
      kernels::gemm_compact_nt_prefill(x, n, ldx, w, c0, c1, out, ldo, scratch, scratch_size);
    }
  }
};

}  // namespace moe
