// moe: per-token scoring and selection primitives on raw pointers (softmax, sigmoid, top-k).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "moe/tensor.hpp"

namespace moe::kernels {

/// Total order used by every selection: larger first, NaN below everything (a NaN score is never
/// preferred to a number), equal values keep the earlier (lower) index.
template <class S>
inline bool ranks_above(S a, S b) {
  if (std::isnan(a)) return false;
  return std::isnan(b) || a > b;
}

/// Writes the indices of the k largest of v[0..n) into idx[0..k), in descending order; ties go to
/// the lower index. O(n k), the right cost for the k <= 8 of real MoE models. Always writes k
/// valid indices in [0, n) (NaN entries rank last), so no caller sees an out-of-range expert.
template <class S>
inline void top_k(const S* v, Index n, Index k, std::int32_t* idx) {
  Index filled = 0;
  for (Index i = 0; i < n; ++i) {
    if (filled == k && !ranks_above(v[i], v[idx[k - 1]])) continue;
    Index p = filled < k ? filled++ : k - 1;
    while (p > 0 && ranks_above(v[i], v[idx[p - 1]])) {
      idx[p] = idx[p - 1];
      --p;
    }
    idx[p] = static_cast<std::int32_t>(i);
  }
}

/// out = softmax(in) over n entries, subtracting the maximum first so large logits cannot
/// overflow. A row containing NaN yields NaN; a row of -inf only is undefined (NaN) as in PyTorch.
template <class S>
inline void softmax(const S* in, Index n, S* out) {
  S m = -std::numeric_limits<S>::infinity();
  for (Index i = 0; i < n; ++i) m = in[i] > m ? in[i] : m;
  S sum = 0;
  for (Index i = 0; i < n; ++i) {
    out[i] = std::exp(in[i] - m);
    sum += out[i];
  }
  const S inv = S(1) / sum;
  for (Index i = 0; i < n; ++i) out[i] *= inv;
  for (Index i = 0; i < n; ++i) {
    if (std::isnan(in[i])) {
      for (Index j = 0; j < n; ++j) out[j] = std::numeric_limits<S>::quiet_NaN();
      break;
    }
  }
}

/// Numerically safe logistic function.
template <class S>
inline S sigmoid(S x) {
  if (x >= 0) return S(1) / (S(1) + std::exp(-x));
  const S e = std::exp(x);
  return e / (S(1) + e);
}

}  // namespace moe::kernels
