// Small statistics over measurements.
#pragma once
#include <vector>

namespace moe {

// Median of a non-empty list (the mean of the middle two for an even count).
double median(std::vector<double> v);

}  // namespace moe
