#include "moe/train/evaluate.h"

#include <torch/nn/functional/loss.h>

#include <algorithm>

#include "moe/core/error.h"
#include "moe/model/transformer.h"
#include "moe/train/data.h"

namespace moe {

void require_validation_data(const DataSource& data, const Config& cfg) {
  if (data.val_windows() == 0)
    MOE_THROW(DataError, "no validation window of model.seq_len + 1 = "
                             << cfg.model.seq_len + 1 << " tokens in " << data.describe()
                             << ": raise data.val_fraction (now " << cfg.data.val_fraction
                             << "), add *_val_* token shards, or set train.eval_every=0");
}

EvalResult evaluate(TransformerLM& model, const DataSource& data, comm::ProcessMesh& mesh,
                    const Config& cfg) {
  require_validation_data(data, cfg);
  torch::NoGradGuard no_grad;
  comm::Communicator& world = mesh.world();
  const int64_t B = cfg.train.batch, S = cfg.model.seq_len, V = cfg.model.vocab;
  const int64_t W = world.size(), r = world.rank();
  int64_t N = cfg.train.eval_batches * B;
  if (data.val_windows() > 0) N = std::min(N, data.val_windows());
  const int64_t rounds = (N + W * B - 1) / (W * B);

  EvalResult res;
  res.windows = N;
  res.tokens = N * S;
  res.byte_level = data.byte_level();
  double loss_sum = 0;
  std::vector<std::vector<int64_t>> loads;
  for (int64_t j = 0; j < rounds; ++j) {
    std::vector<int64_t> windows;
    std::vector<double> weight;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t w = j * W * B + r * B + i;
      windows.push_back(w % N);
      weight.push_back(w < N ? 1.0 : 0.0);
    }
    Batch b = data.val_batch(windows);
    LMOutput out = model.forward(b.inputs, /*training=*/false);
    torch::Tensor ce = torch::nn::functional::cross_entropy(
        out.logits.view({-1, V}), b.targets.to(out.logits.device()).view({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    torch::Tensor per_window = ce.view({B, S}).to(torch::kFloat64).sum(1).cpu();
    loss_sum += (per_window * torch::tensor(weight, torch::kFloat64)).sum().item<double>();
    for (size_t l = 0; l < out.stats.size(); ++l) {
      if (loads.size() <= l) loads.emplace_back(cfg.moe.experts, 0);
      for (int64_t e = 0; e < cfg.moe.experts; ++e) loads[l][e] += out.stats[l].tokens_per_expert[e];
    }
  }
  torch::Tensor total = torch::tensor({loss_sum}, torch::kFloat64);
  world.all_reduce(total, comm::ReduceOp::Sum);
  res.loss = total.item<double>() / double(res.tokens);
  // Layer stats are EP-group-global: summing over the expert-DP group makes them world-global.
  for (auto& l : loads) {
    torch::Tensor lt = torch::tensor(l, torch::kInt64);
    mesh.expert_dp_group().all_reduce(lt, comm::ReduceOp::Sum);
    res.expert_load.emplace_back(lt.data_ptr<int64_t>(), lt.data_ptr<int64_t>() + lt.numel());
  }
  return res;
}

}  // namespace moe
