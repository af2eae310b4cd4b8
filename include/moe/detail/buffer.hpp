// moe: grow-only scratch storage behind every workspace view.
#pragma once

#include <cstddef>
#include <vector>

#include "moe/tensor.hpp"

namespace moe::detail {

/// A grow-only array: `ensure(n)` allocates only when n exceeds every size seen before, so a warm
/// workspace performs no heap allocation. Views into it stay valid until the next growth.
template <class T>
class GrowBuffer {
 public:
  T* ensure(Index n) {
    if (static_cast<std::size_t>(n) > data_.size()) data_.resize(static_cast<std::size_t>(n));
    return data_.data();
  }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  /// Bytes held, for the workspace memory report.
  std::size_t bytes() const { return data_.capacity() * sizeof(T); }

 private:
  std::vector<T> data_;
};

}  // namespace moe::detail
