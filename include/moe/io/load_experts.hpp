// moe/io: the routed experts of one sparse layer as compact weights (CompactExpertStack), read
// as stored where the checkpoint's layout is the kernels' layout, converted expert by expert
// where it is not.
//
//   const auto m = moe::io::ModelCheckpoint::open("Mixtral-8x7B-v0.1");      // BF16 tensors
//   moe::io::stored_format(m, 3);                          // WeightFormat::bf16
//   auto experts = moe::io::load_compact_experts<moe::Bf16>(m, 3);  // views: no byte is read
//
// What becomes what (Format = the stack's format):
//   stored BF16, Format Bf16                  -> zero-copy view of the mapped bytes
//   stored F8_E4M3 + W_scale_inv, Format Fp8  -> zero-copy view of the codes; the F32 scales
//                                                viewed too (other scale dtypes: one small copy)
//   stored MXFP4 (gpt-oss W_blocks + W_scales), Format Mxfp4, exact mode (stored layout):
//                                                down_proj a zero-copy view; gate and up a byte
//                                                copy each (their rows interleave in the file)
//   the same, fast mode (panels)              -> one lossless repack into the panel layout
//   anything else                             -> one conversion per expert: its matrices read as
//                                                fp32 ([d_ff x d_model] at a time; fp8 is
//                                                dequantised with its scales) and quantised to
//                                                Format; never a whole fp32 layer. Fused layouts
//                                                other than [E, out, in] go through
//                                                load_moe_weights one expert at a time.
// Views share ownership of the mapped file (Checkpoint::share_file): the ModelCheckpoint may be
// destroyed while a block views it. Views are not scanned for non-finite values (that would read
// every page, which as_stored exists to avoid; fp8 views are scanned once by CompactMatrix::view
// for NaN codes); converted experts are checked as load_moe_weights checks them.
#pragma once

#include <array>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/experts/compact_expert_stack.hpp"
#include "moe/experts/quant_expert_stack.hpp"
#include "moe/experts/residency.hpp"
#include "moe/experts/storage.hpp"
#include "moe/io/families.hpp"
#include "moe/io/load_tasks.hpp"
#include "moe/io/load_weights.hpp"
#include "moe/io/model_checkpoint.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/io/mxfp4_experts.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// The names of one sparse layer's routed-expert tensors: the v5 fused pair [E, 2 d_ff, d_model]
/// / [E, d_model, d_ff] (rows of expert e: [e 2 d_ff, (e + 1) 2 d_ff), gate then up), or one
/// tensor per expert and projection.
struct ExpertTensorNames {
  std::string prefix;               ///< the layer's sparse-block prefix as found in the files
  bool fused = false;               ///< fused_in / fused_out, else gate / up / down
  bool mxfp4 = false;               ///< fused, stored as MXFP4 (NAME_blocks + NAME_scales)
  std::string fused_in, fused_out;  ///< fused only (MXFP4: the names before _blocks / _scales)
  const FamilyRow* row = nullptr;
  Index layer = 0;

  std::string gate(Index e) const { return name(row->expert_gate, e); }
  std::string up(Index e) const { return name(row->expert_up, e); }
  std::string down(Index e) const { return name(row->expert_down, e); }
  /// The tensor holding expert e's input projection (its dtype is the experts' stored dtype).
  std::string input(Index e) const {
    return fused ? (mxfp4 ? Mxfp4Tensor(fused_in).blocks : fused_in) : gate(e);
  }

 private:
  // "" for a family without per-expert names (no tensor has that name).
  std::string name(const char* pattern, Index e) const {
    return pattern == nullptr ? std::string() : prefix + expand_name(pattern, layer, e);
  }
};

