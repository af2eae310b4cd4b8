// MOE_ASSERT: aborts with its message by default; the test binaries make it throw (test_util.hpp).
#include "moe/error.hpp"

#include <gtest/gtest.h>

#include "test_util.hpp"

namespace moe {
namespace {

TEST(Assert, TestBinariesInstallTheThrowingHandler) {
  EXPECT_EQ(detail::current_assert_handler(), &detail::throwing_assert_handler);
  try {
    MOE_ASSERT(1 + 1 == 3);
    FAIL() << "MOE_ASSERT(false) did not throw";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("moe: internal assertion failed: 1 + 1 == 3 at "),
              std::string::npos)
        << e.what();
  }
  MOE_ASSERT(1 + 1 == 2);  // a true assertion does nothing
}

TEST(AssertDeathTest, DefaultHandlerPrintsAndAborts) {
  EXPECT_DEATH(detail::default_assert_handler("n >= 0", "file.hpp", 12),
               "moe: internal assertion failed: n >= 0 at file.hpp:12");
}

TEST(AssertDeathTest, DefaultHandlerAbortsThroughMoeAssert) {
  EXPECT_DEATH(
      {
        set_assert_handler(&detail::default_assert_handler);
        MOE_ASSERT(2 < 1);
      },
      "moe: internal assertion failed: 2 < 1 at .*error_test.cpp");
}

}  // namespace
}  // namespace moe
