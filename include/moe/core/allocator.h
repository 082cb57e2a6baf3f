// A caching CPU allocator for LibTorch. Training allocates the same large
// tensors every step; glibc hands blocks over 32 MiB back to the kernel on
// free (mmap), so each step pays a page fault per 4 KiB page again (measured:
// most of the system time of an MoE layer step). Blocks of 1 MiB and more are
// kept in size buckets and reused; smaller ones go to malloc as before.
#pragma once
#include <cstdint>

namespace moe {

// Installs the allocator as LibTorch's CPU allocator (once; later calls are
// no-ops). `cache_limit_bytes` bounds the idle memory kept for reuse.
void install_caching_cpu_allocator(int64_t cache_limit_bytes);

}  // namespace moe
