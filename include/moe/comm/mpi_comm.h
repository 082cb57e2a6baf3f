// MpiComm: Open MPI, one process per rank (launched by mpirun).
//
// all_to_all(_v) is built from non-blocking point-to-point messages, one per
// peer, so a timeout names exactly the peers whose data never came and a
// receive checks the row count each peer actually sent. The other
// collectives use MPI's non-blocking collectives, polled until done or the
// timeout passes. After a CommError the communicator is broken: the program
// aborts the MPI job (mpirun exits non-zero) instead of hanging in
// MPI_Finalize. A collective that times out pings its peers (every rank
// answers pings while it waits) and names those that do not answer, with
// their host: "rank 2 (node7) does not answer a liveness probe".
#pragma once
#include "moe/comm/communicator.h"

namespace moe::comm {

class MpiComm : public Communicator {
 public:
  // The world communicator (initialises MPI on first use).
  static std::unique_ptr<MpiComm> world(double timeout_s);
  // True when this process was started by mpirun/mpiexec (checked from the
  // environment, without initialising MPI).
  static bool launched_by_mpirun();
  // Finalises MPI if it was initialised here and nothing failed.
  static void finalize();
  // Terminates every process of the job with `code` (MPI_Abort).
  [[noreturn]] static void abort_job(int code);

  ~MpiComm() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }
  void abort(const std::string& reason) override;

  // This rank's index among the ranks of its node (MPI_Comm_split_type with
  // MPI_COMM_TYPE_SHARED). Collective over this communicator.
  int shared_memory_rank();

  // This process's host name (MPI_Get_processor_name).
  static std::string processor_name();
  // The host name (MPI_Get_processor_name) of every rank of this
  // communicator, by rank. Collective.
  std::vector<std::string> host_names();

  // The raw MPI_Alltoallv over the same buffers, for `moe bench comm`.
  void raw_alltoallv(const torch::Tensor& input, torch::Tensor& output,
                     const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows);

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

 private:
  explicit MpiComm(void* comm, double timeout_s, bool owned);
  void wait_collective(void* request, const char* op, uint64_t seq);
  [[noreturn]] void fail(const std::string& reason);
  // After a timeout: which peers of this group do not answer a liveness
  // probe (named with their host), for the error message.
  std::string silent_peers();

  void* comm_;  // MPI_Comm (kept opaque so this header does not need mpi.h)
  bool owned_;
  int rank_ = 0, size_ = 1;
  int world_rank_ = 0;
  uint64_t seq_ = 0;
};

}  // namespace moe::comm
