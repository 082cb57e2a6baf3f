#include "moe/apps/common.h"

#include <unistd.h>

#include <algorithm>

#include "moe/core/error.h"

namespace moe::apps {

Config load_config_or_defaults(const std::string& path, const std::vector<std::string>& overrides) {
  return path.empty() ? default_config(overrides) : load_config(path, overrides);
}

int thread_ranks(int flag_ranks, const Config& cfg) {
  if (flag_ranks > 0) {
    if (cfg.parallel.ranks > 0 && cfg.parallel.ranks != flag_ranks)
      MOE_THROW(ConfigError, "--ranks " << flag_ranks
                                        << " disagrees with parallel.ranks = " << cfg.parallel.ranks
                                        << " (drop one, or set parallel.ranks=0)");
    return flag_ranks;
  }
  return cfg.parallel.ranks > 0 ? static_cast<int>(cfg.parallel.ranks) : 1;
}

std::string self_executable() {
  char self[4096];
  const ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);
  MOE_CHECK(len > 0, "cannot locate the moe executable (/proc/self/exe)");
  return std::string(self, static_cast<size_t>(len));
}

std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace moe::apps
