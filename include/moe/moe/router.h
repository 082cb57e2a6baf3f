// Router: a linear gate (no bias) from tokens to expert scores, top-k
// selection and gate weights.
//   logits = (x W^T) / temperature       (+ Gaussian noise when training and router_noise_std > 0)
//   scores = softmax(logits) | sigmoid(logits)
//   choice = top-k of (scores + balance_bias), optionally limited to the best
//            topk_groups of n_groups expert groups (group score = its best expert)
//   gate   = scores at the chosen experts, renormalised to sum to 1 if asked
// balance_bias is the auxiliary-loss-free balancing bias: it steers selection
// only, never the gate weights, and is updated from global loads.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include "moe/config/config.h"

namespace moe {

struct RouterOutput {
  torch::Tensor logits;      // [T, E] after temperature (and noise)
  torch::Tensor scores;      // [T, E] softmax or sigmoid of logits
  torch::Tensor expert_idx;  // [T, k] int64, best first
  torch::Tensor gate;        // [T, k] differentiable gate weights
};

class Router : public torch::nn::Module {
 public:
  // Weights drawn from a generator seeded by `seed`: identical on every rank.
  Router(const MoeConfig& cfg, int64_t d_model, uint64_t seed);

  // x: [T, D] float32. `generator_seed` drives noise and jitter (training
  // only). Non-finite logits are not checked here: MoELayer counts them with
  // its routing totals and stops every rank of the EP group together.
  RouterOutput forward(const torch::Tensor& x, bool training, uint64_t generator_seed = 0);

  // bias_i += rate * sign(mean_load - load_i); `load` is [E] global token counts.
  void update_balance_bias(const torch::Tensor& load);

  torch::Tensor weight;        // [E, D] parameter
  torch::Tensor balance_bias;  // [E] buffer

 private:
  MoeConfig cfg_;
  int64_t d_model_;
};

}  // namespace moe
