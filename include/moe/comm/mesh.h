// ProcessMesh: the expert-parallel x data-parallel layout of the world, and
// where it lies on the hosts.
//
// Each world rank gets a mesh position p; then
//   ep_rank = p % ep,  dp_rank = p / ep,
// so an EP group (ranks that exchange tokens) is `ep` consecutive positions.
//   EP group        : positions with the same dp_rank  {dp_rank*ep + e : e < ep}
//   expert-DP group : positions with the same ep_rank  {d*ep + ep_rank : d < dp}
//                     (they hold the same experts; expert gradients are
//                     all-reduced here)
//   shared params   : replicated on every rank; all-reduced over the world.
// Positions follow the hosts (hosts numbered by their lowest rank):
//   inside hosts (default): ranks ordered by (host, rank), so every EP group
//     lies inside one host when parallel.ep divides the ranks per host, and
//     the all-to-all stays off the network. Where ranks are packed per host
//     (mpirun -p / ppr, srun), the position is the world rank.
//   span hosts (parallel.ep_span_hosts): ranks ordered by (index on their
//     host, host), so consecutive positions are on different hosts.
// World rank 0 is position 0 either way.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/communicator.h"

namespace moe::comm {

// Which host each world rank runs on.
struct HostMap {
  std::vector<int> host_of_rank;   // world rank -> host index
  std::vector<std::string> names;  // host index -> name
};

// Collective over `world`: every rank's host name (the MPI processor name, or
// this machine's hostname for the thread backend), hosts numbered by their lowest rank.
HostMap gather_hosts(Communicator& world);

class ProcessMesh {
 public:
  // Collective over `world`: gathers the hosts and splits the world into EP
  // and expert-DP groups.
  ProcessMesh(Communicator& world, int ep, int dp, bool ep_span_hosts = false);
  // With a given host map (the thread backend simulates several hosts in tests).
  ProcessMesh(Communicator& world, int ep, int dp, bool ep_span_hosts, HostMap hosts);

  int ep() const { return ep_; }
  int dp() const { return dp_; }
  int ep_rank() const { return position_ % ep_; }
  int dp_rank() const { return position_ / ep_; }
  // The world rank at mesh position (ep_rank, dp_rank).
  int world_rank_at(int ep_rank, int dp_rank) const { return order_[dp_rank * ep_ + ep_rank]; }

  const HostMap& hosts() const { return hosts_; }
  // True when some EP group has ranks on more than one host.
  bool ep_spans_hosts() const;
  // For the log: "2 hosts x 2 ranks per host; EP group 0: ranks 0,1 on node1; ...".
  std::string describe() const;

  Communicator& world() { return *world_; }
  Communicator& ep_group() { return *ep_group_; }
  Communicator& expert_dp_group() { return *expert_dp_group_; }

 private:
  Communicator* world_;
  int ep_, dp_;
  HostMap hosts_;
  std::vector<int> order_;  // mesh position -> world rank
  int position_ = 0;        // this rank's position
  std::unique_ptr<Communicator> ep_group_;
  std::unique_ptr<Communicator> expert_dp_group_;
};

// Every rank checks that all ranks agree on world size, backend and config
// hash; a disagreement is a CommError naming the first disagreeing rank.
void check_world_consistency(Communicator& world, uint64_t config_hash);

}  // namespace moe::comm
