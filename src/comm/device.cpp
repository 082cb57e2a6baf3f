#include "moe/comm/device.h"

#include <torch/cuda.h>
#include <torch/version.h>

#include <unistd.h>

#include <cerrno>
#include <functional>
#include <cstdlib>
#include <sstream>

#if MOE_TORCH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include "moe/comm/communicator.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

namespace moe::comm {

namespace {
std::string rank_name() {
  const int r = current_rank();
  return r >= 0 ? "rank " + std::to_string(r) : std::string("this process");
}
}  // namespace

bool torch_has_cuda() {
  return MOE_TORCH_CUDA != 0;
}

int cuda_device_count() {
  if (!torch_has_cuda()) return 0;
  return static_cast<int>(torch::cuda::device_count());
}

int local_rank_from_env() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                          "PMI_LOCAL_RANK", "LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    if (!v || !*v) continue;
    char* end = nullptr;
    errno = 0;
    const long r = std::strtol(v, &end, 10);
    MOE_CHECK_T(ConfigError, errno == 0 && end && *end == '\0' && r >= 0 && r < (1L << 20),
                "environment variable " << var << " = '" << v
                                        << "' is not a node-local rank (an integer >= 0)");
    return static_cast<int>(r);
  }
  return -1;
}

int node_local_rank(Communicator& world) {
  if (world.backend_name() == "thread") return world.rank();
  const int env = local_rank_from_env();
  if (env >= 0) return env;
#if MOE_HAVE_MPI
  if (auto* mpi = dynamic_cast<MpiComm*>(&world)) return mpi->shared_memory_rank();
#endif
  return 0;
}

torch::Device select_device(DeviceKind requested, int local_rank) {
  MOE_CHECK_T(ConfigError, local_rank >= 0,
              "select_device: node-local rank " << local_rank << " of " << rank_name()
                                                << " is negative");
  if (requested == DeviceKind::Cpu) return torch::Device(torch::kCPU);
  const int count = cuda_device_count();
  if (requested == DeviceKind::Auto && count == 0) return torch::Device(torch::kCPU);
  MOE_CHECK_T(ConfigError, torch_has_cuda(),
              "parallel.device = 'cuda' but this build's LibTorch "
                  << TORCH_VERSION << " has no CUDA (" << rank_name()
                  << "): rebuild against a CUDA LibTorch (README, GPUs), or use "
                     "parallel.device=cpu or auto");
  if (count == 0) {
    const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
    MOE_THROW(ConfigError, "parallel.device = 'cuda' but no CUDA GPU is visible to "
                               << rank_name() << " (LibTorch " << TORCH_VERSION
                               << " has CUDA; CUDA_VISIBLE_DEVICES="
                               << (vis ? std::string("'") + vis + "'" : std::string("unset"))
                               << "): run on a GPU node, or use parallel.device=cpu or auto");
  }
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % count));
}

void bind_device(const torch::Device& device) {
  if (!device.is_cuda()) return;
#if MOE_TORCH_CUDA
  c10::cuda::set_device(device.index());
#else
  MOE_THROW(ConfigError, "bind_device(" << device << "): this build's LibTorch has no CUDA");
#endif
}

int64_t free_device_memory(const torch::Device& device) {
  if (!device.is_cuda()) return -1;
#if MOE_TORCH_CUDA
  c10::cuda::CUDAGuard guard(device.index());
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) == cudaSuccess) return static_cast<int64_t>(free);
#endif
  return -1;
}

int ranks_on_this_host(Communicator& world) {
  if (world.backend_name() == "thread") return world.size();
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  const torch::Tensor mine =
      torch::tensor({static_cast<int64_t>(std::hash<std::string>()(name) >> 1)});
  const torch::Tensor all = world.all_gather(mine);
  return static_cast<int>(all.eq(mine.item<int64_t>()).sum().item<int64_t>());
}

std::string describe_device(const torch::Device& device) {
  std::ostringstream os;
  os << device;
#if MOE_TORCH_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess)
      os << " (" << prop.name << ", " << (prop.totalGlobalMem >> 30) << " GiB)";
  }
#endif
  return os.str();
}

}  // namespace moe::comm
