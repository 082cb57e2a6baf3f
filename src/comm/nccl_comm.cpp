#include "moe/comm/nccl_comm.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <thread>

#if !MOE_TORCH_CUDA
#error "nccl_comm.cpp needs a CUDA LibTorch (CMake builds it only when MOE_TORCH_CUDA is on)"
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe/core/error.h"
#include "moe/core/log.h"

namespace moe::comm {

namespace {
using Clock = std::chrono::steady_clock;

ncclComm_t nc(void* p) {
  return static_cast<ncclComm_t>(p);
}

// Work goes on LibTorch's current stream of the device, so it is ordered
// after the kernels that produced the tensors and before those that use them.
cudaStream_t current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

// (host, GPU) identity of a device, to find ranks that share one GPU.
int64_t gpu_identity(int device) {
  char bus[64] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess)
    std::snprintf(bus, sizeof bus, "device-%d", device);
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return static_cast<int64_t>(std::hash<std::string>{}(std::string(host) + "/" + bus) >> 1);
}

ncclDataType_t nccl_type(c10::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return ncclFloat32;
    case torch::kFloat64:
      return ncclFloat64;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kFloat16:
      return ncclFloat16;
    case torch::kInt64:
      return ncclInt64;
    case torch::kInt32:
      return ncclInt32;
    default:
      return ncclUint8;
  }
}

#define MOE_NCCL_CALL(expr, what)                                                                \
  do {                                                                                           \
    ncclResult_t moe_nccl_rc_ = (expr);                                                          \
    if (moe_nccl_rc_ != ncclSuccess && moe_nccl_rc_ != ncclInProgress)                           \
      fail(std::string(what) + " failed: " + ncclGetErrorString(moe_nccl_rc_) + " (" #expr ")"); \
  } while (0)

#define MOE_CUDA_CALL(expr, what)                                                           \
  do {                                                                                      \
    cudaError_t moe_cuda_rc_ = (expr);                                                      \
    if (moe_cuda_rc_ != cudaSuccess)                                                        \
      MOE_THROW(CommError,                                                                  \
                what << " failed: " << cudaGetErrorString(moe_cuda_rc_) << " (" #expr ")"); \
  } while (0)

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so initialisation and collectives can be abandoned on timeout
  return config;
}
}  // namespace

int NcclComm::runtime_version() {
  int v = 0;
  ncclGetVersion(&v);
  return v;
}

bool NcclComm::multi_rank_gpu_allowed() {
  const char* env = std::getenv("NCCL_MULTI_RANK_GPU_ENABLE");
  return runtime_version() >= 23000 && env && std::string(env) == "1";
}

torch::Device NcclComm::data_device() const {
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_));
}

std::unique_ptr<NcclComm> NcclComm::create(Communicator& bootstrap, int device, double timeout_s) {
  int visible = 0;
  MOE_CUDA_CALL(cudaGetDeviceCount(&visible), "cudaGetDeviceCount on rank " << bootstrap.rank());
  MOE_CHECK_T(ConfigError, device >= 0 && device < visible,
              "NCCL rank " << bootstrap.rank() << ": CUDA device " << device
                           << " does not exist; " << visible
                           << " visible (CUDA_VISIBLE_DEVICES="
                           << (std::getenv("CUDA_VISIBLE_DEVICES") ? std::getenv("CUDA_VISIBLE_DEVICES") : "unset")
                           << ")");
  MOE_CUDA_CALL(cudaSetDevice(device), "cudaSetDevice(" << device << ") on rank " << bootstrap.rank());
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // Ranks sharing one GPU: NCCL before 2.30 refuses (init fails or hangs),
  // so every rank checks the gathered (host, GPU) list and fails alike first.
  if (!multi_rank_gpu_allowed()) {
    torch::Tensor all = bootstrap.all_gather(torch::full({1}, gpu_identity(device), torch::kInt64));
    const int64_t* id = all.data_ptr<int64_t>();
    for (int a = 0; a < bootstrap.size(); ++a)
      for (int b = a + 1; b < bootstrap.size(); ++b)
        if (id[a] == id[b]) {
          const int v = runtime_version();
          MOE_THROW(ConfigError,
                    "parallel.backend = 'nccl': ranks "
                        << a << " and " << b << " share one GPU of one host, which NCCL "
                        << v / 10000 << "." << v / 100 % 100 << "." << v % 100
                        << (v >= 23000 ? " allows only with NCCL_MULTI_RANK_GPU_ENABLE=1 (export it)"
                                       : " refuses (it needs NCCL >= 2.30 and NCCL_MULTI_RANK_GPU_ENABLE=1)")
                        << "; use one rank per GPU, or parallel.backend=mpi or thread, which "
                           "stage CUDA tensors through host memory (seen on rank "
                        << bootstrap.rank() << ", cuda:" << device << ")");
        }
  }
  ncclUniqueId id;
  torch::Tensor id_bytes = torch::zeros({static_cast<int64_t>(sizeof id)}, torch::kUInt8);
  if (bootstrap.rank() == 0) {
    ncclResult_t rc = ncclGetUniqueId(&id);
    if (rc != ncclSuccess)
      MOE_THROW(CommError, "ncclGetUniqueId failed: " << ncclGetErrorString(rc));
    std::memcpy(id_bytes.data_ptr(), &id, sizeof id);
  }
  bootstrap.broadcast(id_bytes, 0);
  std::memcpy(&id, id_bytes.data_ptr(), sizeof id);
  ncclComm_t comm = nullptr;
  ncclConfig_t config = nonblocking_config();
  ncclResult_t rc = ncclCommInitRankConfig(&comm, bootstrap.size(), id, bootstrap.rank(), &config);
  if (rc != ncclSuccess && rc != ncclInProgress)
    MOE_THROW(CommError, "ncclCommInitRankConfig failed on rank " << bootstrap.rank() << " (cuda:"
                                                                  << device << "): "
                                                                  << ncclGetErrorString(rc));
  std::unique_ptr<NcclComm> out(new NcclComm(comm, device, timeout_s));
  out->rank_ = bootstrap.rank();  // for messages until NCCL reports it
  out->size_ = bootstrap.size();
  out->wait_ready("ncclCommInitRankConfig");
  ncclCommUserRank(comm, &out->rank_);
  ncclCommCount(comm, &out->size_);
  // A barrier over the bootstrap so no rank proceeds with a half-built world.
  bootstrap.barrier();
  return out;
}