/// Finds the expert tensors of sparse layer `layer` (the hub prefix, or the transformers v5
/// in-memory one when only that holds the router; fused names when present). Throws nothing:
/// absent tensors are reported by the loaders.
inline ExpertTensorNames expert_tensor_names(const ModelCheckpoint& m, Index layer) {
  const ModelSpec& s = m.spec();
  const FamilyRow& row = s.row();
  auto has = [&](const std::string& n) { return m.tensors().contains(n); };
  ExpertTensorNames n;
  n.row = &row;
  n.layer = layer;
  n.prefix = s.moe_prefix(layer);
  if (row.sparse_prefix_v5 != nullptr && !has(n.prefix + row.router)) {
    const std::string v5 = expand_name(row.sparse_prefix_v5, layer);
    if (has(v5 + row.router)) n.prefix = v5;
  }
  n.mxfp4 = row.fused_gate_up != nullptr && row.fused_down != nullptr && row.gated_experts &&
            has_mxfp4(m, n.prefix + row.fused_gate_up);
  n.fused = n.mxfp4 || (row.fused_gate_up != nullptr &&
                        (has(n.prefix + row.fused_gate_up) || has(n.prefix + row.fused_down)));
  if (n.fused) {
    n.fused_in = n.prefix + row.fused_gate_up;
    n.fused_out = n.prefix + row.fused_down;
  }
  return n;
}

/// Whether the fp8 kernels can view a matrix of `cols` columns in config.json's scale blocks
/// (block_cols a power of two >= 16, or the whole width; cols 0: any width).
inline bool fp8_blocks_viewable(const ModelSpec& s, Index cols) {
  const Index bc = s.fp8_block_cols;
  const bool pow2 = bc >= 16 && (bc & (bc - 1)) == 0;
  return s.fp8_block_rows >= 1 && (pow2 || (cols > 0 && bc >= cols));
}

/// The format the routed experts of sparse layer `layer` are stored in: mxfp4 for gpt-oss's
/// W_blocks + W_scales, bf16 for BF16, fp8 for F8_E4M3 (fp32 when its scale blocks are not the
/// kernels', see fp8_blocks_viewable), fp32 for every other dtype, judged by expert 0's input
/// projection (fp32 when it is absent: the loaders then report it). Never as_stored.
inline WeightFormat stored_format(const ModelCheckpoint& m, Index layer) {
  const ExpertTensorNames n = expert_tensor_names(m, layer);
  if (n.mxfp4) return WeightFormat::mxfp4;
  const std::string name = n.input(0);
  if (!m.tensors().contains(name)) return WeightFormat::fp32;
  switch (m.tensors().info(name).dtype) {
    case Dtype::BF16:
      return WeightFormat::bf16;
    case Dtype::F8_E4M3:
      // Scale blocks the fp8 kernels cannot index (block_cols not a power of two >= 16, see
      // CompactMatrix::view) would need a second, lossy quantisation: load exact fp32 instead.
      return fp8_blocks_viewable(m.spec(), 0) ? WeightFormat::fp8 : WeightFormat::fp32;
    default:
      return WeightFormat::fp32;
  }
}

namespace detail {

/// What a view holds on to: the mapped file(s) and, when the scales needed a conversion, the
/// converted scales.
struct ViewOwner {
  std::shared_ptr<const SafetensorsFile> codes_file, scales_file;
  std::vector<float> scales;
};

/// The format and matrix type of an expert stack (CompactExpertStack or QuantExpertStack).
template <class Stack>
struct StackTraits;
template <class F>
struct StackTraits<CompactExpertStack<F>> {
  using format = F;
  using matrix = CompactMatrix<F>;
  static constexpr bool quant = false;
};
// The fast bf16 stack holds the same matrices as CompactExpertStack<Bf16>.
template <>
struct StackTraits<Bf16FastExpertStack> : StackTraits<CompactExpertStack<Bf16>> {};
template <class F, QuantLayout L>
struct StackTraits<QuantExpertStack<F, L>> {
  using format = F;
  using matrix = QuantMatrix<F>;
  static constexpr bool quant = true;
};

// One expert matrix to load: rows [first_row, first_row + rows) of tensor `name`, [rows x cols],
// expert e's.
struct MatrixJob {
  std::string name;
  Index first_row = 0, rows = 0, cols = 0, e = 0;
};

template <class Stack>
struct ExpertLoader {
  using Format = typename StackTraits<Stack>::format;
  using Matrix = typename StackTraits<Stack>::matrix;
  const ModelCheckpoint& m;
  const LayerReader& r;
  const Stack& stack;
  ExpertResidency& residency;
  bool any_view = false;

