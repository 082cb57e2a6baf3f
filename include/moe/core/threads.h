// CPU thread budget: how many threads ATen's parallel loops and OpenBLAS use.
#pragma once
#include <algorithm>
#include <cstdint>

namespace moe {

// `ranks_here` ranks share this process's cores (rank threads, or 1 for an
// MPI rank; `procs_per_node` MPI ranks share the machine). Called by each
// rank thread: ATen's thread count is per thread, OpenBLAS's per process.
void configure_cpu_threads(int ranks_here, int procs_per_node = 1);

// Cores this (rank) thread may use for its own data-parallel loops, as set by
// configure_cpu_threads (1 before it is called).
int cpu_budget();

// Runs fn(lo, hi) over [0, n) split across cpu_budget() threads when n is at
// least `grain` per thread; otherwise inline. fn must be safe to run concurrently
// on disjoint ranges.
template <typename Fn>
void parallel_ranges(int64_t n, int64_t grain, const Fn& fn);

// True when OpenBLAS is the BLAS LibTorch calls (warned about once if not).
bool openblas_loaded();

}  // namespace moe

#include <cstdint>
#include <thread>
#include <vector>

template <typename Fn>
void moe::parallel_ranges(int64_t n, int64_t grain, const Fn& fn) {
  int64_t parts = std::min<int64_t>(cpu_budget(), grain > 0 ? n / grain : 1);
  if (parts <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; ++p)
    workers.emplace_back([&, p] { fn(n * p / parts, n * (p + 1) / parts); });
  fn(int64_t{0}, n / parts);
  for (auto& w : workers) w.join();
}