NcclComm::NcclComm(void* comm, int device, double timeout_s) : comm_(comm), device_(device) {
  set_timeout_s(timeout_s);
}

NcclComm::~NcclComm() {
  if (comm_ && !aborted_) ncclCommDestroy(nc(comm_));
}

void NcclComm::abort(const std::string& reason) {
  MOE_LOG(Error) << "aborting NCCL communicator: " << reason;
  if (comm_ && !aborted_) ncclCommAbort(nc(comm_));
  aborted_ = true;
}

void NcclComm::fail(const std::string& reason) {
  abort(reason);
  MOE_THROW(CommError, "NCCL rank " << rank_ << " (cuda:" << device_ << "): " << reason);
}

void NcclComm::check_device(const torch::Tensor& t, const char* op, const char* arg) const {
  MOE_CHECK_T(ShapeError, t.device().is_cpu() || (t.device().is_cuda() && t.device().index() == device_),
              op << ": " << arg << " is on " << t.device() << " but the NCCL communicator of rank "
                 << rank_ << " uses cuda:" << device_ << " (CPU tensors are staged through it)");
}

void NcclComm::wait_ready(const char* what) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s_));
  for (;;) {
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(nc(comm_), &state);
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(std::string(what) + " failed: " + ncclGetErrorString(state));
    if (Clock::now() > deadline) {
      std::ostringstream why;
      why << what << " did not complete within " << timeout_s_ << " s on rank " << rank_;
      fail(why.str());
    }
    std::this_thread::yield();
  }
}

void NcclComm::wait(const char* op, uint64_t seq) {
  wait_ready(op);  // the enqueue itself may be in progress for a non-blocking communicator
  cudaStream_t stream = current_stream(device_);
  cudaEvent_t done;
  MOE_CUDA_CALL(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
  MOE_CUDA_CALL(cudaEventRecord(done, stream), "cudaEventRecord");
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s_));
  for (;;) {
    cudaError_t q = cudaEventQuery(done);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) {
      cudaEventDestroy(done);
      fail(std::string(op) + " failed: " + cudaGetErrorString(q));
    }
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(nc(comm_), &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      cudaEventDestroy(done);
      fail(std::string(op) + " failed asynchronously: " + ncclGetErrorString(state));
    }
    if (Clock::now() > deadline) {
      cudaEventDestroy(done);
      std::ostringstream why;
      why << op << " #" << seq << " did not complete within " << timeout_s_ << " s on rank "
          << rank_ << ": a peer is stalled, dead, or in a different collective";
      fail(why.str());
    }
    std::this_thread::yield();
  }
  cudaEventDestroy(done);
}

