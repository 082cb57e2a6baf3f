// A caching CPU allocator for LibTorch. Training allocates the same large
// tensors every step; glibc hands blocks over 32 MiB back to the kernel on
// free (mmap), so each step pays a page fault per 4 KiB page again (measured:
// most of the system time of an MoE layer step). Blocks of 1 MiB and more are
// kept in size buckets and reused; smaller ones go to malloc as before.
//
// It replaces only LibTorch's CPU allocator (c10::SetCPUAllocator): CUDA
// tensors keep c10's CUDA caching allocator, and pinned host buffers keep
// the CUDA host allocator, so it is never in the way of GPU runs; it only
// serves the host-side tensors (staging copies, the data loader, logging).
// The LibTorch version difference in the allocator interface (2.3: a
// non-const `allocate`, a pure virtual `copy_data`) is handled in
// allocator.cpp alone.
#pragma once
#include <cstdint>

namespace moe {

// Installs the allocator as LibTorch's CPU allocator (once; later calls are
// no-ops). `cache_limit_bytes` bounds the idle memory kept for reuse.
void install_caching_cpu_allocator(int64_t cache_limit_bytes);

}  // namespace moe
