// moe: errors that every rank of a communicator agrees on, so that no rank is left waiting in a
// collective that a failed rank never enters.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

#include "moe/error.hpp"

#include <mpi.h>

namespace moe::distributed {

namespace detail {

enum class ErrorKind : int { none = 0, config, shape, value, io, other };

[[noreturn]] inline void throw_kind(ErrorKind kind, const std::string& message) {
  switch (kind) {
    case ErrorKind::config:
      throw config_error(message);
    case ErrorKind::shape:
      throw shape_error(message);
    case ErrorKind::value:
      throw value_error(message);
    case ErrorKind::io:
      throw io_error(message);
    default:
      throw error(message);
  }
}

}  // namespace detail

/// Runs `f()` on every rank of `comm` (collective: every rank must call it; f itself must not
/// call collectives, or a rank that threw early would pair them wrongly), then agrees on the
/// outcome with one MPI_Allreduce of the lowest failing rank: when no rank threw, returns; when
/// some rank threw, every rank throws the same exception type (config_error, shape_error,
/// value_error, io_error, else moe::error) with the message of the lowest failing rank followed
/// by " (on rank r of R)", e.g. "moe: x has shape [5 x 15], expected [5 x 16] (on rank 1 of 3)".
/// Cost: one 4-byte all-reduce when all is well; two broadcasts more on failure.
template <class F>
void agree(MPI_Comm comm, F&& f) {
  detail::ErrorKind kind = detail::ErrorKind::none;
  std::string message;
  try {
    f();
  } catch (const config_error& e) {
    kind = detail::ErrorKind::config, message = e.what();
  } catch (const shape_error& e) {
    kind = detail::ErrorKind::shape, message = e.what();
  } catch (const value_error& e) {
    kind = detail::ErrorKind::value, message = e.what();
  } catch (const io_error& e) {
    kind = detail::ErrorKind::io, message = e.what();
  } catch (const std::exception& e) {
    kind = detail::ErrorKind::other, message = e.what();
  }
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  const int mine = kind == detail::ErrorKind::none ? size : rank;
  int first = size;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == size) return;
  int header[2] = {static_cast<int>(kind), static_cast<int>(message.size())};
  MPI_Bcast(header, 2, MPI_INT, first, comm);
  message.resize(static_cast<std::size_t>(header[1]));
  MPI_Bcast(message.data(), header[1], MPI_CHAR, first, comm);
  detail::throw_kind(static_cast<detail::ErrorKind>(header[0]),
                     moe::detail::concat(message, " (on rank ", first, " of ", size, ")"));
}

/// Runs `f()`; if it throws, prints "moe: rank r of R aborts the job: <message>" to stderr and
/// calls MPI_Abort(comm, 1), which ends every rank of the job. For code between collectives
/// after agreement, where a throwing rank would leave the others waiting forever.
template <class F>
void or_abort(MPI_Comm comm, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    int rank = 0, size = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    std::fprintf(stderr, "moe: rank %d of %d aborts the job: %s\n", rank, size, e.what());
    std::fflush(stderr);
    MPI_Abort(comm, 1);
  }
}

}  // namespace moe::distributed
