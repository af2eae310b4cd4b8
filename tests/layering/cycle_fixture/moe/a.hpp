// Fixture for the layering check: a.hpp and b.hpp include each other.
#pragma once
#include "moe/b.hpp"
