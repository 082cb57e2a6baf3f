#include "moe/core/filesystem.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace moe {

std::string make_directories(const std::string& path) {
  std::string cur;
  for (size_t i = 0; i <= path.size(); ++i) {
    if ((i == path.size() || path[i] == '/') && !cur.empty() && ::mkdir(cur.c_str(), 0755) != 0 &&
        errno != EEXIST)
      return "cannot create directory '" + cur + "': " + std::strerror(errno);
    if (i < path.size()) cur += path[i];
  }
  return "";
}

}  // namespace moe
