// Process memory figures (Linux /proc).
#pragma once
#include <cstdint>

namespace moe {

// Peak resident set size of this process in bytes (VmHWM), 0 if unknown.
int64_t peak_rss_bytes();
// Current resident set size of this process in bytes (VmRSS), 0 if unknown.
int64_t current_rss_bytes();
// Memory the kernel can give new allocations without swapping (MemAvailable), 0 if unknown.
int64_t available_memory_bytes();

}  // namespace moe
