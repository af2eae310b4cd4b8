// moe: auxiliary losses of MoE routing (load balancing, router z-loss, DeepSeek-V3 sequence-wise
// balance, Shazeer 2017 importance and load), their gradients with respect to the router logits,
// and the auxiliary-loss-free bias update. Conventions: moe/losses/common.hpp.
#pragma once

#include "moe/losses/balance.hpp"       // IWYU pragma: export
#include "moe/losses/regularizers.hpp"  // IWYU pragma: export
