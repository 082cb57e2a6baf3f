// MoELayer: four steps, each on the input's device --
//   route    : router (fp32), dispatch plan, losses, global statistics
//   dispatch : permute + all-to-all to the experts' ranks (TokenDispatcher)
//   experts  : the local expert MLPs on their rows
//   combine  : all-to-all back + gate-weighted unpermute (+ shared experts).
// Notation as in dispatch_plan.h.
//
// Every rank of the EP group holds experts [ep_rank * E_local, (ep_rank+1) *
// E_local) and calls forward on its own tokens; all ranks must call forward
// together (the exchanges are collectives), also when they route no token to
// some expert.
//
// Losses (returned so the trainer adds and logs them):
//   aux = alpha * E * sum_i f_i * P_i, f_i = slots routed to i / (T * k),
//         P_i = mean router probability of i. With aux_loss_scope "global"
//         f is counted over the whole EP group's tokens and the differentiable
//         term uses this rank's P (its mean over the group is the global aux);
//         with "local" both are this rank's.
//   z   = beta * mean over tokens of logsumexp(logits)^2
//
// Expert weights: w1 (gate) and w3 (up) [E_local, D, H], w2 (down)
// [E_local, H, D], initialised N(0, 1/D) and N(0, 1/H) from a generator
// seeded by (seed, global expert id): the same experts at any EP size and on
// any device. Parameters stay float32 (the master weights); forward computes
// in x's dtype (bf16 training casts the weights on use), except the router,
// its softmax/top-k and the combine weights, which stay float32.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <vector>

#include "moe/comm/communicator.h"
#include "moe/config/config.h"
#include "moe/moe/dispatch_plan.h"
#include "moe/moe/functions.h"
#include "moe/moe/router.h"
#include "moe/moe/token_dispatcher.h"

namespace moe {

// Global routing statistics of one layer, summed over the EP group: one
// packed float64 vector (one all-reduce, one host copy) with named fields.
struct RoutingTotals {
  explicit RoutingTotals(int64_t experts, const torch::TensorOptions& options = {});
  explicit RoutingTotals(int64_t experts, torch::Tensor packed);
  int64_t experts;
  torch::Tensor packed;  // [3E + 4] float64
  torch::Tensor routed() const { return packed.narrow(0, 0, experts); }  // slots per expert
  torch::Tensor dropped() const { return packed.narrow(0, experts, 1); }
  torch::Tensor tokens() const { return packed.narrow(0, experts + 1, 1); }
  torch::Tensor prob_sum() const { return packed.narrow(0, experts + 2, experts); }
  torch::Tensor entropy_sum() const { return packed.narrow(0, 2 * experts + 2, 1); }
  torch::Tensor gate_sum() const { return packed.narrow(0, 2 * experts + 3, experts); }
  torch::Tensor nonfinite_logits() const { return packed.narrow(0, 3 * experts + 3, 1); }
};

struct LayerStats {
  std::vector<int64_t> tokens_per_expert;  // global: slots routed to each expert (before drops)
  std::vector<double> gate_per_expert;     // global: sum of the gate weights of those slots
  int64_t tokens = 0;                      // global tokens
  int64_t capacity = 0;                    // this rank's C (0 = dropless)
  double drop_fraction = 0;                // global dropped slots / (tokens * k)
  double router_entropy = 0;               // mean over global tokens, nats
  double max_load = 0, mean_load = 0;      // of tokens_per_expert
  double aux_loss = 0, z_loss = 0;         // values over the EP group (aux) / this rank (z)
};

struct MoEOutput {
  torch::Tensor y;         // [T, D]
  torch::Tensor aux_loss;  // scalar, differentiable (already scaled by aux_loss_coef)
  torch::Tensor z_loss;    // scalar, differentiable (already scaled by z_loss_coef)
  LayerStats stats;
};

class MoELayer : public torch::nn::Module {
 public:
  MoELayer(const MoeConfig& cfg, int64_t d_model, comm::Communicator& ep_group, uint64_t seed);

  // x: [T, D]. `noise_seed` drives router noise/jitter when training.
  MoEOutput forward(const torch::Tensor& x, bool training = true, uint64_t noise_seed = 0);

  int64_t experts_per_rank() const { return experts_local_; }
  int64_t first_expert() const { return first_expert_; }
  // Replaces the local experts' weights with rows of full [E, ...] tensors.
  void load_global_experts(const torch::Tensor& w1, const torch::Tensor& w3,
                           const torch::Tensor& w2);
  // Aux-loss-free balancing: updates the router bias from the last global loads.
  void update_balance_bias(const LayerStats& stats);

  // Phase times of the last forward/backward calls (accumulated; reset by the caller).
  PhaseTimes& times() { return dispatcher_.times; }

  std::shared_ptr<Router> router;
  torch::Tensor w1, w3, w2;                       // local experts
  torch::Tensor shared_w1, shared_w3, shared_w2;  // [1, D, S*H] ... (when shared_experts > 0)

 private:
  struct Routing {
    RouterOutput router;
    DispatchHandle handle;
  };
  Routing route(const torch::Tensor& x, bool training, uint64_t noise_seed, MoEOutput& out);
  torch::Tensor experts(const torch::Tensor& rows, const std::vector<ExpertSegment>& segments);

  MoeConfig cfg_;
  int64_t d_model_;
  comm::Communicator* ep_;
  int64_t experts_local_, first_expert_;
  TokenDispatcher dispatcher_;
};

}  // namespace moe
