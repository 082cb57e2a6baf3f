// Activation recomputation (train.recompute), as torch.utils.checkpoint with
// use_reentrant=True: `fn` runs without recording its graph and only `inputs`
// are kept for backward; backward runs `fn` again with grad enabled and
// backpropagates through that fresh graph (parameter gradients accumulate as
// usual, input gradients flow on).
//
// `fn` must compute the same values when re-run: its random choices come from
// seeds it captures (router noise and jitter are seeded per layer and step),
// never from a global generator; collectives inside it run again in backward,
// in the same order on every rank because every rank runs the same backward.
// Outputs that do not need gradients may be returned (e.g. a zero aux loss).
#pragma once
#include <torch/types.h>

#include <functional>
#include <vector>

namespace moe {

using RecomputeFn = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

// Runs fn(inputs) under recomputation when grad mode is on; calls it plainly otherwise.
std::vector<torch::Tensor> recompute(RecomputeFn fn, const std::vector<torch::Tensor>& inputs);

}  // namespace moe
