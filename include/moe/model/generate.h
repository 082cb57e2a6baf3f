// Autoregressive sampling from a TransformerLM with a KV cache: the prompt
// is encoded once, then each new token runs one position through the model
// against the cached keys and values.
//
// The context is at most model.seq_len tokens (the positions the model was
// trained on and its rotary tables cover): a longer prompt keeps its last
// seq_len tokens, and when the cache is full it is rebuilt from the newest
// seq_len / 2 tokens, which then sit at positions 0 .. seq_len / 2 - 1.
//
// Build the model dropless (moe.capacity_factor = 0) for generation: with a
// capacity, which tokens are dropped depends on the others in the same
// forward, so the prompt's encoding and the one-token steps would route
// differently from a full forward of the same text.
#pragma once
#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace moe {

class TransformerLM;

struct SamplingOptions {
  int64_t tokens = 64;       // new tokens to draw
  double temperature = 1.0;  // logits are divided by it; 0 = greedy (argmax)
  int64_t top_k = 0;         // draw among the k most likely tokens only (0 = all)
  uint64_t seed = 0;         // the same seed draws the same tokens
};

// Draws opts.tokens tokens after `prompt` (ids in [0, model.vocab), at least
// one); `on_token` sees each as it is drawn. UsageError for an empty or
// out-of-range prompt or options out of range.
std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& opts,
                              const std::function<void(int64_t)>& on_token = {});

// One draw from float logits [V]: argmax at temperature 0, else a sample of
// softmax(logits / temperature) restricted to the top_k largest (0 = all).
int64_t sample_token(const torch::Tensor& logits, double temperature, int64_t top_k,
                     at::Generator& generator);

}  // namespace moe
