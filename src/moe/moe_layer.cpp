#include "moe/moe/moe_layer.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "moe/core/error.h"
#include "moe/core/timer.h"

namespace moe {

namespace {
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t h = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull + (a << 6) + (a >> 2));
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 29);
}

torch::Tensor normal_init(std::vector<int64_t> shape, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::normal(0.0, std, shape, gen);
}
}  // namespace

MoELayer::MoELayer(const MoeConfig& cfg, int64_t d_model, comm::Communicator& ep_group,
                   uint64_t seed)
    : cfg_(cfg), d_model_(d_model), ep_(&ep_group) {
  const int ep = ep_group.size();
  MOE_CHECK_T(ConfigError, cfg.experts % ep == 0,
              "moe.experts = " << cfg.experts << " is not divisible by the EP group size " << ep);
  MOE_CHECK_T(ConfigError, cfg.top_k <= cfg.experts,
              "moe.top_k = " << cfg.top_k << " exceeds moe.experts = " << cfg.experts);
  experts_local_ = cfg.experts / ep;
  first_expert_ = ep_group.rank() * experts_local_;
  router = register_module("router", std::make_shared<Router>(cfg, d_model, mix(seed, 0xA11CE)));
  const int64_t D = d_model, H = cfg.d_expert;
  std::vector<torch::Tensor> a, b, c;
  for (int64_t le = 0; le < experts_local_; ++le) {
    uint64_t s = mix(seed, 1000 + first_expert_ + le);
    a.push_back(normal_init({D, H}, 1.0 / std::sqrt(double(D)), mix(s, 1)));
    b.push_back(normal_init({D, H}, 1.0 / std::sqrt(double(D)), mix(s, 3)));
    c.push_back(normal_init({H, D}, 1.0 / std::sqrt(double(H)), mix(s, 2)));
  }
  w1 = register_parameter("w1", torch::stack(a));
  if (cfg.activation == "swiglu") w3 = register_parameter("w3", torch::stack(b));
  w2 = register_parameter("w2", torch::stack(c));
  if (cfg.shared_experts > 0) {
    const int64_t HS = cfg.shared_experts * H;
    shared_w1 = register_parameter(
        "shared_w1", normal_init({1, D, HS}, 1.0 / std::sqrt(double(D)), mix(seed, 7)));
    if (cfg.activation == "swiglu")
      shared_w3 = register_parameter(
          "shared_w3", normal_init({1, D, HS}, 1.0 / std::sqrt(double(D)), mix(seed, 8)));
    shared_w2 = register_parameter(
        "shared_w2", normal_init({1, HS, D}, 1.0 / std::sqrt(double(HS)), mix(seed, 9)));
  }
}

void MoELayer::load_global_experts(const torch::Tensor& g1, const torch::Tensor& g3,
                                   const torch::Tensor& g2) {
  torch::NoGradGuard ng;
  auto slice = [&](const torch::Tensor& g, torch::Tensor& w, const char* name) {
    if (!w.defined()) return;
    std::vector<int64_t> want = w.sizes().vec();
    want[0] = cfg_.experts;
    MOE_CHECK_T(ShapeError, g.sizes().vec() == want,
                "load_global_experts: " << name << " has shape " << comm::shape_str(g)
                                        << ", expected [" << want[0] << ", " << want[1] << ", "
                                        << want[2] << "]");
    w.copy_(g.narrow(0, first_expert_, experts_local_));
  };
  slice(g1, w1, "w1");
  slice(g3, w3, "w3");
  slice(g2, w2, "w2");
}

void MoELayer::update_balance_bias(const LayerStats& stats) {
  router->update_balance_bias(torch::tensor(stats.tokens_per_expert, torch::kInt64));
}

