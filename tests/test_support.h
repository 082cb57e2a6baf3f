// Helpers shared by the test suites.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace moe::testing_support {

// Runs `ENV build/bin/moe ARGS` (stderr merged into stdout); returns the exit
// code. `env` is a shell prefix such as "MOE_CPU_CACHE_MB=0".
inline int run_moe(const std::string& args, std::string* output = nullptr,
                   const std::string& env = "") {
  std::string cmd = env + (env.empty() ? "" : " ") + std::string(MOE_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace moe::testing_support
