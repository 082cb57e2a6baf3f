// Which device a rank computes on: `parallel.device: auto | cpu | cuda`.
//
//   auto: CUDA when LibTorch has it and a GPU is visible, else the CPU;
//   cpu:  the CPU;
//   cuda: GPU (node-local rank) % (visible GPUs); a ConfigError (exit 2)
//         saying which is missing when the build's LibTorch has no CUDA or
//         no GPU is visible.
// Several ranks may share one GPU (thread ranks of one process, or more MPI
// ranks than GPUs on a node); ThreadComm and MpiComm stage CUDA tensors
// through host memory, NCCL needs 2.30+ for that (see nccl_comm.h).
#pragma once
#include <torch/types.h>

#include <string>

#include "moe/config/config.h"

namespace moe::comm {

class Communicator;

// parallel.device's values, parsed by the config layer.
using moe::DeviceKind;

// True when this build's LibTorch was built with CUDA (MOE_TORCH_CUDA).
bool torch_has_cuda();
// Visible CUDA devices: 0 on a CPU LibTorch or without a GPU.
int cuda_device_count();

// This process's rank on its node from the launcher's environment:
// OMPI_COMM_WORLD_LOCAL_RANK (Open MPI), SLURM_LOCALID (srun),
// MPI_LOCALRANKID (MPICH/Hydra), PMI_LOCAL_RANK, LOCAL_RANK; -1 when none is
// set. A set but malformed value is a ConfigError naming the variable.
int local_rank_from_env();

// The node-local rank of the calling rank of `world`: its thread rank for
// the thread backend (all ranks share this process), else the environment
// (local_rank_from_env), else an MPI shared-memory split of the world
// (collective over `world` in that case), else 0.
int node_local_rank(Communicator& world);

// The device for `requested` on the rank with this node-local rank:
// cuda:(local_rank % cuda_device_count()) or the CPU (see the top of this file).
// Throws ConfigError for `cuda` without a CUDA LibTorch or without a visible GPU.
torch::Device select_device(DeviceKind requested, int local_rank);

// Makes `device` the calling thread's current CUDA device (each rank thread
// calls it once); nothing for the CPU.
void bind_device(const torch::Device& device);

// Free memory of a CUDA device in bytes (cudaMemGetInfo); -1 for the CPU.
int64_t free_device_memory(const torch::Device& device);

// How many ranks of `world` run on the calling rank's host (same hostname;
// every thread rank of this process). Collective over `world`.
int ranks_on_this_host(Communicator& world);

// One line for the log: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3, 79 GiB)".
std::string describe_device(const torch::Device& device);

}  // namespace moe::comm
