// Gradient synchronisation after backward.
//   replicated parameters: all-reduced (sum) over the world in buckets of
//     `bucket_mb`, divided by the world size;
//   expert parameters: all-reduced (sum) over the expert-DP group, divided by
//     the world size: each expert's gradient already holds the contributions
//     of every token its EP group routed to it, so dividing by the DP size
//     instead (the DeepSpeed #5618 class of bug) would overweight experts.
// Then every gradient equals that of the mean loss over the global batch.
#pragma once
#include <torch/types.h>

#include <vector>

#include "moe/comm/mesh.h"

namespace moe {

class TransformerLM;

class GradSync {
 public:
  GradSync(TransformerLM& model, comm::ProcessMesh& mesh, double bucket_mb);
  // Synchronises gradients; returns the global gradient norm (before
  // clipping) and scales all gradients so it is at most `clip` (0 = no clip).
  double synchronize_and_clip(double clip);

 private:
  void reduce(std::vector<torch::Tensor>& params, comm::Communicator& group);
  comm::ProcessMesh& mesh_;
  std::vector<torch::Tensor> shared_, expert_;
  int64_t bucket_bytes_;
};

}  // namespace moe
