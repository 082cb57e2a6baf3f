#include "moe/core/memory.h"

#include <fstream>
#include <string>

namespace moe {

namespace {
int64_t status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  const std::string prefix = field;
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(prefix, 0) == 0) return std::stoll(line.substr(prefix.size())) * 1024;  // kB
  return 0;
}
}  // namespace

int64_t peak_rss_bytes() {
  return status_bytes("VmHWM:");
}

int64_t current_rss_bytes() {
  return status_bytes("VmRSS:");
}

}  // namespace moe
