// moe/io: a Hugging Face model directory opened once (ModelCheckpoint: config.json + tensors),
// what a load may do beyond config.json (LoadOptions), and the reader that checks each tensor of
// a layer against config.json before anything is allocated and after it is read.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/families.hpp"
#include "moe/io/json.hpp"
#include "moe/io/model_spec.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"

namespace moe::io {

/// A checkpoint directory opened once: its config.json (spec) and its tensors (single file or
/// sharded through model.safetensors.index.json), memory-mapped: only the bytes a load reads
/// are paged in. Immutable, move-only; loading layers from many threads at once is safe.
class ModelCheckpoint {
 public:
  /// Reads DIR/config.json and maps DIR's safetensors. Throws io_error / config_error.
  static ModelCheckpoint open(const std::string& dir) {
    ModelSpec spec = read_model_spec(dir);
    return ModelCheckpoint(std::move(spec), Checkpoint::open_directory(dir));
  }
  /// Combines a spec and tensors obtained separately (a config from elsewhere, tests).
  ModelCheckpoint(ModelSpec spec, Checkpoint tensors)
      : spec_(std::move(spec)), tensors_(std::move(tensors)) {}

  const ModelSpec& spec() const { return spec_; }
  const Checkpoint& tensors() const { return tensors_; }
  const std::string& directory() const { return tensors_.directory(); }

 private:
  ModelSpec spec_;
  Checkpoint tensors_;
};

/// What a loaded block keeps its routed experts as (LoadOptions::weights).
enum class WeightFormat {
  as_stored,  ///< the checkpoint's own format: BF16 -> bf16, F8_E4M3 + weight_scale_inv -> fp8
              ///< (both zero-copy views of the mapped file), MXFP4 blocks + scales -> mxfp4,
              ///< anything else -> fp32 (a copy)
  fp32,       ///< the block's scalar, converted on load (the pre-issue-14 behaviour)
  bf16,       ///< bf16, quantised on load expert by expert unless stored so (then a view)
  int8,       ///< int8 with per-row scales, quantised on load expert by expert
  fp8,        ///< fp8 e4m3 with 128 x 128 block scales, quantised on load unless stored so
  q8,         ///< ggml Q8_0 blocks of 32, quantised on load expert by expert
  q4,         ///< ggml Q4_0 blocks of 32, quantised on load expert by expert
  mxfp4,      ///< OCP MXFP4 blocks of 32, as stored (gpt-oss) or quantised on load
};

/// "as-stored", "fp32", "bf16", "int8", "fp8", "q8", "q4", "mxfp4".
inline const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::as_stored:
      return "as-stored";
    case WeightFormat::fp32:
      return "fp32";
    case WeightFormat::bf16:
      return "bf16";
    case WeightFormat::int8:
      return "int8";
    case WeightFormat::fp8:
      return "fp8";
    case WeightFormat::q8:
      return "q8";
    case WeightFormat::q4:
      return "q4";
    case WeightFormat::mxfp4:
      return "mxfp4";
  }
  return "?";
}

/// What load_* may do beyond config.json.
struct LoadOptions {
  /// What the routed experts of a loaded block (load_moe_layer with a CompactExperts block,
  /// load_any_moe_layer) are kept as; see WeightFormat and docs/io.md. load_moe_weights and
  /// load_moe_shard always convert to their scalar T. The router, its bias, norms, the shared
  /// expert and its gate always stay in the block's scalar.
  WeightFormat weights = WeightFormat::as_stored;
  /// Block-quantised experts (q8, q4, mxfp4) of load_any_moe_layer: the exact products
  /// (CompactMode::exact: fp32 activations, bitwise the fp32 block on the dequantised weights;
  /// mxfp4 as stored then views down_proj in the file) instead of the fast ones (int8
  /// activations, panels). No effect on bf16, int8, fp8 (their products are exact) or fp32.
  bool exact = false;
  /// Mapped experts: hint the kernel to read the chosen experts' pages ahead after each routing
  /// (MADV_WILLNEED, see experts/residency.hpp).
  bool prefetch = true;
  /// false: MoeWeights::experts is left empty (the compact loader reads the experts itself).
  bool routed_experts = true;
  /// Switch: route without a capacity limit, as transformers 5.17 does in fact (FORMAT.md 5.6:
  /// its capacity rule never drops a token). false: drop beyond config.json expert_capacity.
  bool switch_dropless = false;
  /// Runs the conversions of routed-expert matrices (quantise-on-load, and every expert read
  /// through fp32 because its stored layout is not the kernels') as one task per matrix (per
  /// expert for MXFP4 or non-[E, out, in] fused tensors) on this executor; nullptr: one after the
  /// other on the calling thread. A task holds one fp32 matrix (an expert's three for those
  /// layouts) while it runs, so at most num_workers() are in memory at once. The loaded weights
  /// are bitwise the same for every executor and number of workers; errors are those of a serial
  /// load (the first matrix's in load order). The executor must outlive the call; do not load
  /// from inside a task of the same ThreadPool (run() is not reentrant). Views of the mapped file
  /// are made on the calling thread (they cost nothing to make).
  const Executor* executor = nullptr;
  /// The routed experts to read, by global expert id, in the order the loaded weights hold them
  /// (an expert-parallel rank's shard). Empty: all experts, in order. Only the chosen experts'
  /// bytes are read (per-expert tensors, or the chosen [e] slices of a fused [E, ...] tensor);
  /// the router, its bias and the shared expert are always read whole. load_moe_layer needs all
  /// experts; load_moe_shard / load_moe_weights take a subset.
  std::vector<Index> experts;
};

