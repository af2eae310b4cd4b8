// moe::distributed::ExpertPlacement: no MPI needed (the map is plain data).
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/distributed/placement.hpp"

namespace {

using moe::Index;
using moe::distributed::ExpertPlacement;

/// Every expert appears exactly once, in ascending order on its owner, at its local index.
void expect_consistent(const ExpertPlacement& p) {
  std::vector<int> seen(static_cast<std::size_t>(p.num_experts()), 0);
  Index max_local = 0;
  for (int r = 0; r < p.num_ranks(); ++r) {
    const auto& mine = p.experts_of(r);
    max_local = std::max(max_local, static_cast<Index>(mine.size()));
    for (std::size_t i = 0; i < mine.size(); ++i) {
      if (i > 0) {
        EXPECT_LT(mine[i - 1], mine[i]);
      }
      EXPECT_EQ(p.owner(mine[i]), r);
      EXPECT_EQ(p.local_index(mine[i]), static_cast<Index>(i));
      ++seen[static_cast<std::size_t>(mine[i])];
    }
  }
  for (int s : seen) EXPECT_EQ(s, 1);
  EXPECT_EQ(p.max_local(), max_local);
}

TEST(ExpertPlacement, ContiguousGivesEarlierRanksOneMore) {
  const auto p = ExpertPlacement::contiguous(7, 3);  // 3, 2, 2
  EXPECT_EQ(p.experts_of(0), (std::vector<Index>{0, 1, 2}));
  EXPECT_EQ(p.experts_of(1), (std::vector<Index>{3, 4}));
  EXPECT_EQ(p.experts_of(2), (std::vector<Index>{5, 6}));
  EXPECT_EQ(p.max_local(), 3);
  expect_consistent(p);
}

TEST(ExpertPlacement, RoundRobinAndMoreRanksThanExperts) {
  const auto p = ExpertPlacement::round_robin(7, 3);
  EXPECT_EQ(p.experts_of(0), (std::vector<Index>{0, 3, 6}));
  EXPECT_EQ(p.experts_of(2), (std::vector<Index>{2, 5}));
  expect_consistent(p);
  for (const auto& q : {ExpertPlacement::contiguous(2, 5), ExpertPlacement::round_robin(2, 5)}) {
    EXPECT_TRUE(q.experts_of(4).empty());
    EXPECT_EQ(q.max_local(), 1);
    expect_consistent(q);
  }
  for (Index e : {Index(1), Index(7), Index(31), Index(129)}) {
    for (int r : {1, 2, 3, 4, 7}) {
      expect_consistent(ExpertPlacement::contiguous(e, r));
      expect_consistent(ExpertPlacement::round_robin(e, r));
    }
  }
}

TEST(ExpertPlacement, ExplicitMap) {
  const auto p = ExpertPlacement::from_map({3, 3, 0, 3}, 4);  // ranks 1 and 2 hold nothing
  EXPECT_EQ(p.experts_of(3), (std::vector<Index>{0, 1, 3}));
  EXPECT_EQ(p.local_index(3), 2);
  EXPECT_TRUE(p.experts_of(1).empty());
  expect_consistent(p);
}

TEST(ExpertPlacement, ErrorsNameTheField) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const moe::config_error& e) {
      return std::string(e.what());
    }
    return std::string("no config_error");
  };
  EXPECT_EQ(message([] { ExpertPlacement::from_map({0, 5, 1}, 4); }),
            "moe: expert 1 is placed on rank 5, outside [0, 4)");
  EXPECT_EQ(message([] { ExpertPlacement::from_map({0, -1}, 2); }),
            "moe: expert 1 is placed on rank -1, outside [0, 2)");
  EXPECT_EQ(message([] { ExpertPlacement::contiguous(0, 2); }),
            "moe: placement of num_experts = 0 must be positive");
  EXPECT_EQ(message([] { ExpertPlacement::round_robin(4, 0); }),
            "moe: placement over num_ranks = 0 must be positive");
  EXPECT_EQ(message([] { ExpertPlacement::from_map({}, 2); }),
            "moe: placement of num_experts = 0 must be positive");
}

}  // namespace
