// The differentiable pieces of the MoE data path (LibTorch autograd
// functions), on any device. Sums happen in a fixed order (slot 0, then
// slot 1, ...): no atomics, no index_add over duplicate rows, so results are
// bitwise reproducible. Notation as in dispatch_plan.h.
//
// Permute and unpermute are gathers (index_select) on every device; on CPU
// with float32 a hand-written loop over rows is used instead, because the
// benchmark shows it faster there (README, "CPU data path"). Both are tested
// against each other.
#pragma once
#include <torch/types.h>

#include <vector>

#include "moe/comm/communicator.h"
#include "moe/moe/dispatch_plan.h"

namespace moe {

// Wall time per MoE phase, forward and backward, accumulated (seconds). On a
// GPU these are host times (kernel launches), not kernel times.
struct PhaseTimes {
  enum Phase { Router, Permute, Dispatch, Experts, Combine, Unpermute, Count };
  double forward[Count] = {0, 0, 0, 0, 0, 0};
  double backward[Count] = {0, 0, 0, 0, 0, 0};
  static const char* name(int phase);
  void reset() { *this = PhaseTimes(); }
  double total(int phase) const { return forward[phase] + backward[phase]; }
};

// Which implementation the row gathers use. Auto = the CPU loops for float32
// CPU tensors, tensor gathers otherwise; Gather forces the tensor gathers
// (tests and `moe bench layer` compare the two).
enum class RowKernel { Auto, Gather };
void set_row_kernel(RowKernel kernel);
RowKernel row_kernel();

// send[r] = x[plan.row_token[r]] (zero for padding rows): [send_rows, D].
// Backward: grad_x[t] = sum over t's kept slots j (in order) of grad_send[row(t, j)].
torch::Tensor permute_tokens(const torch::Tensor& x, const DispatchPlan& plan,
                             PhaseTimes* times = nullptr);

// y[t] = sum over t's kept slots j (in order) of gate[t, j] * back[row(t, j)]:
// [T, D] in back's dtype, products and sums in gate's dtype (float32 in bf16
// training: the combine weights stay fp32). Differentiable in back and gate.
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

// How expert_mlp multiplies. SegmentMm: one product per segment written into
// slices of one output (mm_out); GroupedMm: at::_grouped_mm over int32
// offsets (CUDA, bf16, LibTorch >= 2.9). Auto picks GroupedMm where it exists.
enum class ExpertKernel { Auto, SegmentMm, GroupedMm };
bool grouped_mm_available(const torch::Tensor& x);

// Expert MLPs over segments of x: activation SwiGLU: y = (silu(x W1) * (x W3)) W2;
// GELU: y = gelu(x W1) W2. x [R, D]; w1, w3: [E_local, D, H]; w2: [E_local, H, D]
// (w3 undefined for GELU). Rows of x outside every segment give zero output
// and receive zero gradient.
torch::Tensor expert_mlp(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w3,
                         const torch::Tensor& w2, const std::vector<ExpertSegment>& segments,
                         bool swiglu, PhaseTimes* times = nullptr,
                         ExpertKernel kernel = ExpertKernel::Auto);

}  // namespace moe