namespace detail {

/// The expert ids a load reads: options.experts, or 0 .. num_experts - 1. Throws config_error
/// naming the id for one out of range or given twice.
inline std::vector<Index> chosen_experts(const ModelSpec& s, const LoadOptions& options) {
  const Index E = s.moe.num_experts;
  if (!options.routed_experts) return {};
  if (options.experts.empty()) {
    std::vector<Index> all(static_cast<std::size_t>(E));
    for (Index e = 0; e < E; ++e) all[static_cast<std::size_t>(e)] = e;
    return all;
  }
  std::vector<bool> seen(static_cast<std::size_t>(E), false);
  for (std::size_t i = 0; i < options.experts.size(); ++i) {
    const Index e = options.experts[i];
    if (e < 0 || e >= E) {
      throw config_error(moe::detail::concat("moe: LoadOptions::experts[", i, "] = ", e,
                                             " is out of range [0, ", E, ") of ", s.source));
    }
    if (seen[static_cast<std::size_t>(e)]) {
      throw config_error(moe::detail::concat("moe: LoadOptions::experts names expert ", e,
                                             " twice (at [", i, "])"));
    }
    seen[static_cast<std::size_t>(e)] = true;
  }
  return options.experts;
}

/// Reads tensors of one layer with every shape checked against config.json first, and every
/// value checked finite after it is read.
class LayerReader {
 public:
  LayerReader(const ModelCheckpoint& m, Index layer) : m_(m), layer_(layer) {}

  bool has(const std::string& name) const { return m_.tensors().contains(name); }

