// DispatchPlan: where every (token, slot) goes, computed from the router's
// choices with tensor ops on their device. Deterministic: slots are ranked by
// position (token order, then slot order) or by gate probability (ties by
// position), and each expert keeps its first C slots in that ranking.
//
// Notation (shared by the data-path headers):
//   T tokens on this rank, k = top_k slots per token, S = T * k slots,
//   E experts (global), R = EP group size, E_local = E / R, D = d_model,
//   H = d_expert, C = capacity per expert:
//   C = max(min_capacity, ceil(capacity_factor * T * k / E)); 0 = dropless.
//
// Send-buffer layout, ordered (peer, local expert, position):
//   padded : E * C rows; slot -> row e * C + pos; unused rows are padding
//            (capacity mode across ranks: fixed-size all_to_all buffers)
//   compact: sum(kept) rows; slot -> row offset_e + pos (dropless mode, and
//            capacity mode on a single rank, where padding would buy nothing)
// Expert e lives on rank e / E_local as local expert e % E_local.
#pragma once
#include <torch/types.h>

#include <vector>

#include "moe/config/config.h"

namespace moe {

struct DispatchPlan {
  int64_t tokens = 0, top_k = 0, experts = 0, ep = 1;
  int64_t capacity = 0;  // C; 0 in dropless mode
  bool padded = false;   // layout of the send buffer (see above)

  // On the router's device:
  torch::Tensor slot_expert;  // [S] int64
  torch::Tensor slot_row;     // [S] int64: send-buffer row, -1 when dropped
  torch::Tensor routed;       // [E] int64: slots that chose each expert (before drops)
  torch::Tensor kept;         // [E] int64: slots kept per expert
  // Filled by finish_dispatch_plan once the row counts are on the host:
  torch::Tensor row_token;        // [send_rows] int64: token of each row, -1 for padding
  torch::Tensor row_slot;         // [send_rows] int64: slot of each row, -1 for padding
  std::vector<int64_t> peer_rows;  // [R] rows sent to each peer (host)
  int64_t send_rows = 0;
  int64_t dropped = 0;  // slots dropped (host)

  int64_t experts_per_rank() const { return experts / ep; }
  double drop_fraction() const {
    return tokens > 0 ? double(dropped) / double(tokens * top_k) : 0.0;
  }
};

int64_t expert_capacity(int64_t tokens, int64_t top_k, int64_t experts, double capacity_factor,
                        int64_t min_capacity);

// The device part: slot_expert, slot_row, routed, kept. No host copy; the
// expert ids must already be in [0, E) (the router guarantees it).
DispatchPlan plan_slots(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                        int64_t experts, int64_t ep, double capacity_factor, int64_t min_capacity,
                        DropPolicy policy, bool padded);
// The rest, given `kept` on the host ([E], the values of plan.kept): per-peer
// rows, send_rows, dropped, and the row -> token / slot maps (on the device).
void finish_dispatch_plan(DispatchPlan& plan, const std::vector<int64_t>& kept_host);

// Both steps, checking the expert ids (ShapeError naming the first bad slot).
// expert_idx [T, k] int64; gate [T, k] (used by the probability policy).
// capacity_factor 0 = dropless. `padded` asks for the padded layout (ignored
// in dropless mode).
DispatchPlan make_dispatch_plan(const torch::Tensor& expert_idx, const torch::Tensor& gate,
                                int64_t experts, int64_t ep, double capacity_factor,
                                int64_t min_capacity, DropPolicy policy, bool padded = true);

}  // namespace moe
