#include <iomanip>
#include <iostream>

#include "moe/apps/commands.h"
#include "moe/config/config.h"
#include "moe/core/error.h"

namespace moe::apps {

int not_implemented(const std::string& what) {
  std::cerr << "moe " << what << ": not implemented yet\n";
  return kExitOther;
}

namespace {
std::string md_escape(std::string s) {
  for (size_t p = 0; (p = s.find('|', p)) != std::string::npos; p += 2) s.replace(p, 1, "\\|");
  return s;
}
}  // namespace

int run_config(const ConfigArgs& args) {
  if (args.action == "keys") {
    if (args.markdown) {
      std::cout << "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n";
      for (const auto& k : config_keys())
        std::cout << "| `" << k.section << "." << k.key << "` | " << k.type << " | `"
                  << k.default_value << "` | " << md_escape(k.allowed) << " | " << md_escape(k.doc)
                  << " |\n";
    } else {
      for (const auto& k : config_keys())
        std::cout << std::left << std::setw(26) << (k.section + "." + k.key) << std::setw(10)
                  << k.type << std::setw(14) << k.default_value << k.doc << "  [" << k.allowed
                  << "]\n";
    }
    return kExitOk;
  }
  if (args.config_path.empty())
    MOE_THROW(UsageError, "moe config " << args.action << ": CONFIG file is required");
  Config cfg = load_config(args.config_path, args.overrides);
  if (args.action == "show") {
    std::cout << dump_config(cfg);
  } else {
    std::cout << args.config_path << ": ok (hash " << std::hex << config_hash(cfg) << std::dec
              << ")\n";
  }
  return kExitOk;
}

}  // namespace moe::apps