  // fp32 weights quantised to the stack's format (and, block-quantised, its layout).
  Matrix convert(const MatrixRef<float>& w) const {
    if constexpr (StackTraits<Stack>::quant) {
      return Matrix::quantize(w, stack.layout());
    } else {
      return Matrix::quantize(w);
    }
  }

  // Whether matrix `j` can be viewed in the mapped file as the stack keeps it (BF16 into a Bf16
  // stack, F8_E4M3 in viewable blocks into an Fp8 stack); if so `out` is the view, its bytes
  // recorded as expert j.e's. Calling thread only (it records into the residency).
  bool view(const MatrixJob& j, Matrix& out) {
    const TensorInfo& info = m.tensors().info(j.name);
    const SafetensorsFile& file = m.tensors().file_of(j.name);
    const unsigned char* bytes = file.data(j.name) + std::size_t(j.first_row * j.cols) *
                                                         dtype_size(info.dtype);
    const std::string scale_name = j.name + "_scale_inv";
    if constexpr (std::is_same_v<Format, Bf16> && !StackTraits<Stack>::quant) {
      if (info.dtype == Dtype::BF16 && reinterpret_cast<std::uintptr_t>(bytes) % 2 == 0) {
        auto owner = std::make_shared<ViewOwner>();
        owner->codes_file = m.tensors().share_file(j.name);
        residency.add_range(j.e, bytes, std::size_t(j.rows * j.cols) * 2);
        any_view = true;
        out = Matrix::with_owner(
            Matrix::view(reinterpret_cast<const std::uint16_t*>(bytes), j.rows, j.cols), owner);
        return true;
      }
    } else if constexpr (std::is_same_v<Format, Fp8E4M3>) {
      if (info.dtype == Dtype::F8_E4M3 && fp8_blocks_viewable(m.spec(), j.cols)) {
        if (!r.has(scale_name)) {
          throw io_error(moe::detail::concat("moe: ", m.directory(), ": layer ", r.layer(),
                                             ": F8_E4M3 tensor '", j.name,
                                             "' has no block scales: missing tensor '", scale_name,
                                             "'"));
        }
        auto owner = std::make_shared<ViewOwner>();
        owner->codes_file = m.tensors().share_file(j.name);
        const TensorInfo& si = m.tensors().info(scale_name);
        const SafetensorsFile& sfile = m.tensors().file_of(scale_name);
        const float* scales = nullptr;
        const auto* sp = sfile.data(scale_name);
        if (si.dtype == Dtype::F32 && reinterpret_cast<std::uintptr_t>(sp) % alignof(float) == 0) {
          scales = reinterpret_cast<const float*>(sp);
          r.check_scales(scale_name, scales, std::size_t(si.numel()));
          owner->scales_file = m.tensors().share_file(scale_name);
          residency.add_range(j.e, sp, si.nbytes);
        } else {
          owner->scales = r.read_scales(scale_name);
          scales = owner->scales.data();
        }
        residency.add_range(j.e, bytes, std::size_t(j.rows * j.cols));
        any_view = true;
        const ModelSpec& s = m.spec();
        out = Matrix::with_owner(
            Matrix::view(bytes, j.rows, j.cols, scales, s.fp8_block_rows, s.fp8_block_cols), owner);
        return true;
      }
    }
    return false;
  }

