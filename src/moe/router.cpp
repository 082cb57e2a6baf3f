#include "moe/moe/router.h"


#include <cmath>
#include <limits>

#include "moe/core/error.h"
#include "moe/core/random.h"

namespace moe {

Router::Router(const MoeConfig& cfg, int64_t d_model, uint64_t seed)
    : cfg_(cfg), d_model_(d_model) {
  // Init N(0, (0.1/sqrt(D))^2): small logits keep early routing near uniform.
  weight = register_parameter(
      "weight", seeded_normal({cfg.experts, d_model}, 0.1 / std::sqrt(double(d_model)), seed));
  balance_bias = register_buffer("balance_bias", torch::zeros({cfg.experts}));
}

RouterOutput Router::forward(const torch::Tensor& x, bool training, uint64_t generator_seed) {
  MOE_CHECK_T(ShapeError, x.dim() == 2 && x.size(1) == d_model_,
              "router: input has shape [" << (x.dim() > 0 ? x.size(0) : 0) << ", "
                                          << (x.dim() > 1 ? x.size(1) : 0) << "] (dim " << x.dim()
                                          << ") but the router expects [T, " << d_model_
                                          << "] (model.d_model)");
  const int64_t E = cfg_.experts, k = cfg_.top_k;
  torch::Tensor input = x;
  // Jitter and noise come from seeded_*: the same draws on CPU and GPU.
  const auto opts = x.options();
  if (training && cfg_.router_jitter > 0)
    input = x * seeded_uniform(x.sizes(), 1.0 - cfg_.router_jitter, 1.0 + cfg_.router_jitter,
                               generator_seed, opts);
  RouterOutput out;
  out.logits = torch::mm(input, weight.t());
  if (cfg_.temperature != 1.0) out.logits = out.logits / cfg_.temperature;
  if (training && cfg_.router_noise_std > 0)
    out.logits = out.logits + seeded_normal(out.logits.sizes(), cfg_.router_noise_std,
                                            generator_seed ^ 0x5eed5eed5eedull, opts);
  out.scores = cfg_.score_fn == ScoreFn::Softmax ? torch::softmax(out.logits, -1)
                                                 : torch::sigmoid(out.logits);

  torch::Tensor selection;
  {
    torch::NoGradGuard ng;
    selection = out.scores.detach();
    if (cfg_.bias_update_rate > 0) selection = selection + balance_bias;
    if (cfg_.n_groups > 1 && cfg_.topk_groups < cfg_.n_groups) {
      const int64_t T = x.size(0), G = cfg_.n_groups;
      auto grouped = selection.view({T, G, E / G});
      auto group_score = std::get<0>(grouped.max(-1));                         // [T, G]
      auto keep_groups = std::get<1>(group_score.topk(cfg_.topk_groups, -1));  // [T, topk_groups]
      auto mask = torch::zeros({T, G}, opts.dtype(torch::kBool)).scatter_(1, keep_groups, true);
      selection = grouped.masked_fill(~mask.unsqueeze(-1), -std::numeric_limits<float>::infinity())
                      .view({T, E});
    }
    out.expert_idx = std::get<1>(selection.topk(k, -1, /*largest=*/true, /*sorted=*/true));
  }
  out.gate = out.scores.gather(1, out.expert_idx);
  if (cfg_.renormalize && k > 1) out.gate = out.gate / out.gate.sum(-1, true);
  return out;
}

void Router::update_balance_bias(const torch::Tensor& load) {
  MOE_CHECK_T(ShapeError, load.dim() == 1 && load.size(0) == cfg_.experts,
              "update_balance_bias: load has "
                  << load.numel() << " entries, expected moe.experts = " << cfg_.experts);
  if (cfg_.bias_update_rate <= 0) return;
  torch::NoGradGuard ng;
  auto l = load.to(torch::kFloat32);
  balance_bias.add_(torch::sign(l.mean() - l) * cfg_.bias_update_rate);
}

}  // namespace moe
