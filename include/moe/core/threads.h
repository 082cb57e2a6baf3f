// CPU thread budget: how many threads ATen's parallel loops and OpenBLAS use.
#pragma once

namespace moe {

// `ranks_here` ranks share this process's cores (rank threads, or 1 for an
// MPI rank; `procs_per_node` MPI ranks share the machine). Called by each
// rank thread: ATen's thread count is per thread, OpenBLAS's per process.
void configure_cpu_threads(int ranks_here, int procs_per_node = 1);

// True when OpenBLAS is the BLAS LibTorch calls (warned about once if not).
bool openblas_loaded();

}  // namespace moe
