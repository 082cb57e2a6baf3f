#include "moe/moe/dispatch_plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>

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

DispatchPlan make_dispatch_plan(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                                int64_t experts, int64_t ep, double capacity_factor,
                                int64_t min_capacity, const std::string& policy, bool padded) {
  MOE_CHECK_T(ShapeError, expert_idx.dim() == 2 && expert_idx.scalar_type() == torch::kInt64,
              "dispatch plan: expert_idx must be [T, k] int64, got dim "
                  << expert_idx.dim() << " " << expert_idx.scalar_type());
  MOE_CHECK_T(
      ConfigError, experts % ep == 0,
      "dispatch plan: moe.experts = " << experts << " is not divisible by the EP size " << ep);
  MOE_CHECK_T(ConfigError, policy == "position" || policy == "probability",
              "moe.drop_policy = '" << policy << "': allowed position | probability");
  DispatchPlan p;
  p.tokens = expert_idx.size(0);
  p.top_k = expert_idx.size(1);
  p.experts = experts;
  p.ep = ep;
  p.capacity = expert_capacity(p.tokens, p.top_k, experts, capacity_factor, min_capacity);
  p.padded = padded && capacity_factor > 0;
  const int64_t S = p.tokens * p.top_k;

  torch::Tensor idx = expert_idx.contiguous();
  const int64_t* e_of = idx.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    MOE_CHECK_T(ShapeError, e_of[s] >= 0 && e_of[s] < experts,
                "dispatch plan: token " << s / p.top_k << " slot " << s % p.top_k
                                        << " chose expert " << e_of[s] << ", allowed 0.."
                                        << experts - 1);

  // Ranking of slots: position order, or by descending gate probability.
  std::vector<int64_t> order(S);
  std::iota(order.begin(), order.end(), 0);
  if (policy == "probability" && p.capacity > 0) {
    torch::Tensor g = gate.detach().to(torch::kFloat32).contiguous();
    MOE_CHECK_T(ShapeError, g.numel() == S,
                "dispatch plan: gate has " << g.numel() << " values, expected " << S);
    const float* gp = g.data_ptr<float>();
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return gp[a] > gp[b]; });
  }

  p.routed.assign(experts, 0);
  p.kept.assign(experts, 0);
  std::vector<int64_t> pos(S, -1);
  for (int64_t s : order) {
    int64_t e = e_of[s];
    int64_t n = p.routed[e]++;
    if (p.capacity == 0 || n < p.capacity) pos[s] = p.kept[e]++;
  }

  p.slot_expert = idx.view({S}).clone();
  p.slot_row = torch::empty({S}, torch::kInt64);
  int64_t* row_of = p.slot_row.data_ptr<int64_t>();
  std::vector<int64_t> offset(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e)
    offset[e + 1] = offset[e] + (p.padded ? p.capacity : p.kept[e]);
  p.send_rows = offset[experts];
  p.row_token = torch::full({p.send_rows}, -1, torch::kInt64);
  int64_t* tok_of = p.row_token.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    if (pos[s] < 0) {
      row_of[s] = -1;
      ++p.dropped;
      continue;
    }
    int64_t row = offset[e_of[s]] + pos[s];
    row_of[s] = row;
    tok_of[row] = s / p.top_k;
  }
  const int64_t el = p.experts_per_rank();
  p.peer_rows.assign(ep, 0);
  for (int64_t r = 0; r < ep; ++r) p.peer_rows[r] = offset[(r + 1) * el] - offset[r * el];
  return p;
}

}  // namespace moe
