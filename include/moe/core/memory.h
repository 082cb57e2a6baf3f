// Process memory figures (Linux /proc).
#pragma once
#include <cstdint>

namespace moe {

// Peak resident set size of this process in bytes (VmHWM), 0 if unknown.
int64_t peak_rss_bytes();
// Current resident set size of this process in bytes (VmRSS), 0 if unknown.
int64_t current_rss_bytes();

}  // namespace moe
