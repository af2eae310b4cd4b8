// moe: weight operands: one projection of one expert as the FFN tasks see it. Each operand type
// knows its bytes per weight, whether n rows stream its weights, and how to compute one column
// block of out = x * W^T. A new weight format is a new operand type (plus its kernels and its
// stack); the task scheduler (ffn_tasks.hpp) and the block are generic over it.
//
// The operand interface (every type below provides exactly this):
//   Index weight_bytes() const;          // bytes of one stored weight (for task sizing)
//   bool streams(Index n) const;         // n rows run on the streaming kernel (no scratch)
//   Index scratch_floats(Index n) const; // per-worker scratch a product of n rows needs (0: none)
//   void product(const float-or-T* x, Index n, Index ldx, Index c0, Index c1, T* out, Index ldo,
//                T* scratch, Index scratch_floats) const;
//     out[:, c0:c1] = x * W[c0:c1, :]^T, x [n x k] (row stride ldx), out row stride ldo; scratch:
//     this worker's scratch (at least scratch_floats(n) floats), unused when streams(n).
#pragma once

#include <algorithm>

#include <Eigen/Core>

#include "moe/kernels/compact_format.hpp"
#include "moe/kernels/gemm_compact.hpp"
#include "moe/kernels/gemm_small.hpp"
#include "moe/tensor.hpp"

namespace moe {

/// Above kernels::small_batch_rows the streaming kernel still beats Eigen's GEMM (which packs the
/// weights on every call) while the rows of x it reuses for every weight row stay in the L2
/// cache: measured on Zen 5 (1 MiB L2), fp32, [n x 1024] * [1024 x 7168]: 153 against 106 GFLOP/s
/// at n = 128; [n x 3584] * [3584 x 1024]: equal at n = 64 (917 KiB of x), Eigen ahead beyond.
inline constexpr Index stream_x_bytes = Index(768) << 10;

/// Whether a product of n rows of length k on T weights runs on the streaming kernel (else on
/// Eigen's GEMM).
template <class T>
constexpr bool use_stream(Index n, Index k) {
  return n <= kernels::small_batch_rows || n * k * Index(sizeof(T)) <= stream_x_bytes;
}

/// Weights stored in the block's scalar T: rows of `cols` values, row-major, row stride cols
/// (a projection [rows x cols], or the rows of a fused gate_up projection from its first row).
template <class T>
struct DenseOperand {
  const T* w = nullptr;
  Index cols = 0;

  Index weight_bytes() const { return Index(sizeof(T)); }
  bool streams(Index n) const { return use_stream<T>(n, cols); }
  Index scratch_floats(Index n) const {
    (void)n;
    return 0;
  }
  /// Streaming: kernels::gemm_small_nt; else Eigen's GEMM (may allocate its packing buffers).
  void product(const T* x, Index n, Index ldx, Index c0, Index c1, T* out, Index ldo, T* scratch,
               Index scratch_size) const {
    (void)scratch, (void)scratch_size;
    if (c1 <= c0) return;
    const Index k = cols;
    if (streams(n)) {
      kernels::gemm_small_nt(x, n, ldx, w, k, k, c0, c1, out, ldo);
      return;
    }
    using Strided = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
    using MutStrided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
    const Strided xm(x, n, k, Eigen::OuterStride<>(ldx));
    const ConstMap<T> wm(w + c0 * k, c1 - c0, k);
    MutStrided om(out + c0, n, c1 - c0, Eigen::OuterStride<>(ldo));
    om.noalias() = xm * wm.transpose();
  }
};

/// Compact weights (Bf16, Int8, Fp8E4M3) for float blocks. Up to kernels::small_batch_rows rows
/// stream the codes through kernels::gemm_compact_nt (decoding in registers); above, each column
/// block is decoded into the worker's scratch, up to 256 weight rows at a time, and multiplied by
/// Eigen's GEMM (kernels::gemm_compact_nt_prefill). Column blocks start on multiples of 16, hence
/// of kernels::gemm_compact_out_tile.
template <class Format>
struct CompactOperand {
  kernels::CompactView<Format> w;

  Index weight_bytes() const { return Index(sizeof(typename Format::code_type)); }
  bool streams(Index n) const { return n <= kernels::small_batch_rows; }
  /// One decoded tile of 256 rows (kernels::gemm_compact_scratch_floats) when n rows do not stream.
  Index scratch_floats(Index n) const {
    return streams(n) ? 0 : kernels::gemm_compact_scratch_floats(w.cols);
  }
  void product(const float* x, Index n, Index ldx, Index c0, Index c1, float* out, Index ldo,
               float* scratch, Index scratch_size) const {
    if (c1 <= c0 || n == 0) return;
    if (streams(n)) {
      kernels::gemm_compact_nt(x, n, ldx, w, c0, c1, out, ldo);
    } else {
      kernels::gemm_compact_nt_prefill(x, n, ldx, w, c0, c1, out, ldo, scratch, scratch_size);
    }
  }
};

/// The three projections of one expert: gate (or, plain, the only input projection) and up
/// [d_ff x d_model] (up unused when plain), down [d_model x d_ff].
template <class Operand>
struct ExpertOperands {
  Operand gate, up, down;
};

}  // namespace moe
