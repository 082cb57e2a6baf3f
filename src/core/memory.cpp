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

int64_t available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("MemAvailable:", 0) == 0) return std::stoll(line.substr(13)) * 1024;  // kB
  return 0;
}

}  // namespace moe
