// The differentiable pieces of the MoE data path (LibTorch autograd
// functions). Each backward is written out so sums happen in a fixed order:
// no atomics, no index_add over duplicate rows, so results are bitwise
// reproducible.
#pragma once
#include <torch/types.h>

#include <vector>

#include "moe/comm/communicator.h"
#include "moe/moe/dispatch_plan.h"

namespace moe {

// Wall time per MoE phase, forward and backward, accumulated (seconds).
struct PhaseTimes {
  enum Phase { Router, Permute, Dispatch, Experts, Combine, Unpermute, Count };
  double forward[Count] = {0, 0, 0, 0, 0, 0};
  double backward[Count] = {0, 0, 0, 0, 0, 0};
  static const char* name(int phase);
  void reset() { *this = PhaseTimes(); }
  double total(int phase) const { return forward[phase] + backward[phase]; }
};

// send[r] = x[plan.row_token[r]] (zero for padding rows). Backward:
// grad_x[t] = sum over t's kept slots j (in order) of grad_send[row(t, j)].
torch::Tensor permute_tokens(const torch::Tensor& x, const DispatchPlan& plan,
                             PhaseTimes* times = nullptr);

// y[t] = sum over t's kept slots j (in order) of gate[t, j] * back[row(t, j)].
// Differentiable in `back` and `gate`.
torch::Tensor unpermute_tokens(const torch::Tensor& back, const torch::Tensor& gate,
                               const DispatchPlan& plan, PhaseTimes* times = nullptr);

// Differentiable all_to_all_v: backward sends the gradients back with the
// counts swapped. `phase` says where its time is booked.
torch::Tensor all_to_all_autograd(const torch::Tensor& x, const std::vector<int64_t>& send_rows,
                                  const std::vector<int64_t>& recv_rows, comm::Communicator& comm,
                                  PhaseTimes* times, int phase);

// A contiguous run of rows belonging to one local expert.
struct ExpertSegment {
  int64_t expert, start, rows;
};

// Expert MLPs over segments of x: one matrix product per segment, no per-token
// work. activation "swiglu": y = (silu(x W1) * (x W3)) W2; "gelu": y = gelu(x W1) W2.
// w1, w3: [E_local, D, H]; w2: [E_local, H, D] (w3 unused for gelu). Rows of
// x outside every segment give zero output and receive zero gradient.
torch::Tensor expert_mlp(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w3,
                         const torch::Tensor& w2, const std::vector<ExpertSegment>& segments,
                         bool swiglu, PhaseTimes* times = nullptr);

}  // namespace moe