  // Matrix `j` read as fp32 (this one matrix alone) and converted. Reads the checkpoint and
  // writes nothing shared: safe on any thread.
  Matrix read_converted(const MatrixJob& j) const {
    RowMatrix<float> w(j.rows, j.cols);
    if (j.first_row == 0 && j.rows * j.cols == m.tensors().info(j.name).numel()) {
      r.read_into<float>(j.name, MutMap<float>(w.data(), j.rows, j.cols));
    } else {
      r.read_rows_into<float>(j.name, j.first_row, MutMap<float>(w.data(), j.rows, j.cols));
    }
    return convert(w);
  }

  // Expert e of an MXFP4 layer (n.mxfp4) as stored, into an Mxfp4 stack: down viewed in the
  // mapped file, gate / up de-interleaved by a byte copy (the stack repacks them into panels in
  // fast mode). Calling thread only.
  void set_mxfp4_as_stored(const ExpertTensorNames& n, Index e, Stack& out) {
    if constexpr (std::is_same_v<Format, Mxfp4>) {
      const Index H = out.d_model(), I = out.d_ff();
      const kernels::Mxfp4View in = mxfp4_rows(m, n.fused_in, e * 2 * I, 2 * I, H);
      const kernels::Mxfp4View down = mxfp4_rows(m, n.fused_out, e * H, H, I);
      const Mxfp4Tensor t(n.fused_out);
      auto owner = std::make_shared<ViewOwner>();
      owner->codes_file = m.tensors().share_file(t.blocks);
      owner->scales_file = m.tensors().share_file(t.scales);
      if (out.layout() == QuantLayout::stored) {
        residency.add_range(e, down.codes, std::size_t(H * (I / 32) * 16));
        residency.add_range(e, down.scales, std::size_t(H * (I / 32)));
        any_view = true;
      }
      out.set_gated(e, mxfp4_strided_rows(in, 0), mxfp4_strided_rows(in, 1),
                    Matrix::with_owner(Matrix::view(down), owner));
    } else {
      (void)n, (void)e, (void)out;
    }
  }

  // Expert e of an MXFP4 layer dequantised to fp32 (its three matrices) and converted to the
  // stack's format: gate, up, down. Safe on any thread.
  std::array<Matrix, 3> read_mxfp4_converted(const ExpertTensorNames& n, Index e, Index H,
                                             Index I) const {
    RowMatrix<float> gate(I, H), up(I, H), down(H, I);
    read_mxfp4_expert<float>(m, n.fused_in, n.fused_out, e, H, I, MutMap<float>(gate.data(), I, H),
                             MutMap<float>(up.data(), I, H), MutMap<float>(down.data(), H, I));
    r.check_finite(Mxfp4Tensor(n.fused_in).blocks, gate.data(), I, H, 0);
    r.check_finite(Mxfp4Tensor(n.fused_in).blocks, up.data(), I, H, 0);
    r.check_finite(Mxfp4Tensor(n.fused_out).blocks, down.data(), H, I, e * H);
    return {convert(gate), convert(up), convert(down)};
  }
};

/// Throws config_error unless `layer` is sparse and options.experts is empty.
inline void check_whole_sparse_layer(const ModelSpec& s, Index layer, const LoadOptions& options) {
  if (!s.is_moe_layer(layer)) {
    throw config_error(moe::detail::concat("moe: ", s.source, ": layer ", layer,
                                           " is a dense layer, not a sparse MoE layer"));
  }
  if (!options.experts.empty()) {
    throw config_error("moe: load_compact_experts reads every expert; LoadOptions::experts must "
                       "be empty");
  }
}

}  // namespace detail

