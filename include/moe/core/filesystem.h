// Small filesystem helpers (POSIX).
#pragma once
#include <string>

namespace moe {

// mkdir -p: creates `path` and its missing parents. Returns "" on success,
// else what failed ("cannot create directory 'a/b': Permission denied"), so
// each caller raises the error type of its own layer.
std::string make_directories(const std::string& path);

}  // namespace moe
