// DispatchPlan: where every (token, slot) goes, computed locally from the
// router's choices. Deterministic: slots are ranked by position (token order,
// then slot order) or by gate probability (ties by position), and each
// expert keeps its first C slots in that ranking.
//
//   capacity C = max(min_capacity, ceil(capacity_factor * T * k / E)); dropless
//   (capacity_factor 0) keeps everything.
//
// Send-buffer layout, ordered (peer, local expert, position):
//   padded : E * C rows; slot -> row e * C + pos; unused rows are padding
//            (capacity mode across ranks: fixed-size all_to_all buffers)
//   compact: sum(kept) rows; slot -> row offset_e + pos (dropless mode, and
//            capacity mode on a single rank, where padding would buy nothing)
// Expert e lives on rank e / E_local as local expert e % E_local.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace moe {

struct DispatchPlan {
  int64_t tokens = 0, top_k = 0, experts = 0, ep = 1;
  int64_t capacity = 0;  // C; 0 in dropless mode
  bool padded = false;   // layout of the send buffer (see above)

  torch::Tensor slot_expert;       // [T*k] int64
  torch::Tensor slot_row;          // [T*k] int64: send-buffer row, -1 when dropped
  torch::Tensor row_token;         // [send_rows] int64: token of each row, -1 for padding
  std::vector<int64_t> routed;     // [E] slots that chose each expert (before drops)
  std::vector<int64_t> kept;       // [E] slots kept per expert
  std::vector<int64_t> peer_rows;  // [ep] rows sent to each peer
  int64_t send_rows = 0;
  int64_t dropped = 0;  // slots dropped

  int64_t experts_per_rank() const { return experts / ep; }
  double drop_fraction() const {
    return tokens > 0 ? double(dropped) / double(tokens * top_k) : 0.0;
  }
};

// expert_idx [T, k] int64; gate [T, k] (used by the probability policy).
// capacity_factor 0 = dropless. policy: "position" | "probability".
// `padded` asks for the padded layout (ignored in dropless mode).
DispatchPlan make_dispatch_plan(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                                int64_t experts, int64_t ep, double capacity_factor,
                                int64_t min_capacity, const std::string& policy,
                                bool padded = true);

int64_t expert_capacity(int64_t tokens, int64_t top_k, int64_t experts, double capacity_factor,
                        int64_t min_capacity);

}  // namespace moe
