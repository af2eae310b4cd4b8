// moe: a dense FFN with the block's interface: the baseline of the dense-vs-sparse benchmark.
#pragma once

#include "moe/activations.hpp"
#include "moe/error.hpp"
#include "moe/experts/expert_stack.hpp"
#include "moe/experts/grouped.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/workspace.hpp"

namespace moe {

/// y = down(act(gate x) * up x) (or out(act(in x)) for a plain Ffn) on every token: one expert
/// that every token visits. Weights in checkpoint orientation, held as a one-expert ExpertStack.
template <class T, class Ffn = SwiGLU>
class DenseFfn {
 public:
  /// Throws config_error if the stack is not exactly one expert of the Ffn's kind.
  explicit DenseFfn(ExpertStack<T> weights) : weights_(std::move(weights)) {
    if (weights_.num_experts() != 1 || weights_.gated() != Ffn::gated || weights_.d_model() <= 0 ||
        weights_.d_ff() <= 0) {
      throw config_error("moe: DenseFfn needs exactly one non-empty expert of the Ffn's kind");
    }
  }

  Index d_model() const { return weights_.d_model(); }
  Index d_ff() const { return weights_.d_ff(); }
  const ExpertStack<T>& weights() const { return weights_; }

  /// y = FFN(x); x, y: [num_tokens x d_model] row-major. Throws shape_error.
  template <class XDerived>
  void forward(const Eigen::DenseBase<XDerived>& x_in, MatrixMut<T> y, Workspace<T>& ws,
               const Executor& executor = serial_executor()) const {
    static_assert(is_row_major_v<XDerived>, "moe: x must be row-major [num_tokens x d_model]");
    const MatrixRef<T> x(x_in.derived());
    const Index n = x.rows(), d = weights_.d_model(), in = weights_.in_rows();
    detail::check_shape("x", x.rows(), x.cols(), n, d);
    detail::check_shape("y", y.rows(), y.cols(), n, d);
    if (n == 0) return;
    T* hidden = detail::WorkspaceAccess::hidden(ws).ensure(n * in);
    // The block's own FFN path (streaming kernel for few rows, GEMM for many), so a one-expert
    // block and the dense FFN compute the same sums. y rows must be contiguous for it.
    if (y.outerStride() == d) {
      detail::ffn_forward<Ffn, T>(weights_, 0, x.data(), x.outerStride(), n, hidden, hidden, in,
                                  y.data(), executor);
    } else {
      T* out = detail::WorkspaceAccess::y_rows(ws).ensure(n * d);
      detail::ffn_forward<Ffn, T>(weights_, 0, x.data(), x.outerStride(), n, hidden, hidden, in,
                                  out, executor);
      y = ConstMap<T>(out, n, d);
    }
  }

 private:
  ExpertStack<T> weights_;
};

}  // namespace moe
