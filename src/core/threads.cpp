#include "moe/core/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "moe/core/log.h"

namespace moe {

namespace {
thread_local int t_cpu_budget = 1;
using SetThreads = void (*)(int);
SetThreads openblas_setter() {
  static SetThreads fn =
      reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  return fn;
}
}  // namespace

int cpu_budget() {
  return t_cpu_budget;
}

bool openblas_loaded() {
  static std::atomic<bool> warned{false};
  bool loaded = openblas_setter() != nullptr;
  if (!loaded && !warned.exchange(true)) {
    MOE_LOG(Warn)
        << "OpenBLAS is not the BLAS in use: matrix products run on the reference BLAS, about 20x "
           "slower (apt-get install libopenblas0-pthread)";
  }
  return loaded;
}

void configure_cpu_threads(int ranks_here, int procs_per_node) {
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  const int per_proc = std::max(1, cores / std::max(1, procs_per_node));
  const int per_rank = std::max(1, per_proc / std::max(1, ranks_here));
  // ATen loops stay on one thread when OpenBLAS owns the cores: OpenMP workers
  // spin between parallel regions and starve the BLAS threads (measured 10x slower GEMMs).
  at::set_num_threads(1);
  t_cpu_budget = per_rank;
  // Several rank threads calling BLAS at once: one BLAS thread each.
  if (openblas_loaded()) openblas_setter()(ranks_here > 1 ? 1 : per_proc);
}

}  // namespace moe