/// The routed experts of sparse layer `layer` as Stack: CompactExpertStack<Bf16 | Int8 |
/// Fp8E4M3> or QuantExpertStack<Q8 | Q4 | Mxfp4, layout> (what CompactExperts<Format, Mode>
/// holds), every expert in order: views of the mapped file where the stored layout is the
/// kernels' (see the table at the top of this file), else converted one matrix per task on
/// options.executor (serial without one; bitwise the same weights either way). The stack carries an ExpertResidency (usage counters; for views, the
/// mapped ranges the block hints after each routing unless options.prefetch is false).
/// Shapes are checked against config.json first, as load_moe_weights does, with its messages
/// (io_error for a missing tensor, shape_error for a wrong shape). Malformed block scales are
/// io_errors naming the scale tensor: missing ("F8_E4M3 tensor 'W' has no block scales: missing
/// tensor 'W_scale_inv'"), wrong shape ("block scales 'W_scale_inv' have shape [a x b] of F32,
/// expected [c x d] ..."), non-finite ("block scales 'W_scale_inv' have a non-finite value (inf
/// at [k])"); MXFP4 tensors as check_mxfp4 says. Throws config_error for a dense layer or
/// options.experts not empty; block-quantised stacks throw shape_error unless d_model and d_ff
/// are multiples of 32.
template <class Stack>
Stack load_expert_stack(const ModelCheckpoint& m, Index layer, const LoadOptions& options = {}) {
  const ModelSpec& s = m.spec();
  detail::check_whole_sparse_layer(s, layer, options);
  const MoeConfig& c = s.moe;
  const std::int64_t E = c.num_experts, H = c.d_model, I = c.d_ff;
  const bool gated = s.row().gated_experts;
  const ExpertTensorNames n = expert_tensor_names(m, layer);
  const detail::LayerReader r(m, layer);
  const std::int64_t in_rows = (gated ? 2 : 1) * I;
  Stack stack(E, H, I, gated);
  using Matrix = typename detail::StackTraits<Stack>::matrix;
  if (n.fused && !n.mxfp4 &&
      !(m.tensors().contains(n.fused_in) && m.tensors().contains(n.fused_out) &&
        m.tensors().info(n.fused_in).shape == std::vector<std::int64_t>{E, in_rows, H} &&
        m.tensors().info(n.fused_out).shape == std::vector<std::int64_t>{E, H, I})) {
    // A fused layout that is not the kernels' [E, out, in] (or a wrong shape, which
    // load_moe_weights reports): one expert per task through the fp32 loader, then quantised.
    auto residency = std::make_shared<ExpertResidency>(E, false, false);
    const detail::ExpertLoader<Stack> load{m, r, stack, *residency};
    std::vector<std::array<Matrix, 3>> converted(static_cast<std::size_t>(E));
    detail::run_load_tasks(options.executor, E, [&](Index e) {
      LoadOptions one = options;
      one.experts = {e};
      const MoeWeights<float> w = load_moe_weights<float>(m, layer, one);
      auto& c = converted[static_cast<std::size_t>(e)];
      c[0] = load.convert(w.experts.gate(0));
      if (gated) c[1] = load.convert(w.experts.up(0));
      c[2] = load.convert(w.experts.w_out(0));
    });
    for (Index e = 0; e < E; ++e) {
      auto& c = converted[static_cast<std::size_t>(e)];
      if (gated) {
        stack.set_gated(e, std::move(c[0]), std::move(c[1]), std::move(c[2]));
      } else {
        stack.set_plain(e, std::move(c[0]), std::move(c[2]));
      }
    }
    stack.set_residency(std::move(residency));
    return stack;
  }
  if (n.mxfp4) {
    check_mxfp4(m, layer, n.fused_in, E, in_rows, H);
    check_mxfp4(m, layer, n.fused_out, E, H, I);
  } else if (n.fused) {
    r.check(n.fused_in, {E, in_rows, H});
    r.check(n.fused_out, {E, H, I});
  } else {
    for (Index e = 0; e < E; ++e) {
      r.check(n.gate(e), {I, H});
      if (gated) r.check(n.up(e), {I, H});
      r.check(n.down(e), {H, I});
    }
  }
  bool mapped = true;
  for (Index e = 0; e < E && mapped; ++e) mapped = m.tensors().file_of(n.input(e)).mapped();
  auto residency = std::make_shared<ExpertResidency>(E, mapped, options.prefetch);
  detail::ExpertLoader<Stack> load{m, r, stack, *residency};
  if (n.mxfp4) {
    if constexpr (std::is_same_v<typename detail::StackTraits<Stack>::format, Mxfp4>) {
      for (Index e = 0; e < E; ++e) load.set_mxfp4_as_stored(n, e, stack);
    } else {
      std::vector<std::array<Matrix, 3>> converted(static_cast<std::size_t>(E));
      detail::run_load_tasks(options.executor, E, [&](Index e) {
        converted[static_cast<std::size_t>(e)] = load.read_mxfp4_converted(n, e, H, I);
      });
      for (Index e = 0; e < E; ++e) {
        auto& c = converted[static_cast<std::size_t>(e)];
        stack.set_gated(e, std::move(c[0]), std::move(c[1]), std::move(c[2]));
      }
    }
  } else {
    // Per expert: gate, [up,] down (the order of a serial load and of its errors). Views are
    // made here, on the calling thread; the other matrices are converted as tasks.
    const Index per_expert = gated ? 3 : 2;
    std::vector<detail::MatrixJob> jobs;
    jobs.reserve(static_cast<std::size_t>(E * per_expert));
    for (Index e = 0; e < E; ++e) {
      if (n.fused) {
        jobs.push_back({n.fused_in, e * in_rows, I, H, e});
        if (gated) jobs.push_back({n.fused_in, e * in_rows + I, I, H, e});
        jobs.push_back({n.fused_out, e * H, H, I, e});
      } else {
        jobs.push_back({n.gate(e), 0, I, H, e});
        if (gated) jobs.push_back({n.up(e), 0, I, H, e});
        jobs.push_back({n.down(e), 0, H, I, e});
      }
    }
    std::vector<Matrix> loaded(jobs.size());
    std::vector<std::size_t> to_convert;  // the jobs before the first failed view, if any
    std::exception_ptr view_error;
    for (std::size_t i = 0; i < jobs.size() && !view_error; ++i) {
      try {
        if (!load.view(jobs[i], loaded[i])) to_convert.push_back(i);
      } catch (...) {
        view_error = std::current_exception();
      }
    }
    detail::run_load_tasks(options.executor, Index(to_convert.size()), [&](Index k) {
      const std::size_t i = to_convert[static_cast<std::size_t>(k)];
      loaded[i] = load.read_converted(jobs[i]);
    });
    if (view_error) std::rethrow_exception(view_error);
    for (Index e = 0; e < E; ++e) {
      const auto i = static_cast<std::size_t>(e * per_expert);
      if (gated) {
        stack.set_gated(e, std::move(loaded[i]), std::move(loaded[i + 1]),
                        std::move(loaded[i + 2]));
      } else {
        stack.set_plain(e, std::move(loaded[i]), std::move(loaded[i + 1]));
      }
    }
  }
  if (!load.any_view) residency = std::make_shared<ExpertResidency>(E, false, false);
  stack.set_residency(std::move(residency));
  return stack;
}

/// The routed experts of sparse layer `layer` as CompactExperts<Format, Mode> keeps them
/// (CompactExpertStack<Format> for Bf16, Int8, Fp8E4M3; QuantExpertStack<Format> in the panel
/// layout (fast) or the stored layout (exact) for Q8, Q4, Mxfp4): see load_expert_stack.
template <class Format, CompactMode Mode = CompactMode::fast>
auto load_compact_experts(const ModelCheckpoint& m, Index layer, const LoadOptions& options = {}) {
  using Stack = typename CompactExperts<Format, Mode>::template stack<float>;
  return load_expert_stack<Stack>(m, layer, options);
}

}  // namespace moe::io
