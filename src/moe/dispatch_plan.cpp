#include "moe/moe/dispatch_plan.h"

#include <algorithm>
#include <cmath>

#include "moe/core/error.h"

namespace moe {

int64_t expert_capacity(int64_t tokens, int64_t top_k, int64_t experts, double capacity_factor,
                        int64_t min_capacity) {
  if (capacity_factor <= 0) return 0;
  // A tiny epsilon keeps exact products (1.25 * 4096 * 2 / 8) from rounding up.
  int64_t c = static_cast<int64_t>(
      std::ceil(capacity_factor * double(tokens * top_k) / double(experts) - 1e-9));
  return std::max(min_capacity, c);
}

DispatchPlan plan_slots(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                        int64_t experts, int64_t ep, double capacity_factor, int64_t min_capacity,
                        DropPolicy policy, bool padded) {
  MOE_CHECK_T(ShapeError, expert_idx.dim() == 2 && expert_idx.scalar_type() == torch::kInt64,
              "dispatch plan: expert_idx must be [T, k] int64, got dim "
                  << expert_idx.dim() << " " << expert_idx.scalar_type());
  MOE_CHECK_T(
      ConfigError, ep >= 1 && experts % ep == 0,
      "dispatch plan: moe.experts = " << experts << " is not divisible by the EP size " << ep);
  DispatchPlan p;
  p.tokens = expert_idx.size(0);
  p.top_k = expert_idx.size(1);
  p.experts = experts;
  p.ep = ep;
  p.capacity = expert_capacity(p.tokens, p.top_k, experts, capacity_factor, min_capacity);
  p.padded = padded && p.capacity > 0;
  const int64_t S = p.tokens * p.top_k, E = experts;
  const auto i64 = expert_idx.options().dtype(torch::kInt64);

  torch::Tensor e = expert_idx.reshape({S}).contiguous();  // [S]
  p.slot_expert = e;
  // Ranking of slots: position order, or by descending gate probability
  // (a stable sort keeps position order among equal gates).
  torch::Tensor order;  // [S] slots in ranking order
  if (policy == DropPolicy::Probability && p.capacity > 0) {
    MOE_CHECK_T(ShapeError, gate.numel() == S,
                "dispatch plan: gate has " << gate.numel() << " values, expected " << S);
    order = std::get<1>(
        gate.detach().reshape({S}).to(torch::kFloat32).sort(/*stable=*/true, 0, /*descending=*/true));
  } else {
    order = torch::arange(S, i64);
  }
  // Position of each slot among its expert's slots, in ranking order: a stable
  // sort of the ranked slots by expert groups each expert's slots in rank order.
  torch::Tensor e_ranked = e.index_select(0, order);
  torch::Tensor by_expert = std::get<1>(e_ranked.sort(/*stable=*/true, 0, false));
  p.routed = torch::bincount(e, {}, E).to(torch::kInt64);  // [E]
  torch::Tensor first = p.routed.cumsum(0) - p.routed;      // [E] exclusive prefix
  torch::Tensor e_sorted = e_ranked.index_select(0, by_expert);
  torch::Tensor pos_sorted = torch::arange(S, i64) - first.index_select(0, e_sorted);
  torch::Tensor pos = torch::empty({S}, i64).index_put_({order.index_select(0, by_expert)},
                                                        pos_sorted);  // [S], unique indices
  torch::Tensor keep;
  if (p.capacity > 0) {
    keep = pos < p.capacity;
    p.kept = p.routed.clamp_max(p.capacity);
  } else {
    keep = torch::ones({S}, i64.dtype(torch::kBool));
    p.kept = p.routed;
  }
  torch::Tensor rows_per_expert = p.padded ? torch::full({E}, p.capacity, i64) : p.kept;
  torch::Tensor offset = rows_per_expert.cumsum(0) - rows_per_expert;  // [E]
  p.slot_row = torch::where(keep, offset.index_select(0, e) + pos, torch::full({}, -1, i64));
  return p;
}

void finish_dispatch_plan(DispatchPlan& p, const std::vector<int64_t>& kept) {
  const int64_t E = p.experts, el = p.experts_per_rank(), S = p.tokens * p.top_k;
  MOE_CHECK(static_cast<int64_t>(kept.size()) == E,
            "finish_dispatch_plan: " << kept.size() << " kept counts for " << E << " experts");
  p.peer_rows.assign(p.ep, 0);
  int64_t total_kept = 0;
  for (int64_t x = 0; x < E; ++x) {
    p.peer_rows[x / el] += p.padded ? p.capacity : kept[x];
    total_kept += kept[x];
  }
  p.send_rows = 0;
  for (auto r : p.peer_rows) p.send_rows += r;
  p.dropped = S - total_kept;
  // Row -> slot by a scatter with unique targets; dropped slots write to one
  // extra row that is cut off, so no host-side filtering is needed.
  const auto i64 = p.slot_row.options();
  torch::Tensor target = torch::where(p.slot_row >= 0, p.slot_row,
                                      torch::full({}, p.send_rows, i64));
  torch::Tensor row_slot = torch::full({p.send_rows + 1}, -1, i64);
  row_slot.index_put_({target}, torch::arange(S, i64));
  p.row_slot = row_slot.narrow(0, 0, p.send_rows);
  p.row_token = torch::where(p.row_slot >= 0, p.row_slot.div(p.top_k, "floor"), p.row_slot);
}

DispatchPlan make_dispatch_plan(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                                int64_t experts, int64_t ep, double capacity_factor,
                                int64_t min_capacity, DropPolicy policy, bool padded) {
  MOE_CHECK_T(ShapeError, expert_idx.dim() == 2 && expert_idx.scalar_type() == torch::kInt64,
              "dispatch plan: expert_idx must be [T, k] int64, got dim "
                  << expert_idx.dim() << " " << expert_idx.scalar_type());
  torch::Tensor bad = ((expert_idx < 0) | (expert_idx >= experts)).reshape({-1}).nonzero();
  if (bad.size(0) > 0) {
    const int64_t s = bad[0][0].item<int64_t>(), k = expert_idx.size(1);
    MOE_THROW(ShapeError, "dispatch plan: token " << s / k << " slot " << s % k << " chose expert "
                                                  << expert_idx.reshape({-1})[s].item<int64_t>()
                                                  << ", allowed 0.." << experts - 1);
  }
  DispatchPlan p =
      plan_slots(expert_idx, gate, experts, ep, capacity_factor, min_capacity, policy, padded);
  torch::Tensor kept = p.kept.cpu();
  finish_dispatch_plan(p, std::vector<int64_t>(kept.data_ptr<int64_t>(),
                                               kept.data_ptr<int64_t>() + kept.numel()));
  return p;
}

}  // namespace moe
