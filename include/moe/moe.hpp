// moe: umbrella header. Includes the whole layer API; the checkpoint reader (moe/io/) is opt-in.
#pragma once

#include "moe/activations.hpp"
#include "moe/block.hpp"
#include "moe/config.hpp"
#include "moe/dense.hpp"
#include "moe/error.hpp"
#include "moe/expert.hpp"
#include "moe/gating.hpp"
#include "moe/router.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"
#include "moe/threading.hpp"
#include "moe/weights.hpp"
#include "moe/workspace.hpp"
#include "moe/losses.hpp"
#include "moe/gradients.hpp"
#include "moe/backward.hpp"
