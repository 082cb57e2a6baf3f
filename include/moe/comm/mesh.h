// ProcessMesh: the expert-parallel x data-parallel layout of the world.
//
// Rank order (documented contract): world rank r has
//   ep_rank = r % ep,  dp_rank = r / ep,
// so an EP group (ranks that exchange tokens) is `ep` consecutive ranks, which
// keeps the all-to-all inside a node when ranks are packed per node.
//   EP group        : ranks with the same dp_rank  {dp_rank*ep + e : e < ep}
//   expert-DP group : ranks with the same ep_rank  {d*ep + ep_rank : d < dp}
//                     (they hold the same experts; expert gradients are
//                     all-reduced here)
//   shared params   : replicated on every rank; all-reduced over the world.
#pragma once
#include <memory>

#include "moe/comm/communicator.h"

namespace moe::comm {

class ProcessMesh {
 public:
  // Collective over `world`: splits it into EP and expert-DP groups.
  ProcessMesh(Communicator& world, int ep, int dp);

  int ep() const { return ep_; }
  int dp() const { return dp_; }
  int ep_rank() const { return world_->rank() % ep_; }
  int dp_rank() const { return world_->rank() / ep_; }
  static int world_rank_of(int ep_rank, int dp_rank, int ep) { return dp_rank * ep + ep_rank; }

  Communicator& world() { return *world_; }
  Communicator& ep_group() { return *ep_group_; }
  Communicator& expert_dp_group() { return *expert_dp_group_; }

 private:
  Communicator* world_;
  int ep_, dp_;
  std::unique_ptr<Communicator> ep_group_;
  std::unique_ptr<Communicator> expert_dp_group_;
};

// Every rank checks that all ranks agree on world size, backend and config
// hash; a disagreement is a CommError naming the first disagreeing rank.
void check_world_consistency(Communicator& world, uint64_t config_hash);

}  // namespace moe::comm