MoEOutput MoELayer::forward(const torch::Tensor& x, bool training, uint64_t noise_seed) {
  MOE_CHECK_T(ShapeError, x.dim() == 2 && x.size(1) == d_model_,
              "MoE layer: input has hidden size "
                  << (x.dim() == 2 ? x.size(1) : -1) << " (shape " << comm::shape_str(x)
                  << "), the layer expects [T, " << d_model_ << "] (model.d_model)");
  const int64_t T = x.size(0), E = cfg_.experts, k = cfg_.top_k, EL = experts_local_;
  const int ep = ep_->size();
  const bool swiglu = cfg_.activation == "swiglu";
  MoEOutput out;

  // ---- router, plan, losses, statistics
  Stopwatch sw;
  RouterOutput ro = router->forward(x, training, noise_seed);
  DispatchPlan plan = make_dispatch_plan(ro.expert_idx, ro.gate, E, ep, cfg_.capacity_factor,
                                         cfg_.min_capacity, cfg_.drop_policy, /*padded=*/ep > 1);
  torch::Tensor probs =
      cfg_.score_fn == "softmax" ? ro.scores : ro.scores / ro.scores.sum(-1, true);
  torch::Tensor p_local = probs.mean(0);  // [E], differentiable
  // One reduction carries everything global:
  // [routed(E), dropped, tokens, prob sums(E), entropy sum, gate sums(E)].
  torch::Tensor global;
  {
    torch::NoGradGuard ng;
    torch::Tensor pd = probs.detach().to(torch::kFloat64);
    torch::Tensor entropy = -(pd * pd.clamp_min(1e-30).log()).sum();
    global = torch::cat({torch::tensor(plan.routed, torch::kInt64).to(torch::kFloat64),
                         torch::tensor({double(plan.dropped), double(T)}, torch::kFloat64),
                         pd.sum(0), entropy.view({1}),
                         torch::zeros({E}, torch::kFloat64)
                             .index_add_(0, ro.expert_idx.reshape({-1}),
                                         ro.gate.detach().reshape({-1}).to(torch::kFloat64))});
    if (ep > 1) ep_->all_reduce(global, comm::ReduceOp::Sum);
  }
  const double* g = global.data_ptr<double>();
  const double tokens_g = g[E + 1];
  torch::Tensor f =
      cfg_.aux_loss_scope == "global"
          ? global.narrow(0, 0, E).to(torch::kFloat32) / (tokens_g * k)
          : torch::tensor(plan.routed, torch::kInt64).to(torch::kFloat32) / double(T * k);
  out.aux_loss = cfg_.aux_loss_coef * E * (f * p_local).sum();
  out.z_loss = cfg_.z_loss_coef * torch::logsumexp(ro.logits, -1).pow(2).mean();
  LayerStats& st = out.stats;
  st.tokens_per_expert.resize(E);
  for (int64_t e = 0; e < E; ++e)
    st.tokens_per_expert[e] = static_cast<int64_t>(std::llround(g[e]));
  st.tokens = static_cast<int64_t>(std::llround(tokens_g));
  st.capacity = plan.capacity;
  st.drop_fraction = tokens_g > 0 ? g[E] / (tokens_g * k) : 0.0;
  st.router_entropy = tokens_g > 0 ? g[2 * E + 2] / tokens_g : 0.0;
  double mx = 0, sum = 0;
  for (auto c : st.tokens_per_expert) mx = std::max(mx, double(c)), sum += double(c);
  st.max_load = mx;
  MOE_CHECK(global.numel() == 3 * E + 3, "global statistics hold " << global.numel() << " values");
  st.gate_per_expert.assign(g + 2 * E + 3, g + 3 * E + 3);
  st.mean_load = sum / E;
  {
    torch::Tensor pg = global.narrow(0, E + 2, E) / std::max(tokens_g, 1.0);
    torch::Tensor fg = global.narrow(0, 0, E) / std::max(tokens_g * k, 1.0);
    st.aux_loss = cfg_.aux_loss_scope == "global"
                      ? cfg_.aux_loss_coef * E * (fg * pg).sum().item<double>()
                      : out.aux_loss.item<double>();
    st.z_loss = out.z_loss.item<double>();
  }
  times.forward[PhaseTimes::Router] += sw.seconds();

  // ---- permute and dispatch
  torch::Tensor send = permute_tokens(x, plan, &times);
  std::vector<ExpertSegment> segments;
  std::vector<int64_t> recv_rows, send_rows = plan.peer_rows;
  torch::Tensor recv;
  if (ep == 1) {
    recv = send;
    int64_t off = 0;
    for (int64_t e = 0; e < E; ++e) {
      segments.push_back({e, off, plan.kept[e]});
      off += plan.padded ? plan.capacity : plan.kept[e];
    }
    recv_rows = send_rows;
  } else {
    sw.reset();
    // Fill counts per (source, local expert): experts skip padding rows and,
    // in dropless mode, the receiver sizes its buffer.
    torch::Tensor fill =
        ep_->all_to_all(torch::tensor(plan.kept, torch::kInt64).view({E, 1})).view({ep, EL});
    const int64_t* fp = fill.data_ptr<int64_t>();
    recv_rows.assign(ep, 0);
    std::vector<int64_t> src_off(ep + 1, 0);
    for (int s = 0; s < ep; ++s) {
      for (int64_t le = 0; le < EL; ++le) recv_rows[s] += fp[s * EL + le];
      if (plan.padded) recv_rows[s] = EL * plan.capacity;
      src_off[s + 1] = src_off[s] + recv_rows[s];
    }
    times.forward[PhaseTimes::Dispatch] += sw.seconds();
    for (int64_t le = 0; le < EL; ++le) {
      for (int s = 0; s < ep; ++s) {
        int64_t start = src_off[s];
        for (int64_t l = 0; l < le; ++l) start += plan.padded ? plan.capacity : fp[s * EL + l];
        segments.push_back({le, start, fp[s * EL + le]});
      }
    }
    recv = all_to_all_autograd(send, send_rows, recv_rows, *ep_, &times, PhaseTimes::Dispatch);
  }

  // ---- experts, combine, unpermute
  torch::Tensor expert_out = expert_mlp(recv, w1, w3, w2, segments, swiglu, &times);
  torch::Tensor back = ep == 1 ? expert_out
                               : all_to_all_autograd(expert_out, recv_rows, send_rows, *ep_, &times,
                                                     PhaseTimes::Combine);
  out.y = unpermute_tokens(back, ro.gate, plan, &times);
  if (shared_w1.defined())
    out.y = out.y + expert_mlp(x, shared_w1, shared_w3, shared_w2, {{0, 0, T}}, swiglu, &times);
  return out;
}

}  // namespace moe
