// ThreadComm: N ranks as threads of one process, exchanging through shared
// memory. The single-machine simulation: needs neither MPI nor a GPU.
//
// Protocol of every collective (per group, sequence number s):
//   1. post: each rank publishes its tensor handles and counts in its slot;
//   2. arrive: wait until every member posted s (or abort / timeout);
//   3. copy: each rank reads what it needs from its peers' posted tensors
//      and checks that sizes agree;
//   4. depart: wait until every member has finished copying s, so no buffer
//      is reused while a peer still reads it.
// A rank that throws, returns early, stalls past the timeout or disagrees on
// sizes aborts the world: every waiting rank raises CommError naming it.
#pragma once
#include <functional>
#include <memory>

#include "moe/comm/communicator.h"

namespace moe::comm {

struct ThreadWorld;
struct ThreadGroup;

class ThreadComm : public Communicator {
 public:
  // The `n` communicators of a new world (rank i at index i).
  static std::vector<std::unique_ptr<ThreadComm>> create_world(int n, double timeout_s);

  int rank() const override { return rank_; }
  int size() const override;
  std::string backend_name() const override { return "thread"; }
  void abort(const std::string& reason) override;
  // Marks this rank as gone (its thread returned): peers waiting for it fail
  // at once instead of waiting for the timeout.
  void mark_exited();

  // What a rank publishes for one collective (defined in thread_comm.cpp).
  struct Post;

  ThreadComm(std::shared_ptr<ThreadWorld> world, std::shared_ptr<ThreadGroup> group, int rank,
             double timeout_s);
  ~ThreadComm() override;

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
  // Phases 1-2; returns the sequence number. Throws CommError on abort/timeout.
  uint64_t arrive(Post post);
  // Phase 4.
  void depart(uint64_t seq, const char* op);
  [[noreturn]] void fail(const std::string& reason);

  std::shared_ptr<ThreadWorld> world_;
  std::shared_ptr<ThreadGroup> group_;
  int rank_;
  uint64_t seq_ = 0;
};

// Runs fn(comm) on `n` rank threads (the log prefix and error messages name
// each thread's rank). Returns when all have finished; if any rank failed,
// the world is aborted so no peer hangs, and the first failure is rethrown.
void run_ranks(int n, double timeout_s, const std::function<void(Communicator&)>& fn);

}  // namespace moe::comm
