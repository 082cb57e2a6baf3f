// NcclComm: NCCL on CUDA tensors (grouped ncclSend/ncclRecv for all_to_all_v,
// ncclAllReduce, ncclAllGather, ncclBroadcast), bootstrapped by broadcasting
// the unique id over a CPU communicator (MPI or threads). Work is enqueued on
// the current CUDA stream; completion is polled so every collective honours
// the timeout, after which the communicator is torn down with ncclCommAbort.
// Built when the CUDA toolkit and NCCL are found; runs only with a
// CUDA-enabled LibTorch on a GPU machine.
#pragma once
#include "moe/comm/communicator.h"

namespace moe::comm {

class NcclComm : public Communicator {
 public:
  // Collective over `bootstrap`: every rank passes the CUDA device it uses.
  static std::unique_ptr<NcclComm> create(Communicator& bootstrap, int device, double timeout_s);
  ~NcclComm() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "nccl"; }
  void abort(const std::string& reason) override;

 protected:
  void do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                       const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                       const char* op) override;
  void do_all_reduce(torch::Tensor& tensor, ReduceOp op) override;
  torch::Tensor do_all_gather(const torch::Tensor& tensor) override;
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
