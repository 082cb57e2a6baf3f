#include "moe/comm/launch.h"

#include <torch/version.h>

#include <algorithm>
#include <cstdlib>

#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/threads.h"
#if MOE_HAVE_MPI
#include <mpi.h>

#include "moe/comm/mpi_comm.h"
#endif
#if MOE_HAVE_NCCL
#include "moe/comm/nccl_comm.h"
#endif

namespace moe::comm {

bool launched_by_mpirun() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(var)) return true;
  return false;
}

std::string resolve_backend(const std::string& requested) {
  if (requested == "auto") return launched_by_mpirun() && MOE_HAVE_MPI ? "mpi" : "thread";
  if (requested == "thread") {
    // Each mpirun process would otherwise run its own private thread world.
    MOE_CHECK_T(ConfigError, !launched_by_mpirun(),
                "parallel.backend = 'thread' but this process was started by mpirun: use "
                "parallel.backend=auto "
                "(or mpi) so the processes form one world");
    return requested;
  }
  if (requested == "mpi") {
    MOE_CHECK_T(ConfigError, MOE_HAVE_MPI,
                "parallel.backend = 'mpi' but this build has no MPI backend");
    return requested;
  }
  if (requested == "nccl") {
    MOE_CHECK_T(ConfigError, MOE_HAVE_NCCL,
                "parallel.backend = 'nccl' but this build has no NCCL backend: "
                    << (MOE_TORCH_CUDA ? "the CUDA toolkit or NCCL was not found at configure time "
                                         "(see the NCCL line of the configure summary)"
                                       : "it needs a CUDA LibTorch and this one (" TORCH_VERSION
                                         ") is CPU-only; rebuild against a CUDA torch wheel "
                                         "(README, GPUs)")
                    << ", or use parallel.backend=auto, thread or mpi");
    MOE_CHECK_T(ConfigError, !launched_by_mpirun() || MOE_HAVE_MPI,
                "parallel.backend = 'nccl' under mpirun needs the MPI backend to bootstrap NCCL, "
                "and this build has none (apt-get install libopenmpi-dev and rebuild)");
    return requested;
  }
  MOE_THROW(ConfigError,
            "parallel.backend = '" << requested << "' is not one of auto, thread, mpi, nccl");
}

void finalize_backends() {
#if MOE_HAVE_MPI
  MpiComm::finalize();
#endif
}

void abort_backends(int code) {
#if MOE_HAVE_MPI
  if (launched_by_mpirun()) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (initialised) MpiComm::abort_job(code);
  }
#endif
  (void)code;
}

#if MOE_HAVE_NCCL
namespace {
// One rank of an NCCL world bootstrapped over `boot` (MPI or a rank thread).
void run_nccl_rank(Communicator& boot, DeviceKind device, double timeout_s,
                   const std::function<void(Communicator&)>& fn) {
  MOE_CHECK_T(ConfigError, device != DeviceKind::Cpu,
              "parallel.backend = 'nccl' carries CUDA tensors but parallel.device = 'cpu': use "
              "parallel.device=cuda or auto, or parallel.backend=auto, thread or mpi");
  const torch::Device dev = select_device(DeviceKind::Cuda, node_local_rank(boot));
  bind_device(dev);
  auto nccl = NcclComm::create(boot, dev.index(), timeout_s);
  fn(*nccl);
}
}  // namespace
#endif

void run_on_world(const std::string& backend, int thread_ranks, double timeout_s,
                  const std::function<void(Communicator&)>& fn, DeviceKind device) {
  if (backend == "thread") {
    run_ranks(thread_ranks, timeout_s, fn);
    return;
  }
#if MOE_HAVE_NCCL
  if (backend == "nccl" && !launched_by_mpirun()) {
    run_ranks(thread_ranks, timeout_s,
              [&](Communicator& boot) { run_nccl_rank(boot, device, timeout_s, fn); });
    return;
  }
#endif
#if MOE_HAVE_MPI
  if (backend == "mpi" || backend == "nccl") {
    auto world = MpiComm::world(timeout_s);
    set_current_rank(world->rank());
    int local_size = 1;
    if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE"))
      local_size = std::max(1, std::atoi(v));
    configure_cpu_threads(1, local_size);
    if (backend == "mpi") {
      fn(*world);
      return;
    }
#if MOE_HAVE_NCCL
    run_nccl_rank(*world, device, timeout_s, fn);
    return;
#endif
  }
#endif
  (void)device;
  MOE_THROW(ConfigError, "parallel.backend = '" << backend
                                                << "' is not available in this build (resolve_backend "
                                                   "says why)");
}

}  // namespace moe::comm
