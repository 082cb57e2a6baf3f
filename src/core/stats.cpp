#include "moe/core/stats.h"

#include <algorithm>

#include "moe/core/error.h"

namespace moe {

double median(std::vector<double> v) {
  MOE_CHECK(!v.empty(), "median of an empty list");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace moe
