// Choosing a backend and running a function on every rank of it.
#pragma once
#include <functional>
#include <string>

#include "moe/comm/communicator.h"
#include "moe/comm/device.h"

namespace moe::comm {

// True when this process was started by mpirun/mpiexec (from the
// environment, without initialising MPI).
bool launched_by_mpirun();

// "auto" -> "mpi" when started by mpirun (and MPI is built), else "thread".
// Throws ConfigError for a backend this build lacks (for nccl: saying
// whether the CUDA LibTorch, or the toolkit/NCCL at configure time, is missing).
std::string resolve_backend(const std::string& requested);

// Runs fn on every rank of this process: `thread_ranks` rank threads for the
// thread backend; this process's rank of the MPI world for mpi. For nccl, an
// NCCL communicator on the rank's GPU, select_device(device, node-local rank)
// (bound as the thread's current device), bootstrapped over MPI when started
// by mpirun, else over `thread_ranks` rank threads; `device` = cpu, or no
// usable GPU, is a ConfigError. The thread and mpi backends leave the device
// to the caller (they carry CPU and CUDA tensors alike).
// Errors propagate as exceptions (the first failing rank's for threads).
void run_on_world(const std::string& backend, int thread_ranks, double timeout_s,
                  const std::function<void(Communicator&)>& fn,
                  DeviceKind device = DeviceKind::Auto);

// At program exit: finalises MPI when it was used and nothing failed.
void finalize_backends();
// After a fatal error in a multi-process job: terminates every process of
// the job (MPI_Abort) so no peer hangs; a no-op when MPI was not used.
void abort_backends(int code);

}  // namespace moe::comm
