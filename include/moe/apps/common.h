// Helpers shared by the subcommands.
#pragma once
#include <string>
#include <vector>

#include "moe/config/config.h"

namespace moe::apps {

// CONFIG may be empty (defaults); overrides apply either way.
Config load_config_or_defaults(const std::string& path, const std::vector<std::string>& overrides);

// Thread ranks for the thread backend: --ranks N, else parallel.ranks, else 1.
int thread_ranks(int flag_ranks, const Config& cfg);

// Path of the running `moe` executable (to start it again for sweep points
// and calibration runs: each in a fresh process).
std::string self_executable();
// 'text' quoted for /bin/sh.
std::string shell_quote(const std::string& text);

}  // namespace moe::apps
