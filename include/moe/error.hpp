// moe: typed exceptions and the debug assertion used after validation.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

/// Base of every exception the library throws. Messages start with "moe: " so they are greppable.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

/// A configuration value is out of range or inconsistent (`top_k = 9 exceeds num_experts = 8`).
class config_error : public error {
 public:
  using error::error;
};

/// A matrix handed to the API has the wrong shape (`x has shape [5 x 15], expected [5 x 16]`).
class shape_error : public error {
 public:
  using error::error;
};

/// Input data that are well-shaped but unusable (non-finite values where finite ones are required).
class value_error : public error {
 public:
  using error::error;
};

/// A file (safetensors, config.json, index) is missing, unreadable or malformed.
class io_error : public error {
 public:
  using error::error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// "[r x c]", the one spelling of a shape in every message.
inline std::string shape_str(std::ptrdiff_t rows, std::ptrdiff_t cols) {
  return concat('[', rows, " x ", cols, ']');
}

/// Throws shape_error unless `rows x cols` equals the expected shape. `what` names the argument.
inline void check_shape(const char* what, std::ptrdiff_t rows, std::ptrdiff_t cols,
                        std::ptrdiff_t expected_rows, std::ptrdiff_t expected_cols) {
  if (rows != expected_rows || cols != expected_cols) {
    throw shape_error(concat("moe: ", what, " has shape ", shape_str(rows, cols), ", expected ",
                             shape_str(expected_rows, expected_cols)));
  }
}

/// Handler called by MOE_ASSERT; tests may replace it with one that throws.
using assert_handler = void (*)(const char* expr, const char* file, int line);

/// The default: prints "moe: internal assertion failed: EXPR at FILE:LINE" on stderr and aborts,
/// as Eigen's and fmt's asserts do. A broken invariant is a bug, not an input error, and aborting
/// behaves the same on the caller and on a pool thread (where a throw would call std::terminate).
[[noreturn]] inline void default_assert_handler(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "moe: internal assertion failed: %s at %s:%d\n", expr, file, line);
  std::fflush(stderr);
  std::abort();
}

/// A handler that throws moe::error with the same message (for tests: install it with
/// set_assert_handler(&detail::throwing_assert_handler) to check an assertion with EXPECT_THROW;
/// only where the assertion fires on the calling thread).
[[noreturn]] inline void throwing_assert_handler(const char* expr, const char* file, int line) {
  throw error(concat("moe: internal assertion failed: ", expr, " at ", file, ':', line));
}

inline assert_handler& current_assert_handler() {
  static assert_handler handler = &default_assert_handler;
  return handler;
}

}  // namespace detail

/// Replace the handler of MOE_ASSERT (the default aborts; tests install
/// detail::throwing_assert_handler). Returns the previous one.
inline detail::assert_handler set_assert_handler(detail::assert_handler handler) {
  detail::assert_handler old = detail::current_assert_handler();
  detail::current_assert_handler() = handler;
  return old;
}

}  // namespace moe

/// Checks an internal invariant, after the API boundary has validated the input. Compiled only in
/// debug builds (no NDEBUG) or when MOE_ENABLE_ASSERTS is defined; never used for user input.
#if !defined(NDEBUG) || defined(MOE_ENABLE_ASSERTS)
#define MOE_ASSERT(expr) \
  ((expr) ? void(0) : ::moe::detail::current_assert_handler()(#expr, __FILE__, __LINE__))
#else
#define MOE_ASSERT(expr) void(0)
#endif
