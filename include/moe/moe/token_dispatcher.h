// TokenDispatcher: moves routed tokens to the ranks that own their experts
// and the expert outputs back. It owns the dispatch plan, the receive layout
// that combine reuses (a handle, as DeepEP's Buffer hands out), the EP
// communicator and the phase timing. Notation as in dispatch_plan.h.
//
//   DispatchPlan p   = dispatcher.plan_slots(expert_idx, gate);  // device only
//   DispatchHandle h = dispatcher.exchange(std::move(p), totals);
//   recv  = dispatcher.dispatch(x, h);         // permute + all-to-all  [recv_rows, D]
//   ...experts on h.segments...
//   y     = dispatcher.combine(out, gate, h);  // all-to-all + weighted unpermute  [T, D]
//
// Everything runs as tensor ops on the input's device. plan() is where the
// host learns the row counts the all-to-all needs: exchange() makes the
// layer's only device-to-host copy, and the layer's global routing totals
// ride along with it (summed over the EP group in the same step).
#pragma once
#include <torch/types.h>

#include <vector>

#include "moe/comm/communicator.h"
#include "moe/config/config.h"
#include "moe/moe/dispatch_plan.h"
#include "moe/moe/functions.h"

namespace moe {

// The receive layout of one dispatch, reused by combine (and by backward,
// through the autograd nodes).
struct DispatchHandle {
  DispatchPlan plan;
  std::vector<int64_t> send_rows;       // [R] rows this rank sends to each peer
  std::vector<int64_t> recv_rows;       // [R] rows it receives from each peer
  std::vector<ExpertSegment> segments;  // receive-buffer rows of each local expert
  torch::Tensor totals;                 // the routing totals, summed over the group (CPU)
};

class TokenDispatcher {
 public:
  TokenDispatcher(const MoeConfig& cfg, comm::Communicator& ep_group);

  // The plan's device part (slot -> row), on expert_idx's device.
  DispatchPlan plan_slots(const torch::Tensor& expert_idx, const torch::Tensor& gate);
  // Exchanges the counts with the EP group and completes the plan and the
  // receive layout. `totals` ([n] float64 on the plan's device, may be
  // undefined) is summed over the group in place and comes back on the host
  // as DispatchHandle::totals, in the same device-to-host copy as the counts.
  DispatchHandle exchange(DispatchPlan plan, torch::Tensor& totals);
  // x [T, D] -> the rows this rank's experts process, [sum(recv_rows), D].
  torch::Tensor dispatch(const torch::Tensor& x, const DispatchHandle& h);
  // Expert output rows -> y [T, D] = sum of gate-weighted outputs of each token's kept slots.
  torch::Tensor combine(const torch::Tensor& expert_out, const torch::Tensor& gate,
                        const DispatchHandle& h);

  comm::Communicator& group() { return *ep_; }
  PhaseTimes times;  // accumulated; reset by the caller

 private:
  MoeConfig cfg_;
  comm::Communicator* ep_;
};

}  // namespace moe
