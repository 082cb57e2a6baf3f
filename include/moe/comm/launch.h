// Choosing a backend and running a function on every rank of it.
#pragma once
#include <functional>
#include <string>

#include "moe/comm/communicator.h"

namespace moe::comm {

// True when this process was started by mpirun/mpiexec (from the
// environment, without initialising MPI).
bool launched_by_mpirun();

// "auto" -> "mpi" when started by mpirun (and MPI is built), else "thread".
// Throws ConfigError for a backend this build lacks.
std::string resolve_backend(const std::string& requested);

// Runs fn on every rank of this process: `thread_ranks` rank threads for the
// thread backend; this process's rank of the MPI world for mpi (and, for nccl,
// an NCCL communicator bootstrapped over MPI on device local_rank % devices).
// Errors propagate as exceptions (the first failing rank's for threads).
void run_on_world(const std::string& backend, int thread_ranks, double timeout_s,
                  const std::function<void(Communicator&)>& fn);

// At program exit: finalises MPI when it was used and nothing failed.
void finalize_backends();
// After a fatal error in a multi-process job: terminates every process of
// the job (MPI_Abort) so no peer hangs; a no-op when MPI was not used.
void abort_backends(int code);

}  // namespace moe::comm
