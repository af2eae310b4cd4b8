// moe: the matrix types of the public API.
//
// Activations are row-major [num_tokens x d_model]: a token is one contiguous row.
// Weights keep the checkpoint nn.Linear layout [out_features x in_features], so loading a
// Hugging Face tensor needs no transpose; every product is y = x * W^T.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

namespace moe {

/// Row-major dynamic matrix: the storage type of activations and weights.
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view accepted by every entry point. Only row-major arguments bind without a copy; the
/// entry points additionally static_assert on row-major input (see is_row_major_v).
template <class T>
using MatrixRef = Eigen::Ref<const RowMatrix<T>>;

/// Writable view of caller-owned output storage. Never stored as a member: when the argument
/// needed a conversion, the Ref points at a temporary that is gone by the next call.
template <class T>
using MatrixMut = Eigen::Ref<RowMatrix<T>>;

/// Non-owning view of row-major memory owned elsewhere (a workspace, a memory-mapped file).
template <class T>
using ConstMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using MutMap = Eigen::Map<RowMatrix<T>>;

/// Column vector.
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Index type for token and row counts: 64-bit so T * k * d_model beyond 2^31 cannot overflow.
using Index = std::ptrdiff_t;

/// The scalar the router computes its scores in: float, or the block's scalar if wider.
template <class T>
using RouteScalar = std::conditional_t<(sizeof(T) > sizeof(float)), T, float>;

/// True for Eigen expressions stored row-major (or vectors, whose layout is unambiguous).
template <class Derived>
inline constexpr bool is_row_major_v =
    bool(std::decay_t<Derived>::IsRowMajor) || std::decay_t<Derived>::ColsAtCompileTime == 1 ||
    std::decay_t<Derived>::RowsAtCompileTime == 1;

}  // namespace moe