void NcclComm::do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                               const char* op) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, op << " refused: this NCCL communicator was aborted");
  const uint64_t seq = ++seq_;
  const int64_t rb = row_bytes(input);
  cudaStream_t stream = current_stream(device_);
  // NCCL cannot detect a size disagreement (it would hang or corrupt), so the
  // counts are checked first unless this is the count exchange itself.
  if (std::strcmp(op, "exchange_counts") != 0) {
    torch::Tensor sent = torch::tensor(send_rows, torch::kInt64).to(input.device());
    torch::Tensor got = torch::empty_like(sent);
    MOE_NCCL_CALL(ncclGroupStart(), op);
    for (int p = 0; p < size_; ++p) {
      MOE_NCCL_CALL(ncclSend(sent.data_ptr<int64_t>() + p, 1, ncclInt64, p, nc(comm_), stream), op);
      MOE_NCCL_CALL(ncclRecv(got.data_ptr<int64_t>() + p, 1, ncclInt64, p, nc(comm_), stream), op);
    }
    MOE_NCCL_CALL(ncclGroupEnd(), op);
    wait(op, seq);
    torch::Tensor host = got.cpu();
    for (int p = 0; p < size_; ++p)
      if (host.data_ptr<int64_t>()[p] != recv_rows[p]) {
        std::ostringstream why;
        why << "rank " << p << " sends " << host.data_ptr<int64_t>()[p] << " rows to rank " << rank_
            << ", which expected " << recv_rows[p] << " (" << op << " #" << seq << ")";
        fail(why.str());
      }
  }
  const char* src = static_cast<const char*>(input.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  int64_t soff = 0, roff = 0;
  MOE_NCCL_CALL(ncclGroupStart(), op);
  for (int p = 0; p < size_; ++p) {
    if (send_rows[p] > 0)
      MOE_NCCL_CALL(ncclSend(src + soff * rb, send_rows[p] * rb, ncclUint8, p, nc(comm_), stream),
                    op);
    if (recv_rows[p] > 0)
      MOE_NCCL_CALL(ncclRecv(dst + roff * rb, recv_rows[p] * rb, ncclUint8, p, nc(comm_), stream),
                    op);
    soff += send_rows[p];
    roff += recv_rows[p];
  }
  MOE_NCCL_CALL(ncclGroupEnd(), op);
  wait(op, seq);
}

void NcclComm::do_all_reduce(torch::Tensor& tensor, ReduceOp op) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, "all_reduce refused: this NCCL communicator was aborted");
  const uint64_t seq = ++seq_;
  ncclRedOp_t nop = op == ReduceOp::Max ? ncclMax : op == ReduceOp::Avg ? ncclAvg : ncclSum;
  if (op == ReduceOp::Avg && !tensor.is_floating_point()) nop = ncclSum;
  MOE_NCCL_CALL(
      ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                    nccl_type(tensor.scalar_type()), nop, nc(comm_), current_stream(device_)),
      "all_reduce");
  wait("all_reduce", seq);
  if (op == ReduceOp::Avg && !tensor.is_floating_point()) tensor.copy_(tensor.div(size_, "floor"));
}

void NcclComm::do_reduce_scatter(const torch::Tensor& input, torch::Tensor& out, ReduceOp op) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, "reduce_scatter refused: this NCCL communicator was aborted");
  const uint64_t seq = ++seq_;
  ncclRedOp_t nop = op == ReduceOp::Max ? ncclMax : op == ReduceOp::Avg ? ncclAvg : ncclSum;
  if (op == ReduceOp::Avg && !input.is_floating_point()) nop = ncclSum;
  MOE_NCCL_CALL(ncclReduceScatter(input.data_ptr(), out.data_ptr(), out.numel(),
                                  nccl_type(input.scalar_type()), nop, nc(comm_),
                                  current_stream(device_)),
                "reduce_scatter");
  wait("reduce_scatter", seq);
  if (op == ReduceOp::Avg && !input.is_floating_point()) out.copy_(out.div(size_, "floor"));
}

torch::Tensor NcclComm::do_all_gather(const torch::Tensor& tensor) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, "all_gather refused: this NCCL communicator was aborted");
  const uint64_t seq = ++seq_;
  std::vector<int64_t> shape = tensor.sizes().vec();
  shape[0] *= size_;
  torch::Tensor out = torch::empty(shape, tensor.options());
  MOE_NCCL_CALL(
      ncclAllGather(tensor.data_ptr(), out.data_ptr(), tensor.numel() * tensor.element_size(),
                    ncclUint8, nc(comm_), current_stream(device_)),
      "all_gather");
  wait("all_gather", seq);
  return out;
}

void NcclComm::do_broadcast(torch::Tensor& tensor, int root) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, "broadcast refused: this NCCL communicator was aborted");
  const uint64_t seq = ++seq_;
  MOE_NCCL_CALL(
      ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                    ncclUint8, root, nc(comm_), current_stream(device_)),
      "broadcast");
  wait("broadcast", seq);
}

void NcclComm::do_barrier() {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  torch::Tensor one =
      torch::ones({1}, torch::TensorOptions().dtype(torch::kInt32).device(data_device()));
  do_all_reduce(one, ReduceOp::Sum);
}

std::unique_ptr<Communicator> NcclComm::do_split(int color, int key) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  MOE_CHECK_T(CommError, !aborted_, "split refused: this NCCL communicator was aborted");
  ncclComm_t child = nullptr;
  ncclConfig_t config = nonblocking_config();
  MOE_NCCL_CALL(ncclCommSplit(nc(comm_), color, key, &child, &config), "split");
  wait_ready("split");
  std::unique_ptr<NcclComm> out(new NcclComm(child, device_, timeout_s_));
  out->wait_ready("split (child)");
  ncclCommUserRank(child, &out->rank_);
  ncclCommCount(child, &out->size_);
  return out;
}

}  // namespace moe::comm
