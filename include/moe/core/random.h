// Seeded random tensors that are the same on every device: drawn on the CPU
// from a generator seeded by `seed`, then copied to the requested device and
// dtype. Initialisation and router noise use them, so a run on a GPU starts
// from the same weights (and draws the same noise) as the same run on CPU.
#pragma once
#include <torch/types.h>

#include <cstdint>

namespace moe {

// N(0, std^2) of `shape`, float32 drawn, then cast to options' dtype/device.
torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed,
                            const torch::TensorOptions& options = {});
// U(lo, hi) of `shape`, as seeded_normal.
torch::Tensor seeded_uniform(at::IntArrayRef shape, double lo, double hi, uint64_t seed,
                             const torch::TensorOptions& options = {});

}  // namespace moe
