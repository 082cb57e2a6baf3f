// Precompiled header: the heavy, stable headers every translation unit uses.
// Only standard and third-party headers belong here, never project headers.
#pragma once
#include <torch/types.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>
