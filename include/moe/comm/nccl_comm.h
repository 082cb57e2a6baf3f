// NcclComm: NCCL on CUDA tensors (grouped ncclSend/ncclRecv for all_to_all_v,
// ncclAllReduce, ncclAllGather, ncclBroadcast), bootstrapped by broadcasting
// the unique id over a CPU communicator (MPI or threads). Work is enqueued on
// the current CUDA stream; completion is polled so every collective honours
// the timeout, after which the communicator is torn down with ncclCommAbort.
// Built only against a CUDA LibTorch with the CUDA toolkit and NCCL found
// (CMake: MOE_HAVE_NCCL implies MOE_TORCH_CUDA).
//
// CUDA tensors must be on the communicator's GPU; CPU tensors (the control
// plane: count exchange, consistency checks, scalars) are staged through it
// by Communicator. Two ranks on one GPU: NCCL before 2.30 refuses it; from
// 2.30 it works with NCCL_MULTI_RANK_GPU_ENABLE=1 (create() says so).
#pragma once
#include "moe/comm/communicator.h"

namespace moe::comm {

class NcclComm : public Communicator {
 public:
  // Collective over `bootstrap` (MPI or thread ranks): every rank passes the
  // CUDA device it uses. Throws CommError naming the rank on failure or timeout.
  static std::unique_ptr<NcclComm> create(Communicator& bootstrap, int device, double timeout_s);
  // The NCCL library in use at run time, as NCCL_VERSION_CODE (2.30.3 -> 23003).
  static int runtime_version();
  // True when this NCCL lets several ranks share one GPU (2.30 and later,
  // with NCCL_MULTI_RANK_GPU_ENABLE=1 in the environment).
  static bool multi_rank_gpu_allowed();
  ~NcclComm() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "nccl"; }
  torch::Device data_device() const override;
  int device() const { return device_; }
  void abort(const std::string& reason) override;

 protected:
  void do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                       const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                       const char* op) override;
  void do_all_reduce(torch::Tensor& tensor, ReduceOp op) override;
  torch::Tensor do_all_gather(const torch::Tensor& tensor) override;
  void do_reduce_scatter(const torch::Tensor& input, torch::Tensor& out, ReduceOp op) override;
  void do_broadcast(torch::Tensor& tensor, int root) override;
  void do_barrier() override;
  std::unique_ptr<Communicator> do_split(int color, int key) override;
  void check_device(const torch::Tensor& t, const char* op, const char* arg) const override;

 private:
  NcclComm(void* comm, int device, double timeout_s);
  // Waits for the work enqueued on the stream (and NCCL's async state) with the timeout.
  void wait(const char* op, uint64_t seq);
  void wait_ready(const char* what);
  [[noreturn]] void fail(const std::string& reason);

  void* comm_ = nullptr;  // ncclComm_t
  int device_ = 0;
  int rank_ = 0, size_ = 1;
  uint64_t seq_ = 0;
  bool aborted_ = false;
};

}  // namespace moe::comm