  /// Throws io_error when `name` is absent, shape_error when its shape is not `expected`.
  void check(const std::string& name, const std::vector<std::int64_t>& expected) const {
    if (!has(name)) {
      throw io_error(moe::detail::concat("moe: ", m_.directory(), ": layer ", layer_, " (",
                                         family_name(m_.spec().family), "): missing tensor '", name,
                                         "'"));
    }
    const TensorInfo& info = m_.tensors().info(name);
    if (info.shape != expected) {
      throw shape_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", name,
                                            "' has shape ", shape_str(info.shape),
                                            ", config.json implies ", shape_str(expected)));
    }
    if (!dtype_is_floating(info.dtype)) {
      throw io_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", name,
                                         "' has dtype ", dtype_name(info.dtype),
                                         ", expected a floating dtype"));
    }
    const std::string scale = name + "_scale_inv";
    if (has(scale)) {
      if (expected.size() != 2) {
        throw io_error(moe::detail::concat("moe: ", m_.directory(), ": tensor '", scale,
                                           "': block scales are supported for 2-D weights only"));
      }
      const std::int64_t br = m_.spec().fp8_block_rows, bc = m_.spec().fp8_block_cols;
      const std::vector<std::int64_t> grid = {(expected[0] + br - 1) / br,
                                              (expected[1] + bc - 1) / bc};
      const TensorInfo& si = m_.tensors().info(scale);
      if (si.shape != grid || !dtype_is_floating(si.dtype)) {
        throw io_error(moe::detail::concat(
            "moe: ", m_.directory(), ": block scales '", scale, "' have shape ",
            shape_str(si.shape), " of ", dtype_name(si.dtype), ", expected ", shape_str(grid),
            " (a floating dtype) for weight ", shape_str(expected), " in ", br, " x ", bc,
            " blocks"));
      }
    }
  }

  /// The block scales W_scale_inv of weight W as fp32, row-major [ceil(rows / br) x ceil(cols /
  /// bc)] (shape checked by check(W)). Throws io_error naming the scale tensor for a non-finite
  /// scale.
  std::vector<float> read_scales(const std::string& scale) const {
    std::vector<float> s = m_.tensors().read_vector<float>(scale);
    check_scales(scale, s.data(), s.size());
    return s;
  }

  /// Throws io_error "moe: FILE: layer L: block scales 'NAME' have a non-finite value (inf at
  /// [k])" for the first non-finite of n scales.
  void check_scales(const std::string& scale, const float* s, std::size_t n) const {
    for (std::size_t k = 0; k < n; ++k) {
      if (!std::isfinite(s[k])) {
        throw io_error(moe::detail::concat("moe: ", m_.tensors().file_of(scale).path(),
                                           ": layer ", layer_, ": block scales '", scale,
                                           "' have a non-finite value (", s[k], " at [", k, "])"));
      }
    }
  }

  /// `name` as [rows x cols] of T (rank 3 [a, b, c] gives [a*b x c]); a W_scale_inv sibling
  /// multiplies each fp8_block_rows x fp8_block_cols block of W. Call check() first. Throws
  /// io_error naming the file, the layer and the tensor for a non-finite value.
  template <class T>
  RowMatrix<T> read(const std::string& name) const {
    RowMatrix<T> w = m_.tensors().read_matrix<T>(name);
    const std::string scale = name + "_scale_inv";
    if (has(scale)) {
      const RowMatrix<double> s = m_.tensors().read_matrix<double>(scale);
      const std::vector<float> as_float(s.data(), s.data() + s.size());
      check_scales(scale, as_float.data(), as_float.size());
      const Index br = m_.spec().fp8_block_rows, bc = m_.spec().fp8_block_cols;
      for (Index i = 0; i < w.rows(); ++i) {
        for (Index j = 0; j < w.cols(); ++j) {
          w(i, j) = static_cast<T>(static_cast<double>(w(i, j)) * s(i / br, j / bc));
        }
      }
    }
    check_finite(name, w.data(), w.rows(), w.cols(), 0);
    return w;
  }

  /// Reads 2-D `name` into `dst` (same shape, checked by check()). When the file stores T
  /// itself, aligned and unscaled, the bytes are copied straight from the mapping (no
  /// temporary); otherwise through read(). Throws as read().
  template <class T>
  void read_into(const std::string& name, MutMap<T> dst) const {
    const TensorInfo& info = m_.tensors().info(name);
    const auto address = reinterpret_cast<std::uintptr_t>(m_.tensors().file_of(name).data(name));
    if (info.dtype == native_dtype<T>() && address % alignof(T) == 0 && !has(name + "_scale_inv")) {
      dst = m_.tensors().map_matrix<T>(name);
      check_finite(name, dst.data(), dst.rows(), dst.cols(), 0);
    } else {
      dst = read<T>(name);
    }
  }

  /// Rows [first_row, first_row + dst.rows()) of `name` (checked by check(), no block scales)
  /// into `dst`: one expert's slice of a fused [E, ...] tensor. Throws as read().
  template <class T>
  void read_rows_into(const std::string& name, Index first_row, MutMap<T> dst) const {
    dst = m_.tensors().file_of(name).template read_rows<T>(name, first_row, dst.rows());
    check_finite(name, dst.data(), dst.rows(), dst.cols(), first_row);
  }

  /// Throws io_error "moe: FILE: layer L: tensor 'NAME' has a non-finite value (nan at [i, j])"
  /// for the first non-finite element of the [rows x cols] row-major values (row i counted from
  /// the tensor's first row: `row_offset` is where these rows start).
  template <class T>
  void check_finite(const std::string& name, const T* values, Index rows, Index cols,
                    Index row_offset) const {
    const Index n = rows * cols;
    for (Index i = 0; i < n; ++i) {
      if (!std::isfinite(values[i])) {
        throw io_error(moe::detail::concat("moe: ", m_.tensors().file_of(name).path(), ": layer ",
                                           layer_, ": tensor '", name, "' has a non-finite value (",
                                           values[i], " at [", row_offset + i / cols, ", ",
                                           i % cols, "])"));
      }
    }
  }

  Index layer() const { return layer_; }

 private:
  const ModelCheckpoint& m_;
  Index layer_;
};

}  // namespace detail
}  // namespace moe::io
