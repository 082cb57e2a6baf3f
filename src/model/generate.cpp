#include "moe/model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "moe/core/error.h"
#include "moe/model/transformer.h"

namespace moe {

int64_t sample_token(const torch::Tensor& logits, double temperature, int64_t top_k,
                     at::Generator& generator) {
  MOE_CHECK_T(ShapeError, logits.dim() == 1,
              "sample_token: logits must be [vocab], got " << logits.sizes());
  torch::Tensor l = logits.to(torch::kCPU, torch::kFloat32);
  if (temperature == 0) return l.argmax().item<int64_t>();
  l = l / temperature;
  if (top_k > 0 && top_k < l.size(0)) {
    const torch::Tensor kth = std::get<0>(l.topk(top_k)).min();
    l = l.masked_fill(l < kth, -std::numeric_limits<float>::infinity());
  }
  return torch::multinomial(torch::softmax(l, -1), 1, false, generator).item<int64_t>();
}

std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& opts,
                              const std::function<void(int64_t)>& on_token) {
  const ModelConfig& m = model.config().model;
  MOE_CHECK_T(UsageError, !prompt.empty(), "generation needs a prompt of at least one token");
  for (size_t i = 0; i < prompt.size(); ++i)
    MOE_CHECK_T(UsageError, prompt[i] >= 0 && prompt[i] < m.vocab,
                "prompt token " << i << " = " << prompt[i] << " is outside [0, " << m.vocab
                                << ") (model.vocab)");
  MOE_CHECK_T(UsageError, opts.tokens >= 0, "--tokens " << opts.tokens << " must be >= 0");
  MOE_CHECK_T(UsageError, std::isfinite(opts.temperature) && opts.temperature >= 0,
              "--temperature " << opts.temperature << " must be >= 0 (0 = greedy)");
  MOE_CHECK_T(UsageError, opts.top_k >= 0, "--top-k " << opts.top_k << " must be >= 0 (0 = all)");
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
  const int64_t window = m.seq_len;
  std::vector<int64_t> context = prompt, drawn;
  KVCache cache;
  // Runs context[from:] through the model after the cache; the last position's logits.
  auto feed = [&](size_t from) {
    std::vector<int64_t> ids(context.begin() + static_cast<std::ptrdiff_t>(from), context.end());
    torch::Tensor t = torch::tensor(ids, torch::kInt64).view({1, -1});
    return model.forward(t, /*training=*/false, 0, &cache).logits[0][-1];
  };
  const int64_t n = static_cast<int64_t>(context.size());
  torch::Tensor logits = feed(static_cast<size_t>(std::max<int64_t>(0, n - window)));
  for (int64_t i = 0; i < opts.tokens; ++i) {
    const int64_t next = sample_token(logits, opts.temperature, opts.top_k, generator);
    drawn.push_back(next);
    context.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 == opts.tokens) break;
    if (cache.length == window) {
      cache = KVCache();
      logits = feed(context.size() - static_cast<size_t>(std::max<int64_t>(1, window / 2)));
    } else {
      logits = feed(context.size() - 1);
    }
  }
  return drawn;
}

}  // namespace moe
