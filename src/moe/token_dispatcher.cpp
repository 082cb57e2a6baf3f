#include "moe/moe/token_dispatcher.h"

#include "moe/core/error.h"
#include "moe/core/timer.h"

namespace moe {

TokenDispatcher::TokenDispatcher(const MoeConfig& cfg, comm::Communicator& ep_group)
    : cfg_(cfg), ep_(&ep_group) {}

DispatchPlan TokenDispatcher::plan_slots(const torch::Tensor& expert_idx,
                                         const torch::Tensor& gate) {
  Stopwatch sw;
  const int R = ep_->size();
  // Across ranks, capacity mode pads each expert to C rows: fixed-size buffers.
  DispatchPlan p = moe::plan_slots(expert_idx, gate, cfg_.experts, R, cfg_.capacity_factor,
                                   cfg_.min_capacity, cfg_.drop_policy, /*padded=*/R > 1);
  times.forward[PhaseTimes::Router] += sw.seconds();
  return p;
}

DispatchHandle TokenDispatcher::exchange(DispatchPlan plan, torch::Tensor& totals) {
  Stopwatch sw;
  const int R = ep_->size();
  const int64_t E = plan.experts, EL = plan.experts_per_rank();
  // fill[s * E_local + le]: rows source rank s sends to this rank's local expert le.
  torch::Tensor fill;
  if (R > 1) {
    fill = ep_->all_to_all(plan.kept.view({E, 1})).view({E});
    if (totals.defined() && totals.numel() > 0) ep_->all_reduce(totals, comm::ReduceOp::Sum);
  }
  // The layer's one device-to-host copy: the row counts the all-to-all needs
  // (kept per expert, fill per source and local expert) and the routing totals.
  std::vector<torch::Tensor> parts = {plan.kept.to(torch::kFloat64)};
  if (R > 1) parts.push_back(fill.to(torch::kFloat64));
  const bool with_totals = totals.defined() && totals.numel() > 0;
  if (with_totals) parts.push_back(totals.to(torch::kFloat64));
  torch::Tensor host = torch::cat(parts).cpu();
  const double* v = host.data_ptr<double>();

  DispatchHandle h;
  std::vector<int64_t> kept(E), fp(R > 1 ? E : 0);
  for (int64_t e = 0; e < E; ++e) kept[e] = static_cast<int64_t>(v[e]);
  for (int64_t i = 0; i < static_cast<int64_t>(fp.size()); ++i)
    fp[i] = static_cast<int64_t>(v[E + i]);
  if (with_totals) h.totals = host.narrow(0, E + fp.size(), totals.numel()).clone();
  finish_dispatch_plan(plan, kept);
  h.send_rows = plan.peer_rows;
  if (R == 1) {
    h.recv_rows = h.send_rows;
    int64_t off = 0;
    for (int64_t e = 0; e < E; ++e) {
      h.segments.push_back({e, off, kept[e]});
      off += plan.padded ? plan.capacity : kept[e];
    }
  } else {
    // Receive layout: (source rank, local expert, position); padded mode
    // reserves C rows per (source, expert), of which fill[s, le] are used.
    h.recv_rows.assign(R, 0);
    std::vector<int64_t> src_off(R + 1, 0);
    for (int s = 0; s < R; ++s) {
      for (int64_t le = 0; le < EL; ++le) h.recv_rows[s] += fp[s * EL + le];
      if (plan.padded) h.recv_rows[s] = EL * plan.capacity;
      src_off[s + 1] = src_off[s] + h.recv_rows[s];
    }
    for (int64_t le = 0; le < EL; ++le)
      for (int s = 0; s < R; ++s) {
        int64_t start = src_off[s];
        for (int64_t l = 0; l < le; ++l) start += plan.padded ? plan.capacity : fp[s * EL + l];
        h.segments.push_back({le, start, fp[s * EL + le]});
      }
  }
  h.plan = std::move(plan);
  times.forward[PhaseTimes::Dispatch] += sw.seconds();
  return h;
}

torch::Tensor TokenDispatcher::dispatch(const torch::Tensor& x, const DispatchHandle& h) {
  torch::Tensor send = permute_tokens(x, h.plan, &times);
  if (ep_->size() == 1) return send;
  return all_to_all_autograd(send, h.send_rows, h.recv_rows, *ep_, &times, PhaseTimes::Dispatch);
}

torch::Tensor TokenDispatcher::combine(const torch::Tensor& expert_out, const torch::Tensor& gate,
                                       const DispatchHandle& h) {
  torch::Tensor back = ep_->size() == 1 ? expert_out
                                        : all_to_all_autograd(expert_out, h.recv_rows, h.send_rows,
                                                              *ep_, &times, PhaseTimes::Combine);
  return unpermute_tokens(back, gate, h.plan, &times);
}

}  // namespace moe
