// moe: the packed GEMM of prefill, out[n x c] = x[n x k] * W[c x k]^T, near the FMA peak.
//
// Eigen's and BLAS's GEMM pack W on every call; an expert's weights never change, so here W is
// packed once (at block construction) into panels of the micro-kernel's width, and only x is packed
// per call, into caller-owned scratch. The loop nest is the GotoBLAS / BLIS one (Goto and van de
// Geijn 2008; Van Zee and van de Geijn 2015) with the roles of the operands chosen for our layouts:
// the vector lanes run along W's rows (the output columns, contiguous in the row-major out) and the
// rows of x are broadcast.
//
// Determinism: every output element is one fused multiply-add chain over i = 0, 1, ..., k-1
// starting from zero, whatever tile, block, task or thread computes it (partial sums between k
// blocks are stored and reloaded exactly). So a row's result depends neither on the number of
// threads nor on how the column range is split into tasks, nor on n.
#pragma once

#include <algorithm>
#include <numeric>
#include <type_traits>

#include <Eigen/Core>

#include "moe/error.hpp"
#include "moe/tensor.hpp"

namespace moe::kernels {

/// Register and cache blocking of gemm_packed_nt for scalar T on the compiled ISA.
///
/// Register tile: `mr` rows of x times `nr` columns of out (= nr rows of W). With 32 vector
/// registers (AVX-512) that is 8 x 3 packets (24 accumulators, 3 loaded W packets, 1 broadcast):
/// 24 independent FMA chains cover 2 pipes x 4 cycles of latency three times over, and a step of
/// k issues 11 loads for 24 FMAs (the loads never bound the FMAs). Measured on one core of the
/// Xeon (family 6 model 207) the repository's machines have: the tile alone, from L1, runs at
/// 173 GFLOP/s, the core's FMA peak measured with register-only FMAs (174); 6 x 4 and 12 x 2
/// tiles ran at the same rate. With 16 registers (AVX2, NEON): 6 x 2 packets. The scalar fallback
/// uses the same shape.
template <class T>
struct GemmPackedShape {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index lanes = Eigen::internal::packet_traits<T>::size;
  static constexpr bool wide = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
  /// Rows of x per register tile.
  static constexpr Index mr = wide ? 8 : 6;
  /// Columns of out per register tile: the width of one packed weight panel.
  static constexpr Index nr = (wide ? 3 : 2) * lanes;
  /// Gated weights interleave gate and up rows in groups of this many (see pack_gated_nt).
  static constexpr Index pair_group = 16;
  /// Column ranges passed to gemm_packed_nt start on multiples of this (whole panels)...
  static constexpr Index granule = nr;
  /// ... and, for gated weights (pack_gated_nt), on multiples of this (whole gate/up pairs too).
  static constexpr Index gated_granule = std::lcm(nr, 2 * pair_group);
  /// Length of a k block. The W panel run of a block (kc x nr, 24 KiB) stays in L1 while every
  /// x micro-panel of the row block (mr x kc, 4 KiB) streams past it from L2. Measured (Xeon, 48
  /// KiB L1, fp32, [512 x 1024] x [1024 x 7168]): 137 GFLOP/s at kc = 128 against 127 at 256,
  /// whose 48 KiB run no longer fits beside the x panel.
  static constexpr Index kc = 128;
  /// Rows of x packed and multiplied per block: W is read from L3 once per mc rows. 256 rows
  /// measured 2-5% faster than 128 and 25% faster than 64 on the expert shapes.
  static constexpr Index mc = 32 * mr;
  /// Columns of a block (kc x nc of packed W, L2); the accumulator block is mc x nc.
  static constexpr Index nc = gated_granule * std::max<Index>(1, 384 / gated_granule);
};

/// Read-only view of weights in the packed layout.
///
/// Layout: `cols` packed columns (rows of W) of length k, in panels of nr = GemmPackedShape<T>::nr
/// columns; panel p holds columns [p nr, p nr + nr) as k rows of nr contiguous values:
///   W'(j, i) = data[(j / nr) * k * nr + i * nr + j % nr],
/// columns past `cols` up to the next multiple of nr are zero. A panel's k-block starting at i0 is
/// the contiguous run data + p k nr + i0 nr. Size: gemm_packed_size<T>(cols, k).
template <class T>
struct PackedPanels {
  const T* data = nullptr;
  /// Packed columns (the product's output columns, gate/up interleaving included).
  Index cols = 0;
  /// Length of a column: the inner dimension of the product.
  Index k = 0;
};

/// Elements of the packed layout of `cols` columns of length k (padded to whole panels).
template <class T>
constexpr Index gemm_packed_size(Index cols, Index k) {
  constexpr Index nr = GemmPackedShape<T>::nr;
  return (cols + nr - 1) / nr * nr * k;
}

/// Packed columns of a gated (gate + up) weight pair of d_ff rows: each group of 16 activation
/// columns becomes 16 gate columns then 16 up columns (the last group padded with zeros).
template <class T>
constexpr Index gemm_packed_gated_cols(Index d_ff) {
  constexpr Index g = GemmPackedShape<T>::pair_group;
  return 2 * ((d_ff + g - 1) / g * g);
}

/// Elements of scratch one call of gemm_packed_nt on n rows with inner dimension k needs (per
/// worker): the accumulator block (mc x nc) and the packed rows of x (up to one row block of mc
/// rows, rounded up to whole tiles, times k). 64-byte aligned scratch is fastest; any alignment
/// works.
template <class T>
constexpr Index gemm_packed_scratch_size(Index n, Index k) {
  using S = GemmPackedShape<T>;
  const Index rows = std::min(S::mc, (std::max<Index>(n, 0) + S::mr - 1) / S::mr * S::mr);
  return S::mc * S::nc + rows * k;
}
/// gemm_packed_scratch_size for any number of rows.
template <class T>
constexpr Index gemm_packed_scratch_size(Index k) {
  return gemm_packed_scratch_size<T>(GemmPackedShape<T>::mc, k);
}

namespace detail {

// Packs `cols` columns given by column(j) -> const T* (a row of W of length k, or nullptr for a
// zero column) into dst (gemm_packed_size<T>(cols, k) elements).
template <class T, class ColumnAt>
void pack_columns(Index cols, Index k, const ColumnAt& column, T* dst) {
  constexpr Index nr = GemmPackedShape<T>::nr;
  const Index panels = (cols + nr - 1) / nr;
  for (Index p = 0; p < panels; ++p) {
    T* panel = dst + p * k * nr;
    for (Index j = 0; j < nr; ++j) {
      const T* src = p * nr + j < cols ? column(p * nr + j) : nullptr;
      for (Index i = 0; i < k; ++i) panel[i * nr + j] = src != nullptr ? src[i] : T(0);
    }
  }
}

}  // namespace detail

/// Packs W [cols x k] (row-major, row stride ldw: the nn.Linear [out x in] layout) into dst
/// (gemm_packed_size<T>(cols, k) elements) and returns the view. Cost: one pass over W; meant
/// for construction time.
template <class T>
PackedPanels<T> pack_nt(const T* w, Index cols, Index k, Index ldw, T* dst) {
  MOE_ASSERT(cols >= 0 && k >= 0 && (cols == 0 || ldw >= k));
  detail::pack_columns<T>(cols, k, [&](Index j) { return w + j * ldw; }, dst);
  return {dst, cols, k};
}

/// Packs a gated pair, gate and up [d_ff x k] (row strides ld_gate, ld_up), into dst
/// (gemm_packed_size<T>(gemm_packed_gated_cols<T>(d_ff), k) elements) so that one product gives
/// both halves side by side: packed column 2 g G + h G + i (G = pair_group) is row g G + i of
/// gate (h = 0) or up (h = 1), zero past d_ff. GatedEpilogue / SwiGluEpilogue turn the pairs into
/// activations.
template <class T>
PackedPanels<T> pack_gated_nt(const T* gate, Index ld_gate, const T* up, Index ld_up, Index d_ff,
                              Index k, T* dst) {
  constexpr Index g = GemmPackedShape<T>::pair_group;
  const Index cols = gemm_packed_gated_cols<T>(d_ff);
  detail::pack_columns<T>(cols, k,
                          [&](Index j) -> const T* {
                            const Index row = j / (2 * g) * g + j % g;
                            if (row >= d_ff) return nullptr;
                            return (j / g) % 2 == 0 ? gate + row * ld_gate : up + row * ld_up;
                          },
                          dst);
  return {dst, cols, k};
}

/// Selects the micro-kernel: the compiled ISA's vector packets, or plain scalar loops with the
/// same blocking (the portable fallback, and the reference the vector kernel is tested against).
enum class GemmIsa { native, scalar };

namespace detail {

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Keeps a loaded packet in a register: without it GCC 12 folds the W load (or the broadcast of x)
// into every FMA that uses it as a memory operand, 27 loads per 24 FMAs instead of 11.
template <class Packet>
inline void gemm_packed_pin(Packet& p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(p));
#else
  (void)p;
#endif
}

// c[r, j] (+)= sum_i a[i mr + r] * b[i nr + j] for r < mr, j < nr: one register tile over a k
// block. a: packed x micro-panel [kc][mr]; b: packed W panel run [kc][nr]; c: accumulator tile
// (row stride ldc). Not inlined: GCC 12 then keeps the accumulator array in registers.
// rows < mr computes only the first rows of the micro-panel and panels = 2 two adjacent W panels
// (b and b + panel_stride, into c and c + nr) at once: the few-row products (see
// gemm_packed_block). a keeps its mr-row layout.
template <class T, class Packet, bool accumulate, int rows = GemmPackedShape<T>::mr,
          int panels = 1>
EIGEN_DONT_INLINE void gemm_packed_tile(Index kc, const T* __restrict a, const T* __restrict b,
                                        T* __restrict c, Index ldc, Index panel_stride = 0) {
  using Shape = GemmPackedShape<T>;
  constexpr Index stride = Shape::mr, mr = rows, nr = Shape::nr;
  constexpr Index lanes = Eigen::internal::packet_traits<T>::size;
  constexpr Index nv = nr / lanes, nw = panels * nv;
  using namespace Eigen::internal;
  Packet acc[mr][nw];
  for (Index r = 0; r < mr; ++r) {
    for (Index v = 0; v < nw; ++v) {
      acc[r][v] = accumulate ? ploadu<Packet>(c + r * ldc + v * lanes) : pset1<Packet>(T(0));
    }
  }
  for (Index i = 0; i < kc; ++i) {
    Packet bv[nw];
    for (Index v = 0; v < nw; ++v) {
      bv[v] = ploadu<Packet>(b + (v / nv) * panel_stride + i * nr + (v % nv) * lanes);
      gemm_packed_pin(bv[v]);
    }
    for (Index r = 0; r < mr; ++r) {
      Packet av = pset1<Packet>(a[i * stride + r]);
      gemm_packed_pin(av);
      for (Index v = 0; v < nw; ++v) acc[r][v] = pmadd(av, bv[v], acc[r][v]);
    }
  }
  for (Index r = 0; r < mr; ++r) {
    for (Index v = 0; v < nw; ++v) pstoreu(c + r * ldc + v * lanes, acc[r][v]);
  }
}

// The scalar fallback tile: same arithmetic, one element at a time.
template <class T>
void gemm_packed_tile_scalar(Index kc, const T* a, const T* b, T* c, Index ldc, bool accumulate) {
  using Shape = GemmPackedShape<T>;
  constexpr Index mr = Shape::mr, nr = Shape::nr;
  for (Index r = 0; r < mr; ++r) {
    for (Index j = 0; j < nr; ++j) {
      T sum = accumulate ? c[r * ldc + j] : T(0);
      for (Index i = 0; i < kc; ++i) sum += a[i * mr + r] * b[i * nr + j];
      c[r * ldc + j] = sum;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Prefetches slice `slice` of `slices` of [p, p + bytes) into L2 (nothing when bytes <= 0).
inline void prefetch_slice(const void* p, Index bytes, Index slice, Index slices) {
#if defined(__GNUC__)
  constexpr Index kLine = 64;
  const Index lines = (bytes + kLine - 1) / kLine;
  const Index per_slice = (lines + slices - 1) / slices;
  const char* base = static_cast<const char*>(p);
  const Index end = std::min(lines, (slice + 1) * per_slice);
  for (Index l = slice * per_slice; l < end; ++l) __builtin_prefetch(base + l * kLine, 0, 2);
#else
  (void)p, (void)bytes, (void)slice, (void)slices;
#endif
}

// Copies an 8-row micro-panel's k block (columns [0, kn) of rows x, x + ldx, ...) into panel as
// [kn][8]. With AVX: 8 x 8 register transposes, about 4x faster than the element loop (which at
// ~0.36 ns an element cost 7% of a 384-column task at k = 2048).
template <class T>
inline void gemm_packed_pack_panel8(const T* x, Index ldx, Index kn, T* panel) {
  Index i = 0;
#if defined(EIGEN_VECTORIZE_AVX)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // __m256 as a template argument
#endif
  if constexpr (std::is_same_v<T, float>) {
    using namespace Eigen::internal;
    for (; i + 8 <= kn; i += 8) {
      PacketBlock<Packet8f, 8> block;
      for (int r = 0; r < 8; ++r) block.packet[r] = ploadu<Packet8f>(x + r * ldx + i);
      ptranspose(block);
      for (int r = 0; r < 8; ++r) pstoreu(panel + (i + r) * 8, block.packet[r]);
    }
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
  for (; i < kn; ++i) {
    for (Index r = 0; r < 8; ++r) panel[i * 8 + r] = x[r * ldx + i];
  }
}

// Packs rows [0, rows) (rows <= mc) of x into the k-block-major layout of one row block.
template <class T>
void gemm_packed_pack_block(const T* x, Index rows, Index ldx, Index k, T* dst) {
  using Shape = GemmPackedShape<T>;
  constexpr Index mr = Shape::mr, kc = Shape::kc;
  const Index mcp = (rows + mr - 1) / mr * mr;
  for (Index i0 = 0; i0 < k; i0 += kc) {
    const Index kn = std::min(kc, k - i0);
    T* block = dst + i0 * mcp;
    for (Index q = 0; q < mcp; q += mr) {
      T* panel = block + q * kn;
      if (mr == 8 && q + mr <= rows) {
        gemm_packed_pack_panel8(x + q * ldx + i0, ldx, kn, panel);
        continue;
      }
      for (Index r = 0; r < mr; ++r) {
        const T* src = x + (q + r) * ldx + i0;
        for (Index i = 0; i < kn; ++i) panel[i * mr + r] = q + r < rows ? src[i] : T(0);
      }
    }
  }
}

// The product of one packed row block (rows [r0, r0 + rows) of x, rows <= mc) with the columns
// [c0, c1) of w; acc: mc x nc scratch.
template <class T, GemmIsa Isa, class Epilogue>
void gemm_packed_block(const T* xpack, Index r0, Index rows, PackedPanels<T> w, Index c0,
                       Index c1, const Epilogue& epilogue, T* acc) {
  using Shape = GemmPackedShape<T>;
  constexpr Index mr = Shape::mr, nr = Shape::nr, kc = Shape::kc, nc = Shape::nc;
  const Index k = w.k;
  const Index rows_padded = (rows + mr - 1) / mr * mr;
  if constexpr (Isa == GemmIsa::native && mr == 8) {
    if (rows <= mr && k > 0) {
      // Decode and few-row products are bound by reading W: a tile of 1, 2 or 4 rows runs down
      // two whole panels at a time (two streams of k nr contiguous values, which the hardware
      // prefetcher follows), and no FMA is spent on padding rows. The same FMA chain per element
      // as the blocked loop (which stores and reloads between k blocks): bitwise the same results.
      using Packet = typename Shape::Packet;
      for (Index j0 = c0; j0 < c1; j0 += nc) {
        const Index cols = std::min(nc, c1 - j0);
        for (Index j = 0; j < cols; j += 2 * nr) {
          const T* b = w.data + (j0 + j) / nr * k * nr;
          T* c = acc + j;
          if (rows > 4) {  // a full tile, one panel at a time
            gemm_packed_tile<T, Packet, false>(k, xpack, b, c, nc);
            if (j + nr < cols) gemm_packed_tile<T, Packet, false>(k, xpack, b + k * nr, c + nr, nc);
          } else if (j + nr >= cols) {  // one panel left
            if (rows == 1) {
              gemm_packed_tile<T, Packet, false, 1>(k, xpack, b, c, nc);
            } else if (rows == 2) {
              gemm_packed_tile<T, Packet, false, 2>(k, xpack, b, c, nc);
            } else {
              gemm_packed_tile<T, Packet, false, 4>(k, xpack, b, c, nc);
            }
          } else if (rows == 1) {
            gemm_packed_tile<T, Packet, false, 1, 2>(k, xpack, b, c, nc, k * nr);
          } else if (rows == 2) {
            gemm_packed_tile<T, Packet, false, 2, 2>(k, xpack, b, c, nc, k * nr);
          } else {
            gemm_packed_tile<T, Packet, false, 4, 2>(k, xpack, b, c, nc, k * nr);
          }
        }
        epilogue(static_cast<const T*>(acc), nc, r0, rows, j0, cols);
      }
      return;
    }
  }
  for (Index j0 = c0; j0 < c1; j0 += nc) {
    const Index cols = std::min(nc, c1 - j0);
    if (k == 0) std::fill(acc, acc + Shape::mc * nc, T(0));
    for (Index i0 = 0; i0 < k; i0 += kc) {
      const Index kn = std::min(kc, k - i0);
      const T* xblock = xpack + i0 * rows_padded;
      // The W panel run (kn x nr) is reused by every row micro-panel of the block from L1; the x
      // micro-panels (mr x kn) stream from L2.
      for (Index j = 0; j < cols; j += nr) {
        const T* b = w.data + (j0 + j) / nr * k * nr + i0 * nr;
        // The run read next (the next panel, or the block's first panel at the next k block) is
        // prefetched into L2 a slice per tile: the weights come from L3 or DRAM and the hardware
        // prefetcher restarts on every run. Measured +5-15% on the expert shapes (kc = 128).
        const bool last_panel = j + nr >= cols;
        const T* b_next = last_panel ? w.data + j0 / nr * k * nr + (i0 + kn) * nr : b + k * nr;
        const Index next_bytes =
            (last_panel ? std::min(kc, k - i0 - kn) : kn) * nr * Index(sizeof(T));
        const Index tiles = rows_padded / mr;
        for (Index q = 0; q < rows_padded; q += mr) {
          prefetch_slice(b_next, next_bytes, q / mr, tiles);
          const T* a = xblock + q * kn;
          T* c = acc + q * nc + j;
          if constexpr (Isa == GemmIsa::native) {
            using Packet = typename Shape::Packet;
            if (i0 > 0) {
              gemm_packed_tile<T, Packet, true>(kn, a, b, c, nc);
            } else {
              gemm_packed_tile<T, Packet, false>(kn, a, b, c, nc);
            }
          } else {
            gemm_packed_tile_scalar<T>(kn, a, b, c, nc, i0 > 0);
          }
        }
      }
    }
    epilogue(static_cast<const T*>(acc), nc, r0, rows, j0, cols);
  }
}

}  // namespace detail

/// Elements of x packed by gemm_packed_pack_x: n rounded up to a whole register tile, times k.
template <class T>
constexpr Index gemm_packed_x_size(Index n, Index k) {
  constexpr Index mr = GemmPackedShape<T>::mr;
  return (n + mr - 1) / mr * mr * k;
}

/// Packs x [n x k] (row-major, row stride ldx >= k) for gemm_packed_nt_prepacked: row blocks of
/// mc rows one after the other (block b at dst + b mc k), each as k blocks of mr-row micro-panels
/// ([kn][mr], rows past n zero). dst: gemm_packed_x_size<T>(n, k) elements. Pack once, then run
/// many column tasks on it: that saves the per-task copy of gemm_packed_nt.
template <class T>
void gemm_packed_pack_x(const T* x, Index n, Index ldx, Index k, T* dst) {
  constexpr Index mc = GemmPackedShape<T>::mc;
  MOE_ASSERT(n >= 0 && k >= 0 && (n == 0 || ldx >= k));
  for (Index r0 = 0; r0 < n; r0 += mc) {
    detail::gemm_packed_pack_block(x + r0 * ldx, std::min(mc, n - r0), ldx, k, dst + r0 * k);
  }
}

/// Elements of scratch one call of gemm_packed_nt_prepacked needs: the accumulator block.
template <class T>
constexpr Index gemm_packed_acc_size() {
  return GemmPackedShape<T>::mc * GemmPackedShape<T>::nc;
}

/// gemm_packed_nt on x packed beforehand by gemm_packed_pack_x (xpack: n rows, inner dimension
/// w.k). acc: gemm_packed_acc_size<T>() elements of caller-owned scratch per concurrent call.
/// Same results, bitwise, as gemm_packed_nt.
template <class T, class Epilogue, GemmIsa Isa = GemmIsa::native>
void gemm_packed_nt_prepacked(const T* xpack, Index n, PackedPanels<T> w, Index c0, Index c1,
                              const Epilogue& epilogue, T* acc) {
  using Shape = GemmPackedShape<T>;
  MOE_ASSERT(n >= 0 && 0 <= c0 && c0 <= c1 && c1 <= w.cols);
  if (n == 0 || c1 == c0) return;
  MOE_ASSERT(c0 % Shape::granule == 0);
  for (Index r0 = 0; r0 < n; r0 += Shape::mc) {
    detail::gemm_packed_block<T, Isa>(xpack + r0 * w.k, r0, std::min(Shape::mc, n - r0), w, c0,
                                      c1, epilogue, acc);
  }
}

/// The columns [c0, c1) of x * W'^T for all n rows of x, handed to `epilogue` block by block.
///
/// x: row-major [n x k], row stride ldx >= k. w: packed weights (pack_nt / pack_gated_nt) with
/// w.k == k; c0 <= c1 <= w.cols, c0 a multiple of GemmPackedShape<T>::granule (gated_granule
/// for gated weights) unless the range is empty (as moe::block_range gives). scratch:
/// gemm_packed_scratch_size<T>(n, k) elements owned by the caller (one per concurrent call);
/// nothing is allocated. epilogue(acc, ld_acc, r0, rows, j0, cols) is called
/// once per finished block with acc[r ld_acc + j] = sum_i x[r0 + r, i] W'[j0 + j, i] for r < rows,
/// j < cols (the block's valid part; [j0, j0 + cols) within [c0, c1), j0 - c0 a multiple of nc);
/// see gemm_packed_epilogue.hpp.
///
/// Cost: 2 n k (c1 - c0) FLOPs on register tiles of mr x nr; x is packed once per call (n k
/// copies; gemm_packed_nt_prepacked shares one packing among tasks), W' read from L2 once per mc
/// rows. Tasks on disjoint column ranges of the same product may run concurrently (each with its
/// own scratch). Every element is summed in the same order whatever the split (see the file
/// comment); the scalar fallback (Isa = GemmIsa::scalar) sums in the same order but may round
/// each step separately.
template <class T, class Epilogue, GemmIsa Isa = GemmIsa::native>
void gemm_packed_nt(const T* x, Index n, Index ldx, PackedPanels<T> w, Index c0, Index c1,
                    const Epilogue& epilogue, T* scratch) {
  using Shape = GemmPackedShape<T>;
  const Index k = w.k;
  MOE_ASSERT(n >= 0 && k >= 0 && 0 <= c0 && c0 <= c1 && c1 <= w.cols);
  if (n == 0 || c1 == c0) return;
  MOE_ASSERT(c0 % Shape::granule == 0 && ldx >= k);
  T* acc = scratch;
  T* xpack = scratch + Shape::mc * Shape::nc;
  for (Index r0 = 0; r0 < n; r0 += Shape::mc) {
    const Index rows = std::min(Shape::mc, n - r0);
    detail::gemm_packed_pack_block(x + r0 * ldx, rows, ldx, k, xpack);
    detail::gemm_packed_block<T, Isa>(xpack, r0, rows, w, c0, c1, epilogue, acc);
  }
}

}  // namespace moe::kernels
